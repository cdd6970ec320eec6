"""Finding, checking and fetching a dataset by name: mnist, fashion-mnist or the bundled mnist-sample.

A dataset is a folder holding the four standard IDX files, each raw or gzipped. Lookup
order for mnist and fashion-mnist (the first folder holding all four files wins):

1. ``data_dir`` (data.dir in the config), when given: the files must be right there; if
   they are not, that is an error at once, since the user named this folder.
2. ``$CNNTRAIN_DATA/<name>``
3. ``$XDG_CACHE_HOME/cnntrain/<name>``, or ``~/.cache/cnntrain/<name>`` when it is unset
4. ``/usr/share/datasets/<name>`` (Debian's dataset packages, e.g. dataset-fashion-mnist)
5. a download into the folder of step 3, unless ``CNNTRAIN_OFFLINE`` is set; mirrors from
   ``CNNTRAIN_MIRROR`` and data.mirrors come before the dataset's own

mnist-sample is always the folder bundled in this package. When mnist is not found and
fallback is allowed, the bundled sample is loaded instead and the Dataset says so. Nothing
here prints except download progress: the warning is returned for the caller to show.

Checking: every file gets the strict IDX checks. A downloaded ``.gz`` must have the md5 its
publisher gives. A file found on disk, raw or (re)compressed, is checked by the sha256 of its
decompressed bytes, which is the same however it was compressed: files found by name must
be the published ones (counts, then checksum), while a data.dir folder may hold any IDX data
and is only marked verified when it happens to match.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cnntrain.data.idx import GZIP_MAGIC, IDXError, idx_sha256, load_split, read_idx

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


@dataclass(frozen=True)
class Release:
    """A dataset's published files: where to download them and how to recognise them."""

    mirrors: tuple[str, ...] = ()  # base URLs, tried in order after the user's mirrors
    gz_md5: Mapping[str, str] = field(default_factory=dict)  # stem -> md5 of the published .gz
    sha256: Mapping[str, str] = field(default_factory=dict)  # stem -> sha256 of the decompressed file
    counts: tuple[int, int] | None = None  # (train, test) images


# The md5s are the publishers' (and torchvision's). The sha256s of the decompressed files
# are the ones many independent copies list; the Fashion-MNIST ones were also computed here
# from Debian's dataset-fashion-mnist 1.0, whose decompressed files also match torchvision's
# published raw md5s, so that package holds the real release, only recompressed.
REGISTRY: dict[str, Release] = {
    "mnist": Release(
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/",
                 "http://yann.lecun.com/exdb/mnist/"),
        gz_md5={"train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
                "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
                "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c"},
        sha256={"train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"},
        counts=(60000, 10000)),
    "fashion-mnist": Release(
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        gz_md5={"train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
                "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
                "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310"},
        sha256={"train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"},
        counts=(60000, 10000)),
    # Bundled, never downloaded; checked so that a damaged install is caught.
    "mnist-sample": Release(
        sha256={"train-images-idx3-ubyte": "6ae24e0cd6bb374449ec0e10694bc1e4b1a7706ea649f8f94d0a1da5155701c4",
                "train-labels-idx1-ubyte": "39bffd5db93b84eddfe7709cf83f7a6c237e6ad845e3e28b4630604b3b19e65c",
                "t10k-images-idx3-ubyte": "3889aceeefa78729eefb756d62b4a32a76dd38facfea50fb92287e89fe781c5d",
                "t10k-labels-idx1-ubyte": "fe0d66b7b6d25e6699294b74624e24d7bf6fbb4da23becd862cf1df83ce68493"},
        counts=(8000, 2000)),
}


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
    verified: bool = False  # every file's checksum matched the published release

    def info(self) -> dict:
        """A JSON-able record of the data actually used."""
        return {
            "dataset": self.name,
            "source": self.source,
            "fallback": self.fallback,
            "verified": self.verified,
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


def cache_dir(name: str, environ: Mapping[str, str] = os.environ) -> Path:
    """``$XDG_CACHE_HOME/cnntrain/<name>``, or ``~/.cache/cnntrain/<name>``: where downloads go."""
    cache = environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    if not cache or not os.path.isabs(cache):
        home = environ.get("HOME") or str(Path.home())
        cache = os.path.join(home, ".cache")
    return Path(cache) / "cnntrain" / name


def _search_dirs(name: str, environ: Mapping[str, str], system_dir: Path) -> list[Path]:
    dirs = []
    if environ.get("CNNTRAIN_DATA"):
        dirs.append(Path(environ["CNNTRAIN_DATA"]).expanduser() / name)
    dirs.append(cache_dir(name, environ))
    dirs.append(Path(system_dir) / name)
    return dirs


def _check_name(name: str) -> None:
    if name not in REGISTRY:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(REGISTRY)}")


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


