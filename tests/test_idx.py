"""The IDX reader: exact decoding, and one clear IDXError for every kind of bad file."""

import gzip
import hashlib
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnntrain.data.idx import IDXError, idx_sha256, load_split, read_idx
from idx_helpers import write_idx


def test_decodes_hand_written_bytes(tmp_path):
    # Written out byte by byte from the format description, independent of idx_helpers.
    data = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(12))
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(data)
    out = read_idx(path, kind="images")
    assert out.dtype == np.uint8
    assert out.tolist() == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]


def test_big_endian_dims(tmp_path):
    # 258 = 0x0102: a little-endian reader would see 0x0201 = 513.
    labels = np.arange(258, dtype=np.int64).astype(np.uint8)
    path = write_idx(tmp_path / "labels", labels)
    assert path.read_bytes()[4:8] == b"\x00\x00\x01\x02"
    assert np.array_equal(read_idx(path, kind="labels"), labels)


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
@pytest.mark.parametrize("shape", [(5, 7, 3), (1, 28, 28), (3, 1, 9)])
def test_round_trip(tmp_path, name, shape):
    images = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    out = read_idx(write_idx(tmp_path / name, images), kind="images")
    assert out.shape == shape
    assert np.array_equal(out, images)


def test_gzip_data_under_a_raw_name_is_read_by_content(tmp_path):
    # No valid IDX file starts with 1f 8b, so reading gzip by its magic bytes is unambiguous.
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    path = write_idx(tmp_path / "labels-idx1-ubyte", labels, gz=True)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    assert np.array_equal(read_idx(path, kind="labels"), labels)


def test_result_is_read_only(tmp_path):
    out = read_idx(write_idx(tmp_path / "l", np.zeros(3, np.uint8)))
    with pytest.raises(ValueError):
        out[0] = 1


HEADER_222 = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2])  # uint8 images 2x2x2
GOOD_GZ = gzip.compress(HEADER_222 + bytes(8), mtime=0)


def flip_middle_byte(data):
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


# (case id, file name, file bytes, kind, text the message must contain)
BAD_FILES = [
    ("truncated", "t.idx", HEADER_222 + bytes(7), "images",
     "truncated: expected 8 bytes of data for shape (2, 2, 2), found 7"),
    ("trailing", "t.idx", HEADER_222 + bytes(9), "images",
     "trailing bytes: expected 8 bytes of data for shape (2, 2, 2), found 9 (1 extra)"),
    ("bad magic", "t.idx", b"\x12\x34" + HEADER_222[2:] + bytes(8), "images",
     "bad magic number: expected 0x00000803 (uint8 images, 3 dims), found 0x12340803"),
    ("labels as images", "t.idx", bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 7]), "images",
     "bad magic number: expected 0x00000803 (uint8 images, 3 dims), found 0x00000801"),
    ("images as labels", "t.idx", HEADER_222 + bytes(8), "labels",
     "bad magic number: expected 0x00000801 (uint8 labels, 1 dim), found 0x00000803"),
    ("float32 type", "t.idx", bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + bytes(4), None,
     "unsupported element type: expected 0x08 (uint8), found 0x0D (float32)"),
    ("unknown type", "t.idx", bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 0]), None,
     "found 0x42 (unknown type)"),
    ("zero dims", "t.idx", bytes([0, 0, 8, 0]), None, "expected at least 1 dim"),
    ("short header", "t.idx", HEADER_222[:10], "images",
     "header too short: expected 16 bytes for 3 dims, found 10"),
    ("three bytes", "t.idx", b"\x00\x00\x08", None, "expected at least 4 bytes, found 3"),
    ("empty file", "t.idx", b"", None, "empty file"),
    ("raw under .gz", "t.idx.gz", HEADER_222 + bytes(8), "images",
     "not gzip-compressed: expected gzip magic 1f 8b, found 00 00"),
    ("empty .gz", "t.idx.gz", b"", "images", "not gzip-compressed: expected gzip magic 1f 8b, found an empty file"),
    ("corrupt gzip", "t.idx.gz", flip_middle_byte(GOOD_GZ), "images", "corrupt gzip data"),
    ("truncated gzip", "t.idx.gz", GOOD_GZ[:-6], "images", "corrupt gzip data"),
    ("gzip header only", "t.idx", GOOD_GZ[:2], "images", "corrupt gzip data"),
    ("truncated inside gzip", "t.idx.gz", gzip.compress(HEADER_222 + bytes(5)), "images",
     "truncated: expected 8 bytes of data for shape (2, 2, 2), found 5"),
]


