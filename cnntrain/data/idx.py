"""Strict reader for IDX files (the MNIST file format), plain or gzip-compressed.

Layout of an IDX file: a 4-byte magic number ``00 00 TT DD`` (TT: element type, DD: number
of dims), then DD big-endian uint32 dim sizes, then the elements in C order. MNIST-family
data is always uint8 (TT = 0x08): images are (N, H, W), labels are (N,).

Every problem is an IDXError whose message is one line naming the file, what was wrong,
what was expected and what was found. Nothing else escapes: no zlib, EOF or struct errors.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from pathlib import Path

import numpy as np

GZIP_MAGIC = b"\x1f\x8b"
UINT8 = 0x08
# The other IDX element types, named so a float or int file gets a useful message.
TYPE_NAMES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}
KIND_NDIM = {"images": 3, "labels": 1}


class IDXError(ValueError):
    """A file that is not a well-formed uint8 IDX file of the expected kind."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def _describe_magic(ndim: int, kind: str | None) -> str:
    what = f"uint8 {kind}" if kind else "uint8"
    return f"0x{0x0800 + ndim:08X} ({what}, {ndim} dim{'s' if ndim != 1 else ''})"


def _open(path: Path):
    """A binary file object over the file's IDX bytes, decompressing when the content
    starts with the gzip magic.

    The content decides, not the name: gzip data under a raw name is read (no valid IDX file
    can start with 1f 8b, so this is unambiguous), but a ``.gz`` name on data that is not gzip
    is an error, since the name promised something the file is not.
    """
    try:
        raw = open(path, "rb")
    except FileNotFoundError:
        raise IDXError(path, "no such file") from None
    except IsADirectoryError:
        raise IDXError(path, "not a file: expected an IDX file, found a directory") from None
    except OSError as e:
        raise IDXError(path, f"cannot read: {e.strerror or e}") from None
    start = raw.read(2)
    raw.seek(0)
    if start == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if path.suffix.lower() == ".gz":
        raw.close()
        found = start.hex(" ") if start else "an empty file"
        raise IDXError(path, f"not gzip-compressed: expected gzip magic 1f 8b, found {found}")
    return raw, raw


def _read_into(f, buffer) -> int:
    """Fill `buffer` from f; returns the bytes read (fewer only at the end of the data)."""
    view, filled = memoryview(buffer), 0
    while filled < len(view):
        n = f.readinto(view[filled:])
        if not n:
            break
        filled += n
    return filled


def read_idx(path: str | os.PathLike, kind: str | None = None) -> np.ndarray:
    """Read a uint8 IDX file; ``kind`` "images" requires 3 dims, "labels" 1 dim.

    Returns a read-only uint8 array with the header's shape. The data streams straight
    into that array: reading full MNIST never holds a second decompressed copy (peak
    memory of the whole load was 187 MiB with gzip.decompress, 116 MiB after).
    """
    if kind is not None and kind not in KIND_NDIM:
        raise ValueError(f"kind must be one of {sorted(KIND_NDIM)} or None, got {kind!r}")
    path = Path(path)
    f, raw = _open(path)
    try:
        with raw, f:
            return _parse(path, f, kind)
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, IDXError):
            raise
        # Truncated streams raise EOFError, bad CRCs BadGzipFile (an OSError), bad deflate
        # data zlib.error; all mean the same thing to the user.
        raise IDXError(path, f"corrupt gzip data: expected a complete gzip stream, found {e}") from None


def _parse(path: Path, f, kind: str | None) -> np.ndarray:
    want_ndim = KIND_NDIM.get(kind)
    start = f.read(4)
    if not start:
        raise IDXError(path, "empty file: expected an IDX header of at least 4 bytes, found 0 bytes")
    if len(start) < 4:
        raise IDXError(path, f"too short for an IDX header: expected at least 4 bytes, found {len(start)}")
    magic = int.from_bytes(start, "big")
    if start[0] != 0 or start[1] != 0:
        expected = _describe_magic(want_ndim, kind) if want_ndim else "0x000008NN (first two bytes zero)"
        raise IDXError(path, f"bad magic number: expected {expected}, found 0x{magic:08X}")
    type_code, ndim = start[2], start[3]
    if type_code != UINT8:
        name = TYPE_NAMES.get(type_code, "unknown type")
        raise IDXError(path, f"unsupported element type: expected 0x08 (uint8), found 0x{type_code:02X} ({name})")
    if want_ndim is not None and ndim != want_ndim:
        raise IDXError(path, f"bad magic number: expected {_describe_magic(want_ndim, kind)}, "
                             f"found 0x{magic:08X} (uint8, {ndim} dims)")
    if ndim == 0:
        raise IDXError(path, "bad magic number: expected at least 1 dim, found 0x00000800 (0 dims)")

    header = 4 + 4 * ndim
    dim_bytes = f.read(4 * ndim)
    if len(dim_bytes) < 4 * ndim:
        raise IDXError(path, f"header too short: expected {header} bytes for {ndim} dims, "
                             f"found {4 + len(dim_bytes)}")
    dims = struct.unpack(f">{ndim}I", dim_bytes)
    # Python ints: the product of four uint32 dims can overflow int64.
    size = 1
    for d in dims:
        size *= d
    # Never allocate what the header claims before seeing the data: a corrupt header must
    # not ask for terabytes. Read in bounded pieces until the claimed size is reached.
    pieces, found = [], 0
    while found < size:
        piece = np.empty(min(size - found, 1 << 26), dtype=np.uint8)
        n = _read_into(f, piece)
        pieces.append(piece[:n])
        found += n
        if n < len(piece):
            raise IDXError(path, f"truncated: expected {size} bytes of data for shape {dims}, found {found}")
    extra = len(f.read())
    if extra:
        raise IDXError(path, f"trailing bytes: expected {size} bytes of data for shape {dims}, "
                             f"found {size + extra} ({extra} extra)")
    data = pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else np.empty(0, np.uint8)
    data = data.reshape(dims)
    data.flags.writeable = False  # the dataset is shared by every batch: nobody writes into it
    return data


def load_split(images_path: str | os.PathLike, labels_path: str | os.PathLike,
               num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Read a matching pair of image and label files.

    Returns images uint8 (N, H, W) and labels uint8 (N,), with N >= 1, H, W >= 1 and every
    label below ``num_classes``.
    """
    images = read_idx(images_path, kind="images")
    labels = read_idx(labels_path, kind="labels")
    n, h, w = images.shape
    if n == 0:
        raise IDXError(images_path, "no images: expected at least 1, found 0")
    if h == 0 or w == 0:
        raise IDXError(images_path, f"empty images: expected height and width >= 1, found {h}x{w}")
    if len(labels) != n:
        raise IDXError(labels_path, f"count mismatch with {os.fspath(images_path)}: "
                                    f"expected {n} labels (one per image), found {len(labels)}")
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        i = int(bad[0])
        raise IDXError(labels_path, f"label out of range: expected 0..{num_classes - 1} "
                                    f"(num_classes={num_classes}), found {labels[i]} at index {i}")
    return images, labels


def idx_sha256(array: np.ndarray) -> str:
    """The sha256 of ``array``'s uint8 IDX encoding: for an array from read_idx, that of the
    file's decompressed bytes, whatever its compression, hashed without decompressing again."""
    if array.dtype != np.uint8:
        raise ValueError(f"IDX checksums are defined here for uint8 arrays, got {array.dtype}")
    digest = hashlib.sha256(bytes([0, 0, UINT8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape))
    digest.update(np.ascontiguousarray(array))  # a buffer, so no 47 MB copy for a read_idx result
    return digest.hexdigest()
