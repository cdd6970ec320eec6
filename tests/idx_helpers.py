"""Writing synthetic IDX files for tests. Import with ``from idx_helpers import ...``.

The encoder is written from the format description with struct, not with cnntrain code,
so reading these files back is a real check of the reader.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """The raw IDX encoding of a uint8 array: magic 00 00 TT ndim, big-endian dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool | None = None) -> Path:
    """Write ``array`` as IDX to ``path``; gzip when ``gz``, or by the .gz suffix when None."""
    path = Path(path)
    data = idx_bytes(array)
    if gz is None:
        gz = path.suffix == ".gz"
    if gz:
        data = gzip.compress(data, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_idx_dir(folder: Path, n_train: int, n_test: int, shape: tuple[int, int] = (28, 28),
                  gz: bool = True, num_classes: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a valid 4-file IDX dataset of random images into ``folder``; return the arrays.

    Keys: train_images (n_train, H, W), train_labels (n_train,), test_images, test_labels.
    """
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "train_labels": rng.integers(0, num_classes, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "test_labels": rng.integers(0, num_classes, n_test, dtype=np.uint8),
    }
    suffix = ".gz" if gz else ""
    for stem, array in zip(STEMS, arrays.values()):
        write_idx(Path(folder) / f"{stem}{suffix}", array, gz=gz)
    return arrays