@pytest.mark.parametrize("name, data, kind, problem", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_file(tmp_path, name, data, kind, problem):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(IDXError) as info:
        read_idx(path, kind=kind)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert problem in message
    assert "\n" not in message
    assert info.value.path == str(path)


def test_missing_file(tmp_path):
    with pytest.raises(IDXError, match=r"nope-idx1-ubyte: no such file$"):
        read_idx(tmp_path / "nope-idx1-ubyte")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(IDXError, match="found a directory"):
        read_idx(tmp_path)


def test_unknown_kind_is_a_caller_error(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        read_idx(write_idx(tmp_path / "l", np.zeros(1, np.uint8)), kind="pictures")


def write_pair(tmp_path, images, labels):
    return write_idx(tmp_path / "img.gz", images), write_idx(tmp_path / "lab.gz", labels)


def test_load_split(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (4, 3, 5), dtype=np.uint8)
    labels = np.array([9, 0, 3, 9], dtype=np.uint8)
    got_images, got_labels = load_split(*write_pair(tmp_path, images, labels))
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)


def test_load_split_count_mismatch_names_both_files(tmp_path):
    img, lab = write_pair(tmp_path, np.zeros((4, 2, 2), np.uint8), np.zeros(3, np.uint8))
    with pytest.raises(IDXError) as info:
        load_split(img, lab)
    assert str(info.value) == f"{lab}: count mismatch with {img}: expected 4 labels (one per image), found 3"


def test_load_split_label_out_of_range(tmp_path):
    img, lab = write_pair(tmp_path, np.zeros((5, 2, 2), np.uint8), np.array([0, 9, 2, 10, 11], np.uint8))
    with pytest.raises(IDXError) as info:
        load_split(img, lab)
    assert str(info.value) == (f"{lab}: label out of range: expected 0..9 (num_classes=10), "
                               f"found 10 at index 3")
    # The same labels are fine with more classes.
    assert load_split(img, lab, num_classes=12)[1].max() == 11


def test_load_split_no_images(tmp_path):
    img, lab = write_pair(tmp_path, np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8))
    with pytest.raises(IDXError, match=r"img.gz: no images: expected at least 1, found 0"):
        load_split(img, lab)


def test_load_split_zero_width(tmp_path):
    img, lab = write_pair(tmp_path, np.zeros((2, 28, 0), np.uint8), np.zeros(2, np.uint8))
    with pytest.raises(IDXError, match=r"found 28x0"):
        load_split(img, lab)


def check_never_crashes(path, data, kind):
    """read_idx returns an array matching its header, or raises IDXError; nothing else."""
    path.write_bytes(data)
    try:
        out = read_idx(path, kind=kind)
    except IDXError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
        return None
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    assert out.dtype == np.uint8 and out.shape == dims
    assert out.size == math.prod(dims) == len(raw) - 4 - 4 * ndim
    return out


SUITE = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SUITE
@given(data=st.binary(max_size=64), gz_name=st.booleans(), kind=st.sampled_from([None, "images", "labels"]))
def test_random_bytes_never_crash(tmp_path, data, gz_name, kind):
    check_never_crashes(tmp_path / ("f.gz" if gz_name else "f"), data, kind)


@SUITE
@given(type_code=st.sampled_from([0x08, 0x08, 0x08, 0x0D, 0x09]),
       dims=st.lists(st.integers(0, 5), min_size=0, max_size=4),
       extra=st.integers(-3, 3), cut_header=st.booleans(), gz=st.booleans(),
       kind=st.sampled_from([None, "images", "labels"]))
def test_random_headers(tmp_path, type_code, dims, extra, cut_header, gz, kind):
    size = math.prod(dims)
    n_data = max(0, size + extra)
    data = bytes([0, 0, type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    if cut_header and dims:
        data = data[:-1]
    else:
        data += bytes(n_data)
    if gz:
        data = gzip.compress(data)
    out = check_never_crashes(tmp_path / ("f.gz" if gz else "f"), data, kind)
    # The oracle: the file reads exactly when every rule of the format holds.
    valid = (type_code == 0x08 and len(dims) >= 1 and not cut_header and n_data == size
             and (kind is None or len(dims) == {"images": 3, "labels": 1}[kind]))
    assert (out is not None) == valid


@SUITE
@given(shape=st.lists(st.integers(0, 6), min_size=1, max_size=3), gz=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_idx_sha256_is_that_of_the_decompressed_file(tmp_path, shape, gz, seed):
    array = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    path = write_idx(tmp_path / "f", array, gz=gz)
    raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    assert idx_sha256(read_idx(path)) == hashlib.sha256(raw).hexdigest()


def test_idx_sha256_exact_value():
    # The file 00 00 08 01 | 00 00 00 02 | 07 09 (`printf ... | sha256sum`).
    expected = "6b413bc4e4b437a09780b06c8c43c748d2546f2be2f36913c8dfdb95fac3a083"
    assert idx_sha256(np.array([7, 9], np.uint8)) == expected
    assert idx_sha256(np.array([9, 7], np.uint8)[::-1]) == expected  # a non-contiguous view
    with pytest.raises(ValueError, match="uint8"):
        idx_sha256(np.array([7, 9]))
