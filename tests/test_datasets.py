"""Dataset lookup order, the mnist fallback, and the bundled sample checked against PROVENANCE.md."""

import gzip
import hashlib
import json
import shutil

import numpy as np
import pytest

from cnntrain.data import datasets
from cnntrain.data.datasets import (DATASETS, REGISTRY, DataNotFound, Release, bundled_sample_dir,
                                    check_folder, find_dataset_dir, load_dataset)
from cnntrain.data.idx import IDXError
from idx_helpers import STEMS, write_idx, write_idx_dir

OFFLINE = {"CNNTRAIN_OFFLINE": "1"}


@pytest.fixture
def unchecked(monkeypatch):
    """mnist and fashion-mnist with no published files: any small IDX data passes for them."""
    for name in ("mnist", "fashion-mnist"):
        monkeypatch.setitem(REGISTRY, name, Release())


@pytest.fixture
def places(tmp_path, unchecked):
    """Every lookup location for "mnist", each holding a dataset with its own train size."""
    p = {
        "data_dir": tmp_path / "explicit",
        "env": tmp_path / "env" / "mnist",
        "xdg": tmp_path / "xdg" / "cnntrain" / "mnist",
        "home": tmp_path / "home" / ".cache" / "cnntrain" / "mnist",
        "system": tmp_path / "system" / "mnist",
    }
    for n_train, folder in enumerate(p.values(), start=2):
        write_idx_dir(folder, n_train=n_train, n_test=1, shape=(4, 3))
    p["environ"] = {"CNNTRAIN_DATA": str(tmp_path / "env"), "XDG_CACHE_HOME": str(tmp_path / "xdg"),
                    "HOME": str(tmp_path / "home")}
    p["system_dir"] = tmp_path / "system"
    return p


def remove(folder):
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()


def find(places, name="mnist", data_dir=None):
    return find_dataset_dir(name, data_dir, environ=places["environ"], system_dir=places["system_dir"])


def test_lookup_order(places):
    # Knock out the winner each time; the next place in the documented order must win.
    assert find(places, data_dir=places["data_dir"]) == (places["data_dir"], [str(places["data_dir"])])
    for winner in ["env", "xdg", "home"]:
        folder, tried = find(places)
        assert folder == places[winner]
        assert tried[-1] == str(places[winner])
        if winner == "xdg":
            # With XDG_CACHE_HOME set, ~/.cache is not consulted at all.
            assert str(places["home"]) not in tried
        remove(places[winner])
        if winner == "xdg":
            places["environ"]["XDG_CACHE_HOME"] = ""  # unset or empty: falls back to ~/.cache
    folder, tried = find(places)
    assert folder == places["system"]
    assert tried == [str(places["env"]), str(places["home"]), str(places["system"])]
    remove(places["system"])
    assert find(places) == (None, tried)


def test_loaded_data_comes_from_the_winner(places):
    ds = load_dataset("mnist", environ=places["environ"], system_dir=places["system_dir"])
    # The env folder was written with n_train=3 (see the fixture's order).
    assert (ds.name, ds.source, ds.fallback, ds.warning) == ("mnist", str(places["env"]), False, None)
    assert ds.train_images.shape == (3, 4, 3) and ds.test_labels.shape == (1,)


def test_relative_xdg_cache_home_is_ignored(places):
    places["environ"]["XDG_CACHE_HOME"] = "relative/cache"
    del places["environ"]["CNNTRAIN_DATA"]
    assert find(places)[0] == places["home"]


def test_default_system_dir_is_the_module_constant(places, monkeypatch):
    monkeypatch.setattr(datasets, "SYSTEM_DATASETS_DIR", places["system_dir"])
    folder, _ = find_dataset_dir("mnist", environ={"HOME": str(places["system_dir"] / "nohome")})
    assert folder == places["system"]


