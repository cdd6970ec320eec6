"""Checkpoints: PyTorch names and layouts, no pickle, atomic writes, clear errors."""

import io
import re
import json
import pickle
import zipfile

import numpy as np
import pytest

from pathlib import Path

from cnntrain.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cnntrain.config import load_config
from cnntrain.train import make_model

CONFIG = Path(__file__).parents[1] / "configs" / "lenet.yaml"


@pytest.fixture
def model():
    return make_model(load_config(CONFIG).to_dict())


def test_round_trip_keeps_names_layouts_and_metadata(tmp_path, model):
    cfg = load_config(CONFIG).to_dict()
    path = tmp_path / "c.npz"
    velocity = {"ff5.weight": np.ones((120, 400), np.float32)}
    save_checkpoint(path, model.params(), {"config": cfg, "epoch": 3, "step": 7}, velocity)
    ckpt = load_checkpoint(path)
    assert list(ckpt.params) == ["conv1.weight", "conv1.bias", "conv3.weight", "conv3.bias",
                                 "ff5.weight", "ff5.bias", "ff6.weight", "ff6.bias",
                                 "output.weight", "output.bias"]
    assert ckpt.params["conv1.weight"].shape == (6, 1, 5, 5)   # F, C, kH, kW
    assert ckpt.params["conv3.weight"].shape == (16, 6, 5, 5)
    assert ckpt.params["ff5.weight"].shape == (120, 400)       # out, in
    for name, w in model.params().items():
        np.testing.assert_array_equal(ckpt.params[name], w)
    assert ckpt.metadata["config"] == cfg and ckpt.metadata["epoch"] == 3
    assert ckpt.metadata["format"] == 1
    np.testing.assert_array_equal(ckpt.optimizer["ff5.weight"], velocity["ff5.weight"])
    # loadable by plain NumPy with pickles refused
    with np.load(path, allow_pickle=False) as raw:
        assert json.loads(str(raw["_metadata"]))["step"] == 7


def test_flatten_is_in_pytorch_chw_order(model):
    """ff5 sees pool4's maps flattened as (C, H, W): feature index c*25 + i*5 + j."""
    rng = np.random.default_rng(0)
    x = rng.random((2, 1, 28, 28), dtype=np.float32)
    model.forward(x)
    pool4 = model.layers[3]
    flat = model.layers[4]
    maps = pool4.forward(model.layers[2].forward(model.layers[1].forward(
        model.layers[0].forward(np.ascontiguousarray(x.transpose(1, 2, 3, 0))))))  # C,H,W,N
    np.testing.assert_array_equal(flat.forward(maps), maps.transpose(3, 0, 1, 2).reshape(2, 400))


def _write_npz(path, arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


@pytest.mark.parametrize("case,message", [
    ("missing", "no such checkpoint file"),
    ("pickle_renamed", "not a cnntrain checkpoint (not an .npz archive)"),
    ("pickle_inside", "refused to load"),
    ("truncated", "not a cnntrain checkpoint (not an .npz archive)"),
    ("no_metadata", "no _metadata entry"),
    ("bad_json", "_metadata is not valid JSON"),
    ("wrong_format", "checkpoint format 99, expected 1"),
])
def test_bad_checkpoints_are_one_line_errors_and_run_no_code(tmp_path, model, case, message):
    path = tmp_path / "bad.npz"
    cfg = load_config(CONFIG).to_dict()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    if case == "pickle_renamed":
        path.write_bytes(pickle.dumps(Evil()))
    elif case == "pickle_inside":
        _write_npz(path, {"_metadata": np.array(json.dumps({"format": 1, "config": cfg})),
                          "conv1.weight": np.array([Evil()], dtype=object)})
    elif case == "truncated":
        save_checkpoint(path, model.params(), {"config": cfg})
        path.write_bytes(path.read_bytes()[:500])
    elif case == "no_metadata":
        _write_npz(path, model.params())
    elif case == "bad_json":
        _write_npz(path, {"_metadata": np.array("{not json")})
    elif case == "wrong_format":
        _write_npz(path, {"_metadata": np.array(json.dumps({"format": 99, "config": cfg}))})
    with pytest.raises(CheckpointError, match=re.escape(message)) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()


def test_a_failed_write_leaves_the_old_checkpoint_whole(tmp_path, model, monkeypatch):
    cfg = load_config(CONFIG).to_dict()
    path = tmp_path / "last.npz"
    save_checkpoint(path, model.params(), {"config": cfg, "epoch": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C in the middle of writing the archive

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model.params(), {"config": cfg, "epoch": 2})
    assert load_checkpoint(path).metadata["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.npz"]  # no temporary left behind
    assert zipfile.is_zipfile(path)


def test_misshaped_arrays_are_refused_by_the_model(tmp_path, model):
    params = {k: v.copy() for k, v in model.params().items()}
    params["ff5.weight"] = np.zeros((120, 256), np.float32)
    from cnntrain.engine.model import ShapeError
    with pytest.raises(ShapeError, match=r"ff5.weight: expected shape \(120, 400\), found \(120, 256\)"):
        model.load_params(params)
    del params["ff5.weight"]
    with pytest.raises(ShapeError, match="missing parameters: ff5.weight"):
        model.load_params(params)
