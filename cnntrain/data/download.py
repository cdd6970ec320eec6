"""Downloading files that cannot hurt: checked, atomic, once for many processes.

``fetch(folder, files, mirrors)`` puts each file, named and with the md5 its publisher
gives, into ``folder``. For each file it tries the mirrors in order and moves on at any
failure: no connection, an HTTP error, a timeout, a short or wrong body (checksum
mismatch). A caller that knows another checksum (datasets.py knows that of the
decompressed data, which survives recompression) can pass it as ``check``, for a file
whose md5 differs.

A file is streamed into a temporary ``.part`` file in the same folder, checked, fsynced
and renamed into place with ``os.replace``, so its final name only ever holds a checked
file; a crash, Ctrl-C or kill -9 at any moment leaves a good file or none.

A lock file (``filelock``) in the folder makes downloads one at a time: when 16 processes
start on a new machine, one downloads and the others wait, then find the checked files
and download nothing. This module knows nothing of datasets; datasets.py says what to get.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from cnntrain import __version__

TIMEOUT_S = 30.0  # for connecting and for each read: a stalled mirror fails, a slow one does not
LOCK_TIMEOUT_S = 3600.0  # how long to wait for another process's download
LOCK_NAME = ".download.lock"
CHUNK = 1 << 16
# None allows any host. Tests set {"127.0.0.1"} so that nothing else can ever be contacted.
ALLOWED_HOSTS: set[str] | None = None


class DownloadError(Exception):
    """Every mirror failed for a file; ``tried`` has one 'url: reason' entry per try."""

    def __init__(self, message: str, tried: list[str]):
        self.tried = tried
        super().__init__(message)


class _TryFailed(Exception):
    """One mirror failed for one file; the next mirror is tried."""


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


Check = Callable[[str, Path], bool]  # (file name, path) -> is it the right content?


def _has(path: Path, name: str, md5: str, check: Check | None) -> bool:
    try:
        return md5_of(path) == md5 or (check is not None and check(name, path))
    except OSError:
        return False


def _describe(e: BaseException) -> str:
    """A short reason for a failed try: 'HTTP 404 Not Found', 'connection refused', ..."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        if not isinstance(e.reason, BaseException):
            return str(e.reason)
        e = e.reason
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, TimeoutError):  # socket.timeout is TimeoutError since Python 3.10
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[0].lower() + e.strerror[1:]
    return str(e) or type(e).__name__


class _Meter:
    """Progress on stderr: a line per file, and on a terminal a tqdm bar with bytes while it comes."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tty = not quiet and sys.stderr.isatty()
        self.bar = None

    def start(self, name: str, total: int | None) -> None:
        if self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                            file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def line(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk too.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fetch_one(url: str, target: Path, md5: str, check: Check | None, timeout: float,
               meter: _Meter) -> tuple[int, str]:
    """Download ``url`` to ``target`` if it checks out; returns the byte count and the check.

    Raises _TryFailed for anything wrong with this mirror.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _TryFailed("not an http or https URL")
    if ALLOWED_HOSTS is not None and parts.hostname not in ALLOWED_HOSTS:
        raise _TryFailed(f"host {parts.hostname} is not allowed here")
    request = urllib.request.Request(url, headers={"User-Agent": f"cnntrain/{__version__}"})
    # Not mkstemp: its 0600 would make a shared cache unreadable; 0666 leaves it to the umask.
    part = target.parent / f".{target.name}.{secrets.token_hex(6)}.part"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        digest, size = hashlib.md5(), 0
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    meter.start(target.name, total)
                    for chunk in iter(lambda: response.read(CHUNK), b""):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                        meter.update(len(chunk))
            except (OSError, http.client.HTTPException, ValueError) as e:
                # OSError covers URLError, HTTPError, refused connections and timeouts.
                raise _TryFailed(_describe(e)) from None
            finally:
                meter.close()
            if total is not None and size != total:
                raise _TryFailed(f"connection closed after {size:,} of {total:,} bytes")
            out.flush()
            os.fsync(out.fileno())
        how = "md5 ok"
        if digest.hexdigest() != md5:
            if check is None or not check(target.name, part):
                raise _TryFailed(f"checksum mismatch: expected md5 {md5}, got {digest.hexdigest()} "
                                 f"({size:,} bytes)")
            how = "md5 differs, data checksum ok"
        os.replace(part, target)
    except BaseException:
        # Whatever stops us (a bad mirror, Ctrl-C, a full disk), the final name is untouched.
        try:
            os.unlink(part)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(target.parent)
    return size, how


def _lock(folder: Path, quiet: bool):
    from filelock import FileLock, Timeout

    lock = FileLock(str(folder / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not quiet:
            print(f"waiting for another process downloading into {folder}", file=sys.stderr, flush=True)
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_S)
        except Timeout:
            raise DownloadError(
                f"waited {LOCK_TIMEOUT_S:.0f} s for another process downloading into {folder} "
                f"(lock file {folder / LOCK_NAME})", []) from None
    return lock


def fetch(folder: str | os.PathLike, files: Mapping[str, str], mirrors: Sequence[str],
          quiet: bool = False, timeout: float | None = None, check: Check | None = None) -> list[Path]:
    """Make sure ``folder`` holds each file of ``files`` (name -> md5), downloading what is missing.

    ``mirrors`` are base URLs, tried in order; a file's URL is base + name. A file is good
    when its md5 matches or, failing that, ``check(name, path)`` says so. Returns the paths.
    Raises DownloadError naming every try when all mirrors fail for a file.
    """
    folder = Path(folder)
    timeout = TIMEOUT_S if timeout is None else timeout
    meter = _Meter(quiet)
    paths = [folder / name for name in files]
    if all(_has(path, name, md5, check) for path, (name, md5) in zip(paths, files.items())):
        return paths
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = _lock(folder, quiet)
    except OSError as e:
        raise DownloadError(f"cannot write in {folder}: {_describe(e)}", []) from None
    try:
        # Holding the lock, any .part file is left over from a process that died mid-download.
        for stale in folder.glob(".*.part"):
            stale.unlink(missing_ok=True)
        for path, (name, md5) in zip(paths, files.items()):
            if _has(path, name, md5, check):  # already here, or fetched by the process we waited for
                continue
            tried = []
            for base in mirrors:
                url = base + name
                start = time.monotonic()
                try:
                    size, how = _fetch_one(url, path, md5, check, timeout, meter)
                except _TryFailed as e:
                    tried.append(f"{url}: {e}")
                    meter.line(f"download from {url} failed: {e}")
                    continue
                meter.line(f"downloaded {url} ({size:,} bytes, {time.monotonic() - start:.1f} s, {how})")
                break
            else:
                if not tried:
                    raise DownloadError(f"no mirror to download {name} from", [])
                raise DownloadError(f"could not download {name}: tried {'; '.join(tried)}", tried)
    except OSError as e:  # the folder, not a mirror: read-only, gone, ...
        raise DownloadError(f"cannot write in {folder}: {_describe(e)}", []) from None
    finally:
        lock.release()
    return paths
