"""Downloads against a real HTTP server on 127.0.0.1: mirrors, checksums, locking, interruptions.

The dataset is "testset", registered here with the checksums of small generated IDX files
and no mirrors of its own, so the only URLs ever tried are this server's (conftest.py also
limits this process to 127.0.0.1 and turns downloads off for subprocesses unless a test
turns them back on).
"""

import gzip
import hashlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cnntrain.data import datasets, download
from cnntrain.data.datasets import (DataNotFound, Release, cache_dir, download_dataset, load_dataset,
                                    mirror_urls)
from cnntrain.data.download import DownloadError, fetch
from idx_helpers import STEMS, write_idx_dir

N_TRAIN, N_TEST = 50, 20


class Server:
    """A threaded HTTP server; ``files`` maps a URL path to bytes, ``requests`` logs each GET."""

    def __init__(self):
        self.files, self.requests = {}, []
        self.delay = 0.0  # seconds before each answer: widens the window for races
        self.stall = set()  # paths whose answer stops halfway until release is set
        self.release = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with server.lock:
                    server.requests.append(self.path)
                time.sleep(server.delay)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in server.stall:
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    server.release.wait(20)
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def count(self, prefix=""):
        return {p: self.requests.count(p) for p in set(self.requests) if p.startswith(prefix)}

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def dead_url():
    """A URL on a port nothing listens on: connection refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture
def testset(tmp_path, monkeypatch):
    """Register "testset": generated files, their published checksums, an empty cache."""
    origin = tmp_path / "origin"
    arrays = write_idx_dir(origin, N_TRAIN, N_TEST, seed=7)
    gz = {stem: (origin / f"{stem}.gz").read_bytes() for stem in STEMS}
    release = Release(gz_md5={s: hashlib.md5(b).hexdigest() for s, b in gz.items()},
                      sha256={s: hashlib.sha256(gzip.decompress(b)).hexdigest() for s, b in gz.items()},
                      counts=(N_TRAIN, N_TEST))
    monkeypatch.setitem(datasets.REGISTRY, "testset", release)
    for var, sub in [("CNNTRAIN_DATA", "data"), ("XDG_CACHE_HOME", "cache"), ("HOME", "home")]:
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.delenv("CNNTRAIN_OFFLINE")
    return {"gz": gz, "arrays": arrays, "release": release, "cache": tmp_path / "cache" / "cnntrain" / "testset",
            "spec": json.dumps({"md5": release.gz_md5, "sha256": release.sha256, "counts": release.counts})}


def serve(server, prefix, gz, corrupt=False):
    for stem, body in gz.items():
        server.files[f"{prefix}{stem}.gz"] = body[:-9] + bytes([body[-9] ^ 1]) + body[-8:] if corrupt else body
    return server.url + prefix


def listing(folder):
    return sorted(p.name for p in Path(folder).iterdir()) if Path(folder).exists() else []


GOOD_FILES = sorted([f"{s}.gz" for s in STEMS] + [download.LOCK_NAME])


def test_good_download_then_the_cache(server, testset, monkeypatch, capsys):
    monkeypatch.setenv("CNNTRAIN_MIRROR", serve(server, "/a/", testset["gz"]))
    ds = load_dataset("testset")
    assert (ds.name, ds.source, ds.verified, ds.fallback) == ("testset", str(testset["cache"]), True, False)
    assert np.array_equal(ds.train_images, testset["arrays"]["train_images"])
    assert np.array_equal(ds.test_labels, testset["arrays"]["test_labels"])
    assert server.count() == {f"/a/{s}.gz": 1 for s in STEMS}
    assert listing(testset["cache"]) == GOOD_FILES
    for stem, body in testset["gz"].items():
        assert (testset["cache"] / f"{stem}.gz").read_bytes() == body
    # Not a terminal: one line per file on stderr.
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and all(line.startswith(f"downloaded {server.url}/a/") for line in lines)
    # The second time it comes from the cache: no request at all.
    assert load_dataset("testset", quiet=True).source == str(testset["cache"])
    assert len(server.requests) == 4


def test_quiet_prints_nothing(server, testset, capsys):
    download_dataset("testset", mirrors=[serve(server, "/a/", testset["gz"])], quiet=True)
    assert capsys.readouterr().err == ""


def test_corrupt_first_mirror_then_a_good_one(server, testset, capsys):
    bad = serve(server, "/bad/", testset["gz"], corrupt=True)
    good = serve(server, "/good/", testset["gz"])
    folder = download_dataset("testset", mirrors=[bad, good])
    assert listing(folder) == GOOD_FILES
    assert server.count("/bad/") == {f"/bad/{s}.gz": 1 for s in STEMS}
    assert server.count("/good/") == {f"/good/{s}.gz": 1 for s in STEMS}
    err = capsys.readouterr().err
    want = testset["release"].gz_md5[STEMS[0]]
    assert f"download from {bad}{STEMS[0]}.gz failed: checksum mismatch: expected md5 {want}, got " in err
    assert load_dataset("testset").verified


def test_recompressed_data_passes_but_raw_data_under_a_gz_name_does_not(server, testset, capsys):
    raw = {stem: gzip.decompress(body) for stem, body in testset["gz"].items()}
    as_raw = serve(server, "/raw/", raw)
    recompressed = serve(server, "/re/", {s: gzip.compress(b, compresslevel=1, mtime=1) for s, b in raw.items()})
    folder = download_dataset("testset", mirrors=[as_raw, recompressed])
    assert server.count("/raw/") == {f"/raw/{s}.gz": 1 for s in STEMS}
    assert server.count("/re/") == {f"/re/{s}.gz": 1 for s in STEMS}
    assert capsys.readouterr().err.count("s, md5 differs, data checksum ok)") == 4
    assert all((folder / f"{s}.gz").read_bytes()[:2] == b"\x1f\x8b" for s in STEMS)
    assert load_dataset("testset").verified


def test_404_and_dead_port_then_a_good_mirror(server, testset):
    good = serve(server, "/good/", testset["gz"])
    download_dataset("testset", mirrors=[dead_url(), server.url + "/missing/", good], quiet=True)
    assert listing(testset["cache"]) == GOOD_FILES


def test_every_mirror_failing_lists_every_try(server, testset):
    dead, missing = dead_url(), server.url + "/missing/"
    bad = serve(server, "/bad/", testset["gz"], corrupt=True)
    with pytest.raises(DownloadError) as info:
        download_dataset("testset", mirrors=[dead, missing, bad], quiet=True)
    name = f"{STEMS[0]}.gz"
    assert info.value.tried[0] == f"{dead}{name}: connection refused"
    assert info.value.tried[1] == f"{missing}{name}: HTTP 404 Not Found"
    assert info.value.tried[2].startswith(f"{bad}{name}: checksum mismatch: expected md5 ")
    assert str(info.value).startswith(f"could not download {name}: tried {dead}{name}: connection refused; ")
    # Nothing half-done is left where the data would be found.
    assert listing(testset["cache"]) == [download.LOCK_NAME]
    # Through load_dataset it is DataNotFound (CLI exit code 1), one line, with the tries.
    with pytest.raises(DataNotFound) as info:
        load_dataset("testset", mirrors=[dead, missing], quiet=True)
    message = str(info.value)
    assert "\n" not in message and "connection refused" in message and "HTTP 404 Not Found" in message
    assert "set CNNTRAIN_MIRROR or data.mirrors to a mirror you can reach" in message


def test_a_stalled_mirror_times_out(server, testset, monkeypatch):
    stalled = serve(server, "/slow/", testset["gz"])
    server.stall = {f"/slow/{STEMS[1]}.gz"}
    good = serve(server, "/good/", testset["gz"])
    monkeypatch.setattr(download, "TIMEOUT_S", 0.3)
    start = time.monotonic()
    download_dataset("testset", mirrors=[stalled, good], quiet=True)
    assert time.monotonic() - start < 5 and listing(testset["cache"]) == GOOD_FILES
    assert server.count("/good/") == {f"/good/{STEMS[1]}.gz": 1}


def test_offline_skips_the_download(server, testset, monkeypatch):
    monkeypatch.setenv("CNNTRAIN_MIRROR", serve(server, "/a/", testset["gz"]))
    monkeypatch.setenv("CNNTRAIN_OFFLINE", "1")
    with pytest.raises(DataNotFound) as info:
        load_dataset("testset")
    assert server.requests == []
    assert info.value.tried[-1] == "download skipped (CNNTRAIN_OFFLINE is set)"
    assert "unset CNNTRAIN_OFFLINE to download it" in str(info.value)
    monkeypatch.setenv("CNNTRAIN_OFFLINE", "0")
    assert load_dataset("testset").verified


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_download_leaves_no_file(server, testset, monkeypatch, interrupt):
    url = serve(server, "/a/", testset["gz"])
    monkeypatch.setattr(download, "CHUNK", 64)
    calls = []

    def update(self, n):
        calls.append(n)
        if len(calls) == 3:  # mid-way through the first file
            raise interrupt("stop")

    monkeypatch.setattr(download._Meter, "update", update)
    with pytest.raises(interrupt):
        download_dataset("testset", mirrors=[url], quiet=True)
    assert listing(testset["cache"]) == [download.LOCK_NAME]


def test_files_already_verified_are_not_downloaded_again(server, testset):
    # One file already there, recompressed differently and raw: same data, so it is good.
    cache = testset["cache"]
    cache.mkdir(parents=True)
    raw = gzip.decompress(testset["gz"][STEMS[0]])
    (cache / f"{STEMS[0]}.gz").write_bytes(gzip.compress(raw, compresslevel=1, mtime=12345))
    (cache / STEMS[1]).write_bytes(gzip.decompress(testset["gz"][STEMS[1]]))
    url = serve(server, "/a/", testset["gz"])
    download_dataset("testset", mirrors=[url], quiet=True)
    assert server.count() == {f"/a/{s}.gz": 1 for s in STEMS[2:]}
    assert load_dataset("testset").verified


def test_mirror_order_and_the_guard(tmp_path):
    env = {"CNNTRAIN_MIRROR": "http://127.0.0.1:1/{name} http://127.0.0.1:2/x/"}
    assert mirror_urls("mnist", ["https://example.org/m/", "http://127.0.0.1:2/x"], env) == [
        "http://127.0.0.1:1/mnist/", "http://127.0.0.1:2/x/", "https://example.org/m/",
        "https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/"]
    # Here only 127.0.0.1 can be contacted: another host fails as a try, unasked.
    with pytest.raises(DownloadError, match="host ossci-datasets.s3.amazonaws.com is not allowed here"):
        fetch(tmp_path, {"f": "0" * 32},
              ["https://ossci-datasets.s3.amazonaws.com/mnist/"], quiet=True)


def test_bad_mirror_urls_fail_as_tries(tmp_path):
    with pytest.raises(DownloadError) as info:
        fetch(tmp_path, {"f.gz": "0" * 32}, ["ftp://127.0.0.1/", "/just/a/path/"], quiet=True)
    assert info.value.tried == ["ftp://127.0.0.1/f.gz: not an http or https URL",
                                "/just/a/path/f.gz: not an http or https URL"]


CHILD = """
import json, sys
from cnntrain.data import datasets, download
spec = json.loads(sys.argv[1])
for name in ("testset", "mnist"):  # mnist too, with no mirrors of its own, for `train`
    datasets.REGISTRY[name] = datasets.Release(gz_md5=spec["md5"], sha256=spec["sha256"],
                                               counts=tuple(spec["counts"]))
