"""The command line end to end, as a user runs it: real processes, real files, exit codes."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnntrain import __version__ as cnntrain_version
from cnntrain.checkpoint import load_checkpoint
from idx_helpers import write_idx_dir

ROOT = Path(__file__).parents[1]
LENET = str(ROOT / "configs" / "lenet.yaml")
# A few hundred bundled images and two epochs: seconds, not minutes.
SMALL = ["data.dataset=mnist-sample", "data.train_limit=400", "data.test_limit=200",
         "data.validation=100", "training.epochs=2", "training.batch_size=32"]


def cnntrain(*args, cwd, env=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "cnntrain", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=full_env, timeout=300)


def isolated_env(tmp_path):
    """No MNIST anywhere: an empty CNNTRAIN_DATA and cache."""
    return {"CNNTRAIN_DATA": str(tmp_path / "nodata"), "XDG_CACHE_HOME": str(tmp_path / "cache")}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    result = cnntrain("train", LENET, *SMALL, "--json", cwd=tmp)
    assert result.returncode == 0, result.stderr
    return tmp, result


def test_train_writes_the_run_folder(small_run):
    tmp, result = small_run
    run = tmp / "runs" / "lenet"
    assert sorted(p.name for p in run.iterdir()) == [
        ".lock", "checkpoints", "config.yaml", "confusion_matrix.png", "metrics.csv",
        "overrides.txt", "results.png", "summary.json"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.npz", "last.npz"]
    assert (run / "overrides.txt").read_text().splitlines() == SMALL
    assert (run / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "time_s", "lr", "train_loss", "train_acc", "val_loss", "val_acc"]
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(0 <= float(r["val_acc"]) <= 1 and float(r["lr"]) == 0.05 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["seed"] == 0
    assert summary["data"]["dataset"] == "mnist-sample" and summary["data"]["fallback"] is False
    assert (summary["train_images"], summary["val_images"], summary["test_images"]) == (300, 100, 200)
    assert summary["steps"] == 2 * 10  # ceil(300 / 32) per epoch
    assert summary["train_images_per_s"] > 0 and summary["wall_time_s"] > 0
    assert summary["overrides"] == SMALL and summary["cnntrain_version"] == cnntrain_version
    # the best epoch is the one with the highest validation accuracy, first one on ties
    val = [float(r["val_acc"]) for r in rows]
    assert summary["best_epoch"] == val.index(max(val)) + 1
    assert summary["best_val_acc"] == pytest.approx(max(val), abs=1e-6)
    assert summary["checkpoint"] == "runs/lenet/checkpoints/best.npz"
    matrix = np.array(summary["test_confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 200
    assert np.trace(matrix) / 200 == summary["test_acc"]
    # the resolved config is a config: it loads back and names every default
    resolved = (run / "config.yaml").read_text()
    assert "train_limit: 400" in resolved and "eval_batch_size: 1000" in resolved


def test_json_mode_prints_only_the_summary_on_stdout(small_run):
    tmp, result = small_run
    summary = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert summary == json.loads((tmp / "runs" / "lenet" / "summary.json").read_text())
    # progress went to stderr, one plain line per epoch (not a terminal here)
    epoch_lines = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and "val_acc" in epoch_lines[0]


def test_eval_reproduces_the_test_accuracy_from_the_checkpoint_alone(small_run):
    tmp, result = small_run
    summary = json.loads(result.stdout)
    for which, acc, loss, epoch in (("best", "test_acc", "test_loss", summary["best_epoch"]),
                                    ("last", "final_test_acc", "final_test_loss", 2)):
        out = cnntrain("eval", tmp / "runs" / "lenet" / "checkpoints" / f"{which}.npz", "--json", cwd=ROOT)
        assert out.returncode == 0, out.stderr
        ev = json.loads(out.stdout)
        assert ev["test_acc"] == summary[acc] and ev["test_loss"] == summary[loss]
        assert ev["test_images"] == 200 and ev["epoch"] == epoch
    human = cnntrain("eval", summary["checkpoint"], cwd=tmp)  # paths in the summary are as given
    assert f"test accuracy {100 * summary['test_acc']:.2f}%" in human.stdout


def test_same_config_and_seed_give_bitwise_identical_runs(small_run, tmp_path):
    tmp, first = small_run
    second = cnntrain("train", LENET, *SMALL, "--json", "--runs-dir", tmp_path, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    a = load_checkpoint(tmp / "runs" / "lenet" / "checkpoints" / "last.npz")
    b = load_checkpoint(tmp_path / "lenet" / "checkpoints" / "last.npz")
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), name
    s1, s2 = json.loads(first.stdout), json.loads(second.stdout)
    for key in ("test_acc", "test_loss", "final_train_loss", "final_val_acc"):
        assert s1[key] == s2[key], key
    other_seed = cnntrain("train", LENET, *SMALL, "seed=1", "--json", "--runs-dir", tmp_path, cwd=tmp_path)
    assert json.loads(other_seed.stdout)["final_train_loss"] != s1["final_train_loss"]


def test_a_second_run_with_the_same_name_gets_its_own_folder(small_run):
    tmp, _ = small_run
    again = cnntrain("train", LENET, *SMALL, "training.epochs=1", "--quiet", cwd=tmp)
    assert again.returncode == 0, again.stderr
    assert (tmp / "runs" / "lenet2" / "summary.json").exists()
    assert json.loads((tmp / "runs" / "lenet" / "summary.json").read_text())["epochs"] == 2


@pytest.mark.parametrize("args,message", [
    (["optimizer.lr=0"], "error: override 'optimizer.lr=0': optimizer.lr: must be greater than 0, got 0"),
    (["training.batchsize=3"], "training.batchsize: unknown key; did you mean 'batch_size'?"),
    (["model.layers.conv3.kernel=15"], "conv3: kernel 15x15 with padding 0 does not fit its input of 6x14x14"),
    (["model.input=[1,32,32]"], "model.input is [1, 32, 32] but the data's images are 1x28x28"),
    (["model.layers.output.units=5"], "the output layer has 5 units but the data has label 9"),
    (["data.validation=400"], "validation holds out 400 of 400 training images"),
])
def test_bad_config_exits_2_with_one_line_and_no_run_folder(tmp_path, args, message):
    result = cnntrain("train", LENET, *SMALL, *args, cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_config_file_and_bad_checkpoint(tmp_path):
    result = cnntrain("train", tmp_path / "nope.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "no such config file" in result.stderr
    (tmp_path / "x.npz").write_text("not a checkpoint")
    result = cnntrain("eval", tmp_path / "x.npz", cwd=tmp_path)
    assert result.returncode == 1 and "not a cnntrain checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_mnist_falls_back_to_the_bundled_sample_with_a_warning(tmp_path):
    args = ["data.dataset=mnist", *SMALL[1:], "training.epochs=1", "--json"]
    result = cnntrain("train", LENET, *args, cwd=tmp_path, env=isolated_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "warning: MNIST not found" in result.stderr and "mnist-sample" in result.stderr
    data = json.loads(result.stdout)["data"]
    assert data["dataset"] == "mnist-sample" and data["fallback"] is True
    no_fallback = cnntrain("train", LENET, *args, "data.fallback=false", cwd=tmp_path,
                           env=isolated_env(tmp_path))
    assert no_fallback.returncode == 1 and "error:" in no_fallback.stderr
    assert "Traceback" not in no_fallback.stderr


def test_small_images_from_a_data_dir_train(tmp_path):
    """An 8x8 dataset and a network that fits it, from IDX files in data.dir."""
    write_idx_dir(tmp_path / "tiny", n_train=120, n_test=40, shape=(8, 8))
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model:\n  input: [1, 8, 8]\n  layers:\n"
        "    - {name: conv1, type: conv, filters: 4, kernel: 3, padding: 1, activation: relu}\n"
        "    - {name: pool2, type: maxpool, size: 2}\n"
        "    - {name: output, type: dense, units: 10}\n"
        f"data: {{dir: {tmp_path / 'tiny'}, validation: 0}}\n"
        "training: {epochs: 2, batch_size: 16}\n")
    result = cnntrain("train", config, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["name"] == "tiny" and summary["data"]["image_shape"] == [8, 8]
    assert summary["data"]["source"] == str(tmp_path / "tiny")


def test_init_starts_from_a_checkpoint(small_run, tmp_path):
    tmp, _ = small_run
    ckpt = tmp / "runs" / "lenet" / "checkpoints" / "last.npz"
    # an lr so small that float32 weights cannot move: the run ends where it started
    result = cnntrain("train", LENET, *SMALL, "training.epochs=1", "optimizer.lr=1e-30",
                      "--init", ckpt, "--runs-dir", tmp_path, "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    start, end = load_checkpoint(ckpt), load_checkpoint(tmp_path / "lenet" / "checkpoints" / "last.npz")
    for name in start.params:
        assert np.array_equal(start.params[name], end.params[name]), name
    misfit = cnntrain("train", LENET, *SMALL, "model.layers.ff5.units=50", "--init", ckpt,
                      cwd=tmp_path)
    assert misfit.returncode == 2 and "ff5.weight: expected shape (50, 400), found (120, 400)" in misfit.stderr


def test_divergence_exits_3_and_keeps_the_last_good_checkpoint(tmp_path):
    result = cnntrain("train", LENET, *SMALL, "optimizer.lr=1e6", cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert "diverged: the loss became" in result.stderr and "epoch 1, step" in result.stderr
    assert "Traceback" not in result.stderr and "RuntimeWarning" not in result.stderr
    summary = json.loads((tmp_path / "runs" / "lenet" / "summary.json").read_text())
    assert summary["status"] == "diverged"


def test_help_lists_the_commands():
    result = cnntrain("--help", cwd=ROOT)
    assert result.returncode == 0
    assert all(command in result.stdout for command in ("train", "eval", "runs", "predict"))
