"""`cnntrain sweep` on Ray Tune: spec validation (no Ray needed), a local grid whose trials
equal `cnntrain train` runs, ASHA stopping a weak trial, Ctrl-C and --resume, and a
two-node Ray cluster on 127.0.0.1. The Ray tests skip when the `ray` extra is absent."""

import csv
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cnntrain.checkpoint import load_checkpoint
from cnntrain.sweep import STOPPED, SweepError, load_spec
from test_cli import LENET, ROOT, cnntrain

SAMPLE = {"data.dataset": "mnist-sample", "data.train_limit": 300, "data.validation": 100,
          "data.test_limit": 100, "training.epochs": 2}


def write_spec(path, **fields):
    spec = {"base": LENET, "name": "s", "overrides": SAMPLE, "plots": False, **fields}
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


@pytest.fixture
def ray_env(monkeypatch):
    pytest.importorskip("ray.tune", reason="the ray extra is not installed: pip install -e \".[ray]\"")
    # The teardown's `ray stop --force` stops every Ray process of this user: never run
    # where one of the user's own Ray nodes is already up.
    if subprocess.run(["pgrep", "-u", str(os.getuid()), "-f", "raylet"],
                      capture_output=True).returncode == 0:
        pytest.skip("a Ray node of this user is already running here; these tests would stop it")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's token authentication, with a token of the test's own: the nodes and the
    # driver share it, and nothing is written to ~/.ray
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    yield
    # no Ray process may outlive a test, whatever happened in it
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"],
                   capture_output=True, timeout=120)