def test_explicit_data_dir_without_files_is_an_error_not_a_fallthrough(places, tmp_path):
    partial = tmp_path / "partial"
    write_idx_dir(partial, 2, 1)
    (partial / f"{STEMS[3]}.gz").unlink()
    for data_dir, what in [(partial, f"missing {STEMS[3]}"), (tmp_path / "absent", "no such folder")]:
        with pytest.raises(DataNotFound) as info:
            load_dataset("mnist", data_dir=data_dir, environ=places["environ"], system_dir=places["system_dir"])
        message = str(info.value)
        assert f"mnist not found in data.dir {data_dir} ({what})" in message
        assert "\n" not in message and info.value.tried == [str(data_dir)]


def test_half_filled_folder_is_named_and_skipped(places):
    (places["env"] / f"{STEMS[0]}.gz").unlink()
    folder, tried = find(places)
    assert folder == places["xdg"]
    assert tried[0] == f"{places['env']} (missing {STEMS[0]})"


def test_gz_wins_over_raw_and_forms_can_mix(tmp_path):
    write_idx_dir(tmp_path, n_train=3, n_test=2, gz=True, seed=1)
    write_idx_dir(tmp_path, n_train=5, n_test=2, gz=False, seed=2)
    assert load_dataset("mnist", data_dir=tmp_path).train_images.shape[0] == 3
    (tmp_path / f"{STEMS[0]}.gz").unlink()
    (tmp_path / f"{STEMS[1]}.gz").unlink()
    assert load_dataset("mnist", data_dir=tmp_path).train_images.shape[0] == 5