download.ALLOWED_HOSTS = {"127.0.0.1"}
from cnntrain.cli import app
app(sys.argv[2:], prog_name="cnntrain")
"""


def child(testset, *args, **popen):
    """`cnntrain ARGS` in a new process that knows "testset"; downloads allowed."""
    env = {**os.environ, "CNNTRAIN_OFFLINE": ""}
    env.update(popen.pop("env", {}))
    return subprocess.Popen([sys.executable, "-c", CHILD, testset["spec"], *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_eight_processes_download_once(server, testset):
    url = serve(server, "/a/", testset["gz"])
    server.delay = 0.4  # each file takes a while, so the others arrive mid-download
    procs = [child(testset, "data", "download", "testset", "--mirror", url) for _ in range(8)]
    results = [(p.wait(60), *p.communicate()) for p in procs]
    for rc, out, err in results:
        assert rc == 0, err
        assert out == f"testset: verified in {testset['cache']}\n"
        assert "Traceback" not in err
    assert server.count() == {f"/a/{s}.gz": 1 for s in STEMS}
    assert sum("waiting for another process" in err for _, _, err in results) >= 1
    assert listing(testset["cache"]) == GOOD_FILES


def test_kill_9_mid_download_leaves_no_file_and_the_next_run_cleans_up(server, testset):
    url = serve(server, "/a/", testset["gz"])
    server.stall = {f"/a/{STEMS[0]}.gz"}
    proc = child(testset, "data", "download", "testset", "-q", "--mirror", url)
    deadline = time.monotonic() + 20
    while not any(n.endswith(".part") for n in listing(testset["cache"])):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    left = listing(testset["cache"])
    assert not any(n.endswith(".gz") for n in left)  # a .part, never a final name
    server.stall = set()
    download_dataset("testset", mirrors=[url], quiet=True)
    assert listing(testset["cache"]) == GOOD_FILES


def test_cli_exit_codes_and_one_line_errors(server, testset, tmp_path):
    dead = dead_url()
    p = child(testset, "data", "download", "testset", "--mirror", dead)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1 and err.count("error:") == 1 and "Traceback" not in err
    name = f"{STEMS[0]}.gz"
    assert f"error: testset: could not download {name}: tried {dead}{name}: connection refused" in err
    # verify a folder: a bad file is exit 1, one line naming it.
    bad = tmp_path / "bad"
    write_idx_dir(bad, 3, 2)
    (bad / f"{STEMS[3]}.gz").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x02\x01")  # truncated raw under .gz
    p = child(testset, "data", "verify", bad)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1
    assert err == f"error: {bad / STEMS[3]}.gz: not gzip-compressed: expected gzip magic 1f 8b, found 00 00\n"
    # verify the downloaded dataset by name; a usage error is 2.
    download_dataset("testset", mirrors=[serve(server, "/a/", testset["gz"])], quiet=True)
    p = child(testset, "data", "verify", "testset")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert out.splitlines()[-1] == f"testset: verified in {testset['cache']}"
    assert f"{STEMS[0]}.gz  {N_TRAIN}x28x28  verified: sha256 of the data matches the published testset" in out
    p = child(testset, "data", "download", "nope")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and err.startswith("error: unknown downloadable dataset 'nope'")


def test_train_downloads_from_data_mirrors(server, testset, tmp_path):
    """`cnntrain train` with data.mirrors: the run downloads, verifies and records the data."""
    url = serve(server, "/m/", testset["gz"])
    config = Path(__file__).parents[1] / "configs" / "lenet.yaml"
    p = child(testset, "train", config, f"data.mirrors=[{url}]", "data.validation=0", "training.epochs=1",
              "--json", "--quiet", cwd=tmp_path)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    data = json.loads(out)["data"]
    assert (data["dataset"], data["source"], data["verified"], data["train"]) == (
        "mnist", str(cache_dir("mnist")), True, N_TRAIN)
    assert server.count() == {f"/m/{s}.gz": 1 for s in STEMS}


def test_an_unwritable_cache_is_a_download_error(server, testset):
    testset["cache"].parent.parent.mkdir(parents=True)
    testset["cache"].parent.write_text("a file where the cache folder should be")
    with pytest.raises(DownloadError, match=f"cannot write in {testset['cache']}: not a directory"):
        download_dataset("testset", mirrors=[serve(server, "/a/", testset["gz"])], quiet=True)
    assert server.requests == []