def offline(environ: Mapping[str, str] = os.environ) -> bool:
    """True when CNNTRAIN_OFFLINE is set to anything but '', 0, false, no or off."""
    return environ.get("CNNTRAIN_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def mirror_urls(name: str, mirrors: Sequence[str] = (), environ: Mapping[str, str] = os.environ) -> list[str]:
    """Base URLs to try for ``name``, in order: $CNNTRAIN_MIRROR (space-separated), ``mirrors``
    (data.mirrors), then the dataset's own. ``{name}`` in a URL becomes the dataset name."""
    urls = []
    for base in [*environ.get("CNNTRAIN_MIRROR", "").split(), *mirrors, *REGISTRY[name].mirrors]:
        url = base.replace("{name}", name)
        url = url if url.endswith("/") else url + "/"
        if url not in urls:
            urls.append(url)
    return urls


def _not_found_message(name: str, tried: list[str]) -> str:
    fixes = ["set data.dir or CNNTRAIN_DATA"]
    if REGISTRY[name].gz_md5:
        fixes.append("unset CNNTRAIN_OFFLINE to download it" if any("CNNTRAIN_OFFLINE" in t for t in tried)
                     else "set CNNTRAIN_MIRROR or data.mirrors to a mirror you can reach")
    if name in DEBIAN_PACKAGES:
        fixes.append(f"apt-get install {DEBIAN_PACKAGES[name]}")
    fixes.append("use dataset mnist-sample")
    return (f"{name} not found: looked in {'; '.join(tried)}. To fix: put "
            f"{', '.join(STEMS.values())} (each raw or .gz) in one of those folders, "
            f"{', '.join(fixes[:-1])}, or {fixes[-1]}.")


@dataclass(frozen=True)
class FileCheck:
    """One file of a dataset folder that passed the strict IDX checks."""

    path: Path
    shape: tuple[int, ...]
    sha256: str  # of the decompressed file
    published_as: str | None  # the dataset whose published file has this checksum, if any


def _read_folder(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, Path]]:
    """The four arrays of ``folder`` (strict IDX checks) and their files, by role."""
    files, missing = dataset_files(folder)
    if missing:
        raise IDXError(folder, f"missing {', '.join(missing)} (each raw or .gz)")
    train_images, train_labels = load_split(files["train_images"], files["train_labels"], NUM_CLASSES)
    test_images, test_labels = load_split(files["test_images"], files["test_labels"], NUM_CLASSES)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise IDXError(files["test_images"], (
            f"image size differs from {files['train_images']}: expected "
            f"{'x'.join(map(str, train_images.shape[1:]))}, found {'x'.join(map(str, test_images.shape[1:]))}"))
    arrays = {"train_images": train_images, "train_labels": train_labels,
              "test_images": test_images, "test_labels": test_labels}
    return arrays, files


def _published_as(role: str, sha256: str, first: str | None = None) -> str | None:
    """The dataset whose published file has this checksum, trying ``first`` first."""
    names = ([first] if first else []) + list(REGISTRY)
    return next((name for name in names if REGISTRY[name].sha256.get(STEMS[role]) == sha256), None)


def _require_release(name: str, arrays: dict[str, np.ndarray], files: dict[str, Path],
                     sums: dict[str, str]) -> None:
    """Raise IDXError unless the files are ``name``'s published ones (what can be checked of them)."""
    release = REGISTRY[name]
    hint = "To use these files anyway, name their folder in data.dir."
    if release.counts:
        for role, want in zip(("train_images", "test_images"), release.counts):
            if len(arrays[role]) != want:
                raise IDXError(files[role], f"not the published {name} file: expected {want:,} images, "
                                            f"found {len(arrays[role]):,}. {hint}")
    for role, path in files.items():
        want = release.sha256.get(STEMS[role])
        if want and sums[role] != want:
            raise IDXError(path, f"not the published {name} file: expected sha256 {want} of the "
                                 f"decompressed data, found {sums[role]}. {hint}")