def test_train_and_test_image_sizes_must_match(tmp_path):
    write_idx_dir(tmp_path, 3, 2, shape=(28, 28))
    write_idx(tmp_path / f"{STEMS[2]}.gz", np.zeros((2, 32, 28), np.uint8))
    with pytest.raises(IDXError, match="image size differs .*: expected 28x28, found 32x28"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_mnist_falls_back_to_the_bundled_sample(tmp_path):
    environ = {"HOME": str(tmp_path / "home"), **OFFLINE}
    ds = load_dataset("mnist", environ=environ, system_dir=tmp_path / "system")
    assert (ds.name, ds.source, ds.fallback, ds.verified) == ("mnist-sample", "bundled", True, True)
    assert ds.train_images.shape == (8000, 28, 28) and ds.test_images.shape == (2000, 28, 28)
    looked = (f"{tmp_path / 'home' / '.cache' / 'cnntrain' / 'mnist'}; {tmp_path / 'system' / 'mnist'}; "
              f"download skipped (CNNTRAIN_OFFLINE is set)")
    assert ds.warning == (f"MNIST not found (looked in: {looked}); using the bundled 10,000-image sample "
                          f"mnist-sample instead. Set data.dir or CNNTRAIN_DATA, or run `cnntrain data "
                          f"download mnist`, to use full MNIST.")


def test_no_fallback_when_refused(tmp_path):
    with pytest.raises(DataNotFound) as info:
        load_dataset("mnist", fallback=False, environ={"HOME": str(tmp_path), **OFFLINE},
                     system_dir=tmp_path / "sys")
    message = str(info.value)
    assert message.startswith(f"mnist not found: looked in {tmp_path / '.cache' / 'cnntrain' / 'mnist'}; "
                              f"{tmp_path / 'sys' / 'mnist'}; download skipped (CNNTRAIN_OFFLINE is set). "
                              f"To fix:")
    assert "CNNTRAIN_DATA" in message and "mnist-sample" in message and "apt-get" not in message
    assert "unset CNNTRAIN_OFFLINE to download it" in message
    assert "\n" not in message


def test_fashion_mnist_never_falls_back(tmp_path):
    with pytest.raises(DataNotFound, match="apt-get install dataset-fashion-mnist") as info:
        load_dataset("fashion-mnist", environ={"HOME": str(tmp_path), **OFFLINE}, system_dir=tmp_path / "sys")
    assert info.value.tried[-2:] == [str(tmp_path / "sys" / "fashion-mnist"),
                                     "download skipped (CNNTRAIN_OFFLINE is set)"]


def test_fashion_mnist_from_the_system_dir(tmp_path, unchecked):
    write_idx_dir(tmp_path / "sys" / "fashion-mnist", 6, 2)
    ds = load_dataset("fashion-mnist", environ={"HOME": str(tmp_path)}, system_dir=tmp_path / "sys")
    assert (ds.name, ds.source, ds.fallback) == ("fashion-mnist", str(tmp_path / "sys" / "fashion-mnist"), False)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'cifar10': expected one of mnist, fashion-mnist"):
        find_dataset_dir("cifar10")
    assert DATASETS == ("mnist", "fashion-mnist", "mnist-sample")


@pytest.fixture(scope="module")
def sample():
    return load_dataset("mnist-sample")


def test_mnist_sample_matches_provenance(sample):
    # Counts from PROVENANCE.md, written when the sample was made.
    assert sample.train_images.shape == (8000, 28, 28) and sample.train_labels.shape == (8000,)
    assert sample.test_images.shape == (2000, 28, 28) and sample.test_labels.shape == (2000,)
    assert np.bincount(sample.train_labels, minlength=10).tolist() == [801, 902, 793, 826, 784, 690, 811, 856, 755, 782]
    assert np.bincount(sample.test_labels, minlength=10).tolist() == [200, 225, 198, 206, 196, 173, 203, 214, 189, 196]
    # Real digits: mostly black background, some full-white strokes.
    assert sample.train_images.max() == 255 and np.median(sample.train_images) == 0


def test_mnist_sample_files_match_provenance_hashes():
    expected = {
        "train-images-idx3-ubyte.gz": "fbb9499ee328ec38b237bea2d3952dccc44831078eec4d37df3c788d379e761d",
        "train-labels-idx1-ubyte.gz": "540504409a223dd4e3e04e68198a90fec851787acd40804c2f9ea4a7dcc062ec",
        "t10k-images-idx3-ubyte.gz": "4832a39a2d7797520ea132a808d244c9d212b439825fd912e1948508d3eb39f1",
        "t10k-labels-idx1-ubyte.gz": "6fe0f5327bc9b13ab0ae9aaa9ed30a563fc38c9cefa09255c62306ec3f6fe165",
    }
    for name, sha in expected.items():
        assert hashlib.sha256((bundled_sample_dir() / name).read_bytes()).hexdigest() == sha, name


def test_mnist_sample_info_is_json(sample):
    assert (sample.name, sample.source, sample.fallback, sample.warning) == ("mnist-sample", "bundled", False, None)
    info = sample.info()
    assert json.loads(json.dumps(info)) == {"dataset": "mnist-sample", "source": "bundled", "fallback": False,
                                            "verified": True, "train": 8000, "test": 2000, "image_shape": [28, 28]}


def test_mnist_sample_ignores_data_dir(tmp_path):
    assert find_dataset_dir("mnist-sample", data_dir=tmp_path)[0] == bundled_sample_dir()


@pytest.fixture
def published(tmp_path, monkeypatch):
    """A dataset "pub" whose published files are a generated 6 + 3 image set."""
    origin = tmp_path / "origin"
    write_idx_dir(origin, 6, 3, shape=(5, 4), seed=3)
    sha = {stem: hashlib.sha256(gzip.decompress((origin / f"{stem}.gz").read_bytes())).hexdigest()
           for stem in STEMS}
    monkeypatch.setitem(REGISTRY, "pub", Release(sha256=sha, counts=(6, 3)))
    environ = {"CNNTRAIN_DATA": str(tmp_path / "data"), "HOME": str(tmp_path / "home"), **OFFLINE}
    return origin, environ, tmp_path / "data" / "pub"


def load_pub(environ, **kw):
    return load_dataset("pub", environ=environ, system_dir="/nonexistent", **kw)


def test_published_files_verify_however_compressed(published):
    origin, environ, folder = published
    folder.mkdir(parents=True)
    # Debian recompresses; others unpack: the checksum of the decompressed bytes is the same.
    for stem, how in zip(STEMS, ["copy", "level1", "raw", "level9"]):
        raw = gzip.decompress((origin / f"{stem}.gz").read_bytes())
        if how == "raw":
            (folder / stem).write_bytes(raw)
        elif how == "copy":
            (folder / f"{stem}.gz").write_bytes((origin / f"{stem}.gz").read_bytes())
        else:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw, compresslevel=int(how[-1]), mtime=99))
    ds = load_pub(environ)
    assert (ds.source, ds.verified) == (str(folder), True)
    assert [c.published_as for c in check_folder(folder)] == ["pub"] * 4


