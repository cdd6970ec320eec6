"""Interruption and resume: a run stopped anywhere and continued ends bit for bit where
the same run done in one go ends; SIGINT/SIGTERM exit codes; resumes that must be refused."""

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cnntrain.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cnntrain.config import dump_yaml, load_config
from cnntrain.data.datasets import load_dataset
from cnntrain.interrupt import StopRequest
from cnntrain.resume import ResumeError, prepare_resume
from cnntrain.runs import claim_run_dir
from cnntrain.train import Interrupted, make_model, prepare_data, train
from test_cli import LENET, cnntrain

# momentum, a schedule and shuffling: every piece of state a resume has to restore
STATEFUL = ["data.dataset=mnist-sample", "data.train_limit=330", "data.test_limit=100",
            "data.validation=30", "training.batch_size=32", "training.epochs=3",
            "optimizer.momentum=0.9", "optimizer.schedule=cosine"]


@pytest.fixture(scope="module")
def sample():
    return load_dataset("mnist-sample")


def _train(runs_dir, dataset, overrides, stop_after=None, name="run"):
    """A new run in-process; with stop_after=k, a stop request arrives during step k."""
    cfg_obj = load_config(LENET, overrides + [f"name={name}"])
    cfg = cfg_obj.to_dict()
    model = make_model(cfg)
    splits = prepare_data(cfg, dataset, model)
    run_dir = claim_run_dir(runs_dir, name)
    stop, steps = StopRequest(), []

    def report(event, **kw):
        if event == "batch":
            steps.append(1)
            if len(steps) == stop_after:
                stop.signum = signal.SIGINT

    train(cfg, model, splits, run_dir, dataset.info(), report, config_yaml=dump_yaml(cfg_obj),
          stop=stop, summary={"overrides": overrides}, plots=False)
    return run_dir


def _resume(run_dir, dataset, overrides=(), stop_after=None):
    r = prepare_resume(run_dir, list(overrides))
    splits = prepare_data(r.cfg, dataset, r.model)
    stop, steps = StopRequest(), []

    def report(event, **kw):
        if event == "batch":
            steps.append(1)
            if len(steps) == stop_after:
                stop.signum = signal.SIGTERM

    return train(r.cfg, r.model, splits, run_dir, dataset.info(), report,
                 config_yaml=dump_yaml(r.cfg_obj), stop=stop, state=r.state, velocity=r.velocity,
                 summary=r.summary, restore_rows=r.restore_rows, plots=False)


def _weights(run_dir, which="last"):
    return load_checkpoint(run_dir / "checkpoints" / f"{which}.npz")


def _assert_same_run(a, b):
    for which in ("last", "best"):
        ca, cb = _weights(a, which), _weights(b, which)
        for name in ca.params:
            assert np.array_equal(ca.params[name], cb.params[name]), (which, name)
        for name in ca.optimizer:
            assert np.array_equal(ca.optimizer[name], cb.optimizer[name]), (which, name)
    rows = [[{k: v for k, v in r.items() if k != "time_s"} for r in csv.DictReader(open(d / "metrics.csv"))]
            for d in (a, b)]
    assert rows[0] == rows[1]
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in ("test_acc", "test_loss", "best_epoch", "best_val_acc", "steps", "final_train_loss"):
        assert sa[key] == sb[key], key


@pytest.fixture(scope="module")
def one_go(tmp_path_factory, sample):
    return _train(tmp_path_factory.mktemp("one_go"), sample, STATEFUL)


@pytest.mark.parametrize("stops", [[7], [10], [1, 12, 10]])
def test_a_run_stopped_anywhere_and_resumed_is_bitwise_the_run_in_one_go(tmp_path, sample, one_go, stops):
    """10 steps per epoch (the last one of 12 images): stop mid-epoch (7), at an epoch's
    last step (10: the epoch ends first), and several times, the last in the last epoch."""
    with pytest.raises(Interrupted):
        run = _train(tmp_path, sample, STATEFUL, stop_after=stops[0])
    run = tmp_path / "run"
    for k in stops[1:]:
        with pytest.raises(Interrupted):
            _resume(run, sample, stop_after=k)
        assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    state = _weights(run).metadata["resume"]
    assert (state["epoch"], state["batch"]) == divmod(sum(stops), 10)
    summary = _resume(run, sample)
    assert summary["status"] == "completed" and summary["resumed"] == len(stops)
    _assert_same_run(one_go, run)


def test_resume_can_raise_the_epochs_and_appends_to_metrics(tmp_path, sample):
    base = [o for o in STATEFUL if not o.startswith("optimizer.schedule")]
    run = _train(tmp_path, sample, base + ["training.epochs=1"])
    before = (run / "metrics.csv").read_text()
    summary = _resume(run, sample, ["training.epochs=3"])
    assert summary["epochs"] == 3 and summary["overrides"][-1] == "training.epochs=3"
    after = (run / "metrics.csv").read_text()
    assert after.startswith(before) and len(after.splitlines()) == 4  # header + 3 epochs
    ref = _train(tmp_path, sample, base, name="ref")
    _assert_same_run(ref, run)  # a constant lr: one epoch, then two more, is three epochs


