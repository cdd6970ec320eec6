"""Finding and loading a dataset by name: mnist, fashion-mnist or the bundled mnist-sample.

A dataset is a folder holding the four standard IDX files, each raw or gzipped. Lookup
order for mnist and fashion-mnist (the first folder holding all four files wins):

1. ``data_dir`` (data.dir in the config), when given: the files must be right there; if
   they are not, that is an error at once, since the user named this folder.
2. ``$CNNTRAIN_DATA/<name>``
3. ``$XDG_CACHE_HOME/cnntrain/<name>``, or ``~/.cache/cnntrain/<name>`` when it is unset
4. ``/usr/share/datasets/<name>`` (Debian's dataset packages, e.g. dataset-fashion-mnist)

mnist-sample is always the folder bundled in this package. When mnist is not found and
fallback is allowed, the bundled sample is loaded instead and the Dataset says so. Nothing
here prints: the warning is returned for the caller to show.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cnntrain.data.idx import IDXError, load_split

DATASETS = ("mnist", "fashion-mnist", "mnist-sample")
NUM_CLASSES = 10  # all three datasets have ten classes
STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# A module constant so tests (and odd systems) can point it elsewhere.
SYSTEM_DATASETS_DIR = Path("/usr/share/datasets")
# Debian packages that install a dataset under SYSTEM_DATASETS_DIR, named in the fix-it hint.
DEBIAN_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist"}


class DataNotFound(Exception):
    """No folder with all four IDX files; the message lists every place tried and the fixes."""

    def __init__(self, name: str, tried: list[str], message: str):
        self.name = name
        self.tried = tried
        super().__init__(message)


@dataclass(frozen=True, eq=False)  # eq=False: comparing arrays with == is not a bool
class Dataset:
    """The data a run actually uses. Images uint8 (N, H, W), labels uint8 (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    name: str  # the dataset really loaded: "mnist-sample" after a fallback
    source: str  # the folder it came from, or "bundled"
    fallback: bool  # True when mnist was asked for and the bundled sample was used
    warning: str | None = None

    def info(self) -> dict:
        """A JSON-able record of the data actually used."""
        return {
            "dataset": self.name,
            "source": self.source,
            "fallback": self.fallback,
            "train": int(len(self.train_labels)),
            "test": int(len(self.test_labels)),
            "image_shape": [int(s) for s in self.train_images.shape[1:]],
        }


def bundled_sample_dir() -> Path:
    """The folder of the bundled 8,000 + 2,000 image MNIST sample."""
    return Path(__file__).parent / "mnist_sample"


def dataset_files(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """The four IDX files in ``folder`` by role, and the stems that are missing.

    When both ``stem.gz`` and the raw ``stem`` exist, the ``.gz`` wins: it is the file as
    distributed, and its CRC catches corruption, while a raw copy beside it is usually
    something unpacked from it (and may be partial).
    """
    found, missing = {}, []
    for role, stem in STEMS.items():
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                found[role] = candidate
                break
        else:
            missing.append(stem)
    return found, missing


def _search_dirs(name: str, environ: Mapping[str, str], system_dir: Path) -> list[Path]:
    dirs = []
    if environ.get("CNNTRAIN_DATA"):
        dirs.append(Path(environ["CNNTRAIN_DATA"]).expanduser() / name)
    cache = environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    if not cache or not os.path.isabs(cache):
        home = environ.get("HOME") or str(Path.home())
        cache = os.path.join(home, ".cache")
    dirs.append(Path(cache) / "cnntrain" / name)
    dirs.append(Path(system_dir) / name)
    return dirs


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")


def find_dataset_dir(name: str, data_dir: str | os.PathLike | None = None,
                     environ: Mapping[str, str] = os.environ,
                     system_dir: str | os.PathLike | None = None) -> tuple[Path | None, list[str]]:
    """The folder holding ``name`` (or None) and every place tried, in lookup order.

    An explicit ``data_dir`` without the four files raises DataNotFound instead of
    returning None, so it can never fall through to another folder or the bundled sample.
    ``data_dir`` is ignored for mnist-sample, which is always the bundled folder.
    """
    _check_name(name)
    if name == "mnist-sample":
        return bundled_sample_dir(), [str(bundled_sample_dir())]
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        _, missing = dataset_files(folder)
        if not missing:
            return folder, [str(folder)]
        what = "no such folder" if not folder.is_dir() else f"missing {', '.join(missing)}"
        raise DataNotFound(name, [str(folder)], (
            f"{name} not found in data.dir {folder} ({what}). To fix: put "
            f"{', '.join(STEMS.values())} (each raw or .gz) there, or unset data.dir to search "
            f"CNNTRAIN_DATA, the cache and {system_dir or SYSTEM_DATASETS_DIR}."))
    tried = []
    for folder in _search_dirs(name, environ, Path(system_dir or SYSTEM_DATASETS_DIR)):
        _, missing = dataset_files(folder)
        if not missing:
            tried.append(str(folder))
            return folder, tried
        # A half-filled folder is worth pointing out: it is usually an interrupted copy.
        tried.append(str(folder) if not folder.is_dir() else f"{folder} (missing {', '.join(missing)})")
    return None, tried


def _not_found_message(name: str, tried: list[str]) -> str:
    fixes = ["set data.dir or CNNTRAIN_DATA"]
    if name in DEBIAN_PACKAGES:
        fixes.append(f"apt-get install {DEBIAN_PACKAGES[name]}")
    fixes.append("use dataset mnist-sample")
    return (f"{name} not found: looked in {'; '.join(tried)}. To fix: put "
            f"{', '.join(STEMS.values())} (each raw or .gz) in one of those folders, "
            f"{', '.join(fixes[:-1])}, or {fixes[-1]}.")


def _load_folder(folder: Path, name: str, source: str, fallback: bool, warning: str | None) -> Dataset:
    files, _ = dataset_files(folder)
    train_images, train_labels = load_split(files["train_images"], files["train_labels"], NUM_CLASSES)
    test_images, test_labels = load_split(files["test_images"], files["test_labels"], NUM_CLASSES)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise IDXError(files["test_images"], (
            f"image size differs from {files['train_images']}: expected "
            f"{'x'.join(map(str, train_images.shape[1:]))}, found {'x'.join(map(str, test_images.shape[1:]))}"))
    return Dataset(train_images, train_labels, test_images, test_labels,
                   name=name, source=source, fallback=fallback, warning=warning)


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, fallback: bool = True,
                 environ: Mapping[str, str] = os.environ,
                 system_dir: str | os.PathLike | None = None) -> Dataset:
    """Find and load ``name``; mnist falls back to the bundled sample when allowed.

    Raises DataNotFound when nothing is found (and no fallback applies), IDXError when a
    file is malformed.
    """
    folder, tried = find_dataset_dir(name, data_dir, environ, system_dir)
    if name == "mnist-sample":
        return _load_folder(folder, name, "bundled", fallback=False, warning=None)
    if folder is not None:
        return _load_folder(folder, name, str(folder), fallback=False, warning=None)
    if name != "mnist" or not fallback:
        raise DataNotFound(name, tried, _not_found_message(name, tried))
    sample = _load_folder(bundled_sample_dir(), "mnist-sample", "bundled", fallback=True, warning=None)
    n = len(sample.train_labels) + len(sample.test_labels)
    warning = (f"MNIST not found (looked in: {'; '.join(tried)}); using the bundled {n:,}-image "
               f"sample mnist-sample instead. Set data.dir or CNNTRAIN_DATA to use full MNIST.")
    return replace(sample, warning=warning)