def check_folder(folder: str | os.PathLike, name: str | None = None) -> list[FileCheck]:
    """Check the four IDX files in ``folder``: strict IDX checks, and each file's checksum.

    With ``name``, the files must also be that dataset's published ones: IDXError otherwise.
    Without, any well-formed data passes, and ``published_as`` says what each file is.
    """
    folder = Path(folder)
    arrays, files = _read_folder(folder)
    sums = {role: idx_sha256(a) for role, a in arrays.items()}
    if name is not None:
        _check_name(name)
        _require_release(name, arrays, files, sums)
    return [FileCheck(files[role], arrays[role].shape, sums[role], _published_as(role, sums[role], name))
            for role in STEMS]


def _load_folder(folder: Path, name: str, source: str, fallback: bool, warning: str | None,
                 strict: bool = True) -> Dataset:
    """Load ``folder`` as ``name``: with ``strict`` the files must be the published ones."""
    arrays, files = _read_folder(folder)
    sums = {role: idx_sha256(a) for role, a in arrays.items()}
    release = REGISTRY[name]
    if strict:
        _require_release(name, arrays, files, sums)
    verified = bool(release.sha256) and all(release.sha256.get(STEMS[r]) == sums[r] for r in STEMS)
    return Dataset(**arrays, name=name, source=source, fallback=fallback, warning=warning,
                   verified=verified)


def _data_checksum_ok(path: Path, stem: str, release: Release) -> bool:
    """True when ``path`` (raw or gzip, whatever its name) holds ``stem``'s published data."""
    try:
        return stem in release.sha256 and idx_sha256(read_idx(path)) == release.sha256[stem]
    except IDXError:
        return False


def download_dataset(name: str, mirrors: Sequence[str] = (), environ: Mapping[str, str] = os.environ,
                     quiet: bool = False) -> Path:
    """Download ``name``'s files into its cache folder (only those not already there); return it.

    Raises DownloadError listing every try, ValueError for a dataset that is not downloadable.
    """
    from cnntrain.data.download import fetch

    _check_name(name)
    release = REGISTRY[name]
    if not release.gz_md5:
        raise ValueError(f"{name} is not downloadable")
    folder = cache_dir(name, environ)
    # A raw copy already in the cache will do; a .gz is checked by fetch, under its lock.
    wanted = {f"{stem}.gz": md5 for stem, md5 in release.gz_md5.items()
              if not (folder / stem).is_file() or not _data_checksum_ok(folder / stem, stem, release)}

    def recompressed(file: str, path: Path) -> bool:
        # A mirror may serve the data recompressed (as Debian does): the md5 then differs, but
        # the checksum of the decompressed data still says whether it is the published data.
        with open(path, "rb") as f:
            if f.read(2) != GZIP_MAGIC:  # it is kept under a .gz name
                return False
        return _data_checksum_ok(path, file.removesuffix(".gz"), release)

    fetch(folder, wanted, mirror_urls(name, mirrors, environ), quiet=quiet, check=recompressed)
    return folder


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, fallback: bool = True,
                 environ: Mapping[str, str] = os.environ,
                 system_dir: str | os.PathLike | None = None,
                 mirrors: Sequence[str] = (), quiet: bool = False) -> Dataset:
    """Find, download if need be, and load ``name``; mnist falls back to the bundled sample when allowed.

    Raises DataNotFound when nothing is found or downloaded (and no fallback applies),
    IDXError when a file is malformed or, found by name, is not the published one.
    """
    from cnntrain.data.download import DownloadError

    folder, tried = find_dataset_dir(name, data_dir, environ, system_dir)
    if name == "mnist-sample":
        return _load_folder(folder, name, "bundled", fallback=False, warning=None)
    if folder is not None:
        return _load_folder(folder, name, str(folder), fallback=False, warning=None, strict=data_dir is None)
    if REGISTRY[name].gz_md5:
        if offline(environ):
            tried.append("download skipped (CNNTRAIN_OFFLINE is set)")
        else:
            try:
                folder = download_dataset(name, mirrors, environ, quiet)
            except DownloadError as e:
                tried.append(f"download failed: {e}")
            else:
                return _load_folder(folder, name, str(folder), fallback=False, warning=None)
    if name != "mnist" or not fallback:
        raise DataNotFound(name, tried, _not_found_message(name, tried))
    sample = _load_folder(bundled_sample_dir(), "mnist-sample", "bundled", fallback=True, warning=None)
    n = len(sample.train_labels) + len(sample.test_labels)
    warning = (f"MNIST not found (looked in: {'; '.join(tried)}); using the bundled {n:,}-image "
               f"sample mnist-sample instead. Set data.dir or CNNTRAIN_DATA, or run "
               f"`cnntrain data download mnist`, to use full MNIST.")
    return replace(sample, warning=warning)