def test_a_kill_between_checkpoint_and_metrics_row_loses_no_row(tmp_path, sample, one_go):
    """The row is written after last.npz; a kill in between leaves metrics.csv one short."""
    run = _train(tmp_path, sample, STATEFUL + ["training.epochs=2"])
    lines = (run / "metrics.csv").read_text().splitlines(keepends=True)
    (run / "metrics.csv").write_text("".join(lines[:-1]))  # as if killed before the append
    _resume(run, sample, ["training.epochs=3"])
    epochs = [r["epoch"] for r in csv.DictReader(open(run / "metrics.csv"))]
    assert epochs == ["1", "2", "3"]


def test_early_stopping_and_the_lr_schedule_are_recorded(tmp_path, sample):
    overrides = [o for o in STATEFUL if not o.startswith(("optimizer", "training.epochs"))]
    run = _train(tmp_path, sample, overrides + [
        "training.epochs=8", "training.patience=1", "optimizer.schedule=step",
        "optimizer.step_size=2", "optimizer.gamma=0.5", "optimizer.lr=1e-4"])
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    summary = json.loads((run / "summary.json").read_text())
    val = [float(r["val_acc"]) for r in rows]
    # stops after the first epoch that does not beat the best so far (patience 1)
    first_miss = next(i for i in range(1, len(val)) if val[i] <= max(val[:i]))
    assert len(rows) == first_miss + 1 < 8 and summary["stopped_early"] is True
    assert summary["epochs"] == len(rows) and summary["planned_epochs"] == 8
    assert [float(r["lr"]) for r in rows] == [1e-4 * 0.5 ** (e // 2) for e in range(len(rows))]


def test_cosine_schedule_values():
    from cnntrain.train import learning_rate

    opt = {"lr": 0.1, "schedule": "cosine", "min_lr": 0.0, "step_size": 1, "gamma": 1.0}
    assert [learning_rate(opt, e, 4) for e in range(1, 5)] == pytest.approx(
        [0.1, 0.1 * (1 + np.cos(np.pi / 4)) / 2, 0.05, 0.1 * (1 + np.cos(3 * np.pi / 4)) / 2])


# ---- real signals, through the command line -----------------------------------------

SIGNALLED = ["data.dataset=mnist-sample", "data.train_limit=1100", "data.test_limit=100",
             "data.validation=100", "training.batch_size=4", "training.epochs=3",
             "optimizer.momentum=0.5", "optimizer.lr=0.01", "--no-plots"]


def _signal_in_epoch(args, cwd, epoch_line, sig):
    """Run cnntrain; once `epoch_line` (one plain line per epoch, printed after the epoch is
    saved) appears, wait a moment so the next epoch (250 steps) is under way, then signal."""
    proc = subprocess.Popen([sys.executable, "-m", "cnntrain", *map(str, args)], cwd=cwd,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith(epoch_line):
            time.sleep(0.02)
            proc.send_signal(sig)
            break
    err = proc.stderr.read()
    return proc.wait(timeout=120), err


def test_sigint_then_sigterm_mid_epoch_save_exit_and_resume_bit_for_bit(tmp_path):
    ref = cnntrain("train", LENET, *SIGNALLED, "--quiet", "--runs-dir", tmp_path / "ref", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "lenet"
    chain = [(["train", LENET, *SIGNALLED, "--runs-dir", tmp_path], "epoch 1/3", signal.SIGINT, 130, 2),
             (["train", "--resume", run, "--no-plots"], "epoch 2/3", signal.SIGTERM, 143, 3)]
    for args, line, sig, code, epoch in chain:
        returncode, err = _signal_in_epoch(args, tmp_path, line, sig)
        assert returncode == code, err
        errors = [e for e in err.splitlines() if e.startswith("error:")]
        assert len(errors) == 1 and f"interrupted by {sig.name} in epoch {epoch}" in errors[0], err
        assert "Traceback" not in err
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "interrupted" and summary["interrupted_by"] == sig.name
        state = _weights(run).metadata["resume"]
        assert state["epoch"] == epoch - 1 and 0 < state["batch"] < 250  # mid-epoch
    resumed = cnntrain("train", "--resume", run, "--json", "--no-plots", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["status"] == "completed" and summary["resumed"] == 2
    _assert_same_run(tmp_path / "ref" / "lenet", run)


# ---- resumes that are refused ---------------------------------------------------------

@pytest.fixture(scope="module")
def finished_once(tmp_path_factory, sample):
    return _train(tmp_path_factory.mktemp("finished"), sample,
                  STATEFUL[:-2] + ["training.epochs=1", "optimizer.momentum=0.9"])


@pytest.fixture
def finished(finished_once, tmp_path):
    """A completed one-epoch run with momentum, a fresh copy for each test."""
    return Path(shutil.copytree(finished_once, tmp_path / "run"))


def _rewrite(path, **metadata_changes):
    ckpt = load_checkpoint(path)
    save_checkpoint(path, ckpt.params, {**ckpt.metadata, **metadata_changes}, ckpt.optimizer)


@pytest.mark.parametrize("case,code,message", [
    ("not_a_run", 1, "not a run folder (no config.yaml)"),
    ("no_checkpoint", 1, "nothing to resume"),
    ("frozen_key", 2, "model.layers.ff5.units cannot change when resuming"),
    ("completed", 2, "the run completed all 1 epochs; raise training.epochs"),
    ("fewer_epochs", 2, "training.epochs=1 but the run has already done 2 epochs"),
    ("other_config", 1, "does not belong to this run: its training.batch_size is 16"),
    ("no_momentum", 1, "optimizer.momentum is 0.9 but the checkpoint has no momentum buffer for conv1.weight"),
    ("misshaped_momentum", 1, "optimizer state 'ff5.weight' does not fit the model"),
    ("no_resume_state", 1, "has no resume state"),
    ("bad_rng", 1, "resume state rng is not a PCG64 state"),
    ("metrics_ahead", 1, "has rows up to epoch 2 but"),
    ("pickle", 1, "not a cnntrain checkpoint (not an .npz archive)"),
])
def test_bad_resumes_are_refused_before_anything_is_written(finished, case, code, message):
    run, last = finished, finished / "checkpoints" / "last.npz"
    overrides = ["training.epochs=2"]
    if case == "not_a_run":
        run = run / "checkpoints"
    elif case == "no_checkpoint":
        last.unlink()
    elif case == "frozen_key":
        overrides.append("model.layers.ff5.units=50")
    elif case == "completed":
        overrides = []
    elif case == "fewer_epochs":
        _rewrite(last, resume={**load_checkpoint(last).metadata["resume"], "epoch": 2})
        overrides = ["training.epochs=1"]
    elif case == "other_config":
        cfg = load_checkpoint(last).metadata["config"]
        _rewrite(last, config={**cfg, "training": {**cfg["training"], "batch_size": 16}})
    elif case == "no_momentum":
        ckpt = load_checkpoint(last)
        save_checkpoint(last, ckpt.params, ckpt.metadata, {})
    elif case == "misshaped_momentum":
        ckpt = load_checkpoint(last)
        save_checkpoint(last, ckpt.params, ckpt.metadata,
                        {**ckpt.optimizer, "ff5.weight": np.zeros((2, 2), np.float32)})
    elif case == "no_resume_state":
        ckpt = load_checkpoint(last)
        del ckpt.metadata["resume"]
        save_checkpoint(last, ckpt.params, ckpt.metadata, ckpt.optimizer)
    elif case == "bad_rng":
        _rewrite(last, resume={**load_checkpoint(last).metadata["resume"], "rng": {"bit_generator": "MT"}})
    elif case == "metrics_ahead":
        with open(run / "metrics.csv", "a") as f:
            f.write("2,1,0.05,1,0.5,1,0.5\n")
    elif case == "pickle":
        import pickle
        last.write_bytes(pickle.dumps({"x": 1}))
    files = {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()}
    # Through the command line for a usage error and a runtime error; the rest in-process,
    # where the exit code is the error's own (the CLI passes it through).
    if case in ("frozen_key", "no_momentum"):
        result = cnntrain("train", "--resume", run, *overrides, cwd=finished.parent)
        assert result.returncode == code, result.stderr
        errors = [e for e in result.stderr.splitlines() if e.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], result.stderr
        assert "Traceback" not in result.stderr
    else:
        with pytest.raises((ResumeError, CheckpointError)) as err:
            prepare_resume(run, overrides)
        assert getattr(err.value, "exit_code", 1) == code and message in str(err.value)
        assert "\n" not in str(err.value)
    assert {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()} == files


def test_resume_usage_errors(tmp_path):
    result = cnntrain("train", LENET, "--resume", tmp_path, cwd=tmp_path)
    assert result.returncode == 2 and "give only KEY=VALUE overrides" in result.stderr
    result = cnntrain("train", "--resume", tmp_path, "--name", "x", cwd=tmp_path)
    assert result.returncode == 2 and "no --name, --init or --exist-ok" in result.stderr
    result = cnntrain("train", cwd=tmp_path)
    assert result.returncode == 2 and "missing CONFIG" in result.stderr


def test_resume_api_rejects_a_busy_run(finished):
    from cnntrain.runs import is_locked, run_lock

    lock = run_lock(finished)
    with lock:
        assert is_locked(finished)
        result = cnntrain("train", "--resume", finished, "training.epochs=2", cwd=finished.parent)
        assert result.returncode == 1 and "another cnntrain process is training" in result.stderr
    assert not is_locked(finished)
    with pytest.raises(ResumeError, match="cannot change when resuming"):
        prepare_resume(finished, ["seed=3"])