# ---- without Ray ----------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({"serach": {}}, "serach: unknown key; did you mean 'search'?"),
    ({"search": {"optimizer.lrr": {"grid": [0.1]}}}, "optimizer.lrr: unknown key; did you mean 'lr'?"),
    ({"search": {"model.layers.ff9.units": {"grid": [10]}}}, "model.layers.ff9: no such layer; did you mean 'ff6'?"),
    ({"search": {}}, "search: expected at least one key to search over, got none"),
    ({"search": {"optimizer.lr": {"grid": []}}}, "grid: expected a non-empty list"),
    ({"search": {"optimizer.lr": {"grdi": [0.1]}}}, "search.optimizer.lr.grdi: unknown key; did you mean 'grid'?"),
    ({"search": {"optimizer.lr": {"uniform": [-1.0, 1.0]}}}, "optimizer.lr: must be greater than 0, got -1.0"),
    ({"search": {"model.layers.ff5.units": {"randint": [0, 10]}}}, "must be at least 1, got 0"),
    ({"search": {"optimizer.lr": {"grid": [0.1]}}, "metric": "test_acc"}, "metric: expected one of val_acc"),
    ({"search": {"optimizer.lr": {"grid": [0.1]}}, "scheduler": {"type": "asha", "grace_period": 0}},
     "scheduler.grace_period: must be at least 1, got 0"),
])
def test_a_bad_spec_fails_in_one_line_before_anything_starts(tmp_path, fields, message):
    spec = write_spec(tmp_path / "bad.yaml", **fields)
    result = cnntrain("sweep", spec, "--runs-dir", tmp_path / "runs", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr
    assert not (tmp_path / "runs").exists()


def test_base_is_relative_to_the_spec_file_and_the_example_is_valid(tmp_path):
    spec, base = load_spec(ROOT / "sweeps" / "lr-momentum.yaml")
    assert base == ROOT / "configs" / "lenet.yaml" and spec.name == "lr-momentum"
    assert spec.scheduler == "asha" and spec.samples == 2
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text("name: c\ndata: {validation: 0}\n")
    (tmp_path / "sub" / "s.yaml").write_text("base: c.yaml\nsearch: {seed: {grid: [1, 2]}}\n"
                                             "overrides: {data.validation: 0.1}\n")
    assert load_spec(tmp_path / "sub" / "s.yaml")[1] == tmp_path / "sub" / "c.yaml"
    with pytest.raises(SweepError, match="needs a validation set"):
        (tmp_path / "sub" / "s.yaml").write_text("base: c.yaml\nsearch: {seed: {grid: [1]}}\n")
        load_spec(tmp_path / "sub" / "s.yaml")


def test_without_ray_the_error_names_the_extra(tmp_path):
    # a `ray` package that cannot be imported stands in for an environment without it
    fake = tmp_path / "fake"
    (fake / "ray").mkdir(parents=True)
    (fake / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    spec = write_spec(tmp_path / "s.yaml", search={"optimizer.lr": {"grid": [0.1]}})
    result = cnntrain("sweep", spec, "--runs-dir", tmp_path / "runs", cwd=tmp_path,
                      env={"PYTHONPATH": str(fake)})
    assert result.returncode == 1
    assert result.stderr.strip() == ('error: cnntrain sweep needs Ray Tune, an optional extra: '
                                     'pip install -e ".[ray]" (or pip install "ray[tune]")')
    assert not (tmp_path / "runs").exists()


# ---- with Ray -------------------------------------------------------------------------

def test_a_grid_runs_locally_and_each_trial_equals_cnntrain_train(tmp_path, ray_env):
    spec = write_spec(tmp_path / "grid.yaml", name="grid",
                      search={"optimizer.lr": {"grid": [0.1, 0.01]},
                              "optimizer.momentum": {"grid": [0.0, 0.9]}})
    result = cnntrain("sweep", spec, "--runs-dir", tmp_path / "runs", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)  # stdout holds the JSON object and nothing else
    sweep_dir = tmp_path / "runs" / "grid"
    assert out == json.loads((sweep_dir / "sweep.json").read_text())
    trials = out["trials"]
    assert len(trials) == 4 and {t["status"] for t in trials} == {"completed"}
    assert sorted((t["params"]["optimizer.lr"], t["params"]["optimizer.momentum"]) for t in trials) == \
        [(0.01, 0.0), (0.01, 0.9), (0.1, 0.0), (0.1, 0.9)]
    values = [t["val_acc"] for t in trials]
    assert values == sorted(values, reverse=True) and out["best"] == trials[0]
    assert sorted(p.name for p in sweep_dir.iterdir() if (p / "summary.json").is_file()) == \
        sorted(t["trial"] for t in trials)

    # the same overrides and seed through `cnntrain train`: the same weights and metrics
    trial = trials[-1]
    train = cnntrain("train", LENET, *trial["overrides"], "--runs-dir", tmp_path / "solo", "--name",
                     "solo", "--no-plots", "--quiet", cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    ours = load_checkpoint(Path(trial["run_dir"]) / "checkpoints" / "last.npz").params
    theirs = load_checkpoint(tmp_path / "solo" / "solo" / "checkpoints" / "last.npz").params
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)

    def metrics(path):
        return [{k: v for k, v in row.items() if k != "time_s"} for row in csv.DictReader(open(path))]

    assert metrics(Path(trial["run_dir"]) / "metrics.csv") == metrics(tmp_path / "solo" / "solo" / "metrics.csv")

    runs = cnntrain("runs", sweep_dir, "--json", cwd=tmp_path)
    assert runs.returncode == 0, runs.stderr
    records = json.loads(runs.stdout)
    assert len(records) == 4 and {r["status"] for r in records} == {"completed"}
    assert {"optimizer.lr", "optimizer.momentum"} <= set(records[0]["differs"])


def test_asha_stops_a_weak_trial_early_and_leaves_a_resumable_folder(tmp_path, ray_env):
    # one trial that learns, then two that cannot (lr 1e-6), one at a time: each weak one
    # reaches the first rung (epoch 1) below the strong one's value there
    overrides = {**SAMPLE, "data.train_limit": 600, "training.batch_size": 16, "training.epochs": 4,
                 "optimizer.momentum": 0.9}
    spec = write_spec(tmp_path / "asha.yaml", name="asha", overrides=overrides,
                      search={"optimizer.lr": {"grid": [0.05, 1e-6, 1e-6]}},
                      scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2})
    result = cnntrain("sweep", spec, "--runs-dir", tmp_path / "runs", "--max-concurrent", "1",
                      "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trials = {t["params"]["optimizer.lr"]: t for t in json.loads(result.stdout)["trials"]}
    assert trials[0.05]["status"] == "completed" and trials[0.05]["epochs"] == 4
    stopped = [t for t in json.loads(result.stdout)["trials"] if t["status"] == STOPPED]
    assert stopped and all(t["params"]["optimizer.lr"] == 1e-6 and t["epochs"] < 4 for t in stopped)

    weak = Path(stopped[0]["run_dir"])
    assert json.loads((weak / "summary.json").read_text())["stopped_by"] == "asha"
    assert cnntrain("runs", tmp_path / "runs" / "asha", cwd=tmp_path).returncode == 0
    resumed = cnntrain("train", "--resume", weak, "--no-plots", "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["epochs"] == 4


def test_ctrl_c_stops_the_sweep_and_resume_finishes_it(tmp_path, ray_env):
    spec = write_spec(tmp_path / "long.yaml", name="long",
                      overrides={**SAMPLE, "data.train_limit": 200, "training.epochs": 30},
                      search={"seed": {"grid": [1, 2]}})
    sweep_dir = tmp_path / "runs" / "long"
    proc = subprocess.Popen([sys.executable, "-m", "cnntrain", "sweep", str(spec), "--runs-dir",
                             str(tmp_path / "runs"), "--max-concurrent", "1"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size > 150 for p in sweep_dir.glob("*/metrics.csv")):  # 2+ epochs
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr and proc.stderr.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.endswith(f"error: sweep interrupted; continue with: cnntrain sweep --resume {sweep_dir}\n")
    first = next(sweep_dir.glob("*/metrics.csv")).parent
    assert json.loads((first / "summary.json").read_text())["status"] == "interrupted"

    result = cnntrain("sweep", "--resume", sweep_dir, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trials = json.loads(result.stdout)["trials"]
    assert len(trials) == 2 and {t["status"] for t in trials} == {"completed"}
    for t in trials:
        epochs = [int(r["epoch"]) for r in csv.DictReader(open(Path(t["run_dir"]) / "metrics.csv"))]
        assert epochs == list(range(1, 31))
    assert json.loads((first / "summary.json").read_text())["resumed"] == 1


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_sweep_on_a_two_node_cluster(tmp_path, ray_env):
    ray = str(Path(sys.executable).parent / "ray")
    port = free_port()
    common = ["--num-cpus", "1", "--object-store-memory", "100000000", "--disable-usage-stats"]
    for cmd in ([ray, "start", "--head", "--node-ip-address", "127.0.0.1", f"--port={port}",
                 "--include-dashboard=false", *common],
                [ray, "start", f"--address=127.0.0.1:{port}", "--node-ip-address", "127.0.0.1", *common]):
        started = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert started.returncode == 0, started.stdout + started.stderr
    spec = write_spec(tmp_path / "c.yaml", name="cluster", search={"optimizer.lr": {"grid": [0.1, 0.05]}})
    result = cnntrain("sweep", spec, "--address", f"127.0.0.1:{port}", "--runs-dir",
                      tmp_path / "runs", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trials = json.loads(result.stdout)["trials"]
    assert len(trials) == 2 and {t["status"] for t in trials} == {"completed"}
    for t in trials:
        assert (Path(t["run_dir"]) / "checkpoints" / "last.npz").is_file()


def test_random_draws_follow_the_spec_seed():
    """The same spec draws the same trials: Tune's variant generator gets spec.seed."""
    pytest.importorskip("ray.tune", reason="the ray extra is not installed: pip install -e \".[ray]\"")
    from ray.tune.search.variant_generator import generate_variants

    from cnntrain.sweep import Spec, param_space

    def draws(seed):
        spec = Spec.model_validate({"base": LENET, "seed": seed, "search": {
            "optimizer.lr": {"loguniform": [1e-4, 1e-1]},
            "model.layers.ff5.units": {"randint": [60, 240]}}})
        rng = np.random.RandomState(spec.seed)
        return [cfg for _ in range(3) for _, cfg in generate_variants(param_space(spec), random_state=rng)]

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)