def test_found_by_name_it_must_be_the_published_data(published):
    origin, environ, folder = published
    write_idx_dir(folder, 7, 3, shape=(5, 4), seed=3)  # one image too many
    with pytest.raises(IDXError) as info:
        load_pub(environ)
    assert str(info.value) == (f"{folder / STEMS[0]}.gz: not the published pub file: expected 6 images, found 7. "
                               f"To use these files anyway, name their folder in data.dir.")
    write_idx_dir(folder, 6, 3, shape=(5, 4), seed=4)  # the right counts, other pixels
    want = REGISTRY["pub"].sha256[STEMS[0]]
    with pytest.raises(IDXError, match=rf"{STEMS[0]}.gz: not the published pub file: expected sha256 "
                                       rf"{want} of the decompressed data, found [0-9a-f]{{64}}\. "):
        load_pub(environ)
    # Named in data.dir, any well-formed data is used as it is, just not marked verified.
    ds = load_pub(environ, data_dir=folder)
    assert (ds.source, ds.verified, len(ds.train_labels)) == (str(folder), False, 6)
    assert load_pub(environ, data_dir=origin).verified
    with pytest.raises(IDXError, match="not the published pub file"):
        check_folder(folder, "pub")
    assert [c.published_as for c in check_folder(folder)] == [None] * 4


def test_a_damaged_bundled_sample_is_caught(tmp_path):
    copy = tmp_path / "sample"
    shutil.copytree(bundled_sample_dir(), copy)
    labels = gzip.decompress((copy / f"{STEMS[3]}.gz").read_bytes())
    (copy / f"{STEMS[3]}.gz").write_bytes(gzip.compress(labels[:-1] + bytes([(labels[-1] + 1) % 10])))
    assert [c.published_as for c in check_folder(copy)] == ["mnist-sample"] * 3 + [None]
    with pytest.raises(IDXError, match=f"{STEMS[3]}.gz: not the published mnist-sample file: expected sha256"):
        check_folder(copy, "mnist-sample")


@pytest.mark.skipif(not (datasets.SYSTEM_DATASETS_DIR / "fashion-mnist").is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_is_the_published_release(tmp_path):
    ds = load_dataset("fashion-mnist", environ={"HOME": str(tmp_path), **OFFLINE})
    assert (ds.source, ds.verified) == (str(datasets.SYSTEM_DATASETS_DIR / "fashion-mnist"), True)
    assert ds.train_images.shape == (60000, 28, 28) and ds.test_images.shape == (10000, 28, 28)
    assert np.bincount(ds.train_labels).tolist() == [6000] * 10  # Fashion-MNIST is balanced


@pytest.mark.parametrize("value, off", [("1", True), ("yes", True), ("true", True), ("", False), ("0", False),
                                        ("false", False), ("No", False), (None, False)])
def test_offline_values(value, off):
    assert datasets.offline({} if value is None else {"CNNTRAIN_OFFLINE": value}) is off
