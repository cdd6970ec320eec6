"""Run folders under pressure: 32 processes at once, kill -9 at random moments, folders
reused on purpose, divergence, the `runs` table and the sweep example."""

import csv
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnntrain.checkpoint import load_checkpoint
from cnntrain.runs import claim_run_dir, flatten_config
from test_cli import LENET, ROOT, cnntrain

TINY = ["data.dataset=mnist-sample", "data.train_limit=200", "data.test_limit=100",
        "data.validation=50", "training.epochs=1", "--no-plots", "--quiet"]


def _claim(barrier, queue, runs_dir):
    barrier.wait()  # all 32 call mkdir at the same moment
    queue.put(str(claim_run_dir(runs_dir, "sweep")))


def test_32_processes_started_at_once_get_32_folders(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(32), ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(barrier, queue, tmp_path)) for _ in range(32)]
    for p in procs:
        p.start()
    folders = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(set(folders)) == 32
    assert sorted(Path(f).name for f in folders) == sorted(["sweep"] + [f"sweep{n}" for n in range(2, 33)])


def test_kill_9_at_random_moments_never_leaves_an_unreadable_checkpoint(tmp_path):
    """Epochs of 64 images: checkpoints are written all the time, and a SIGKILL lands
    in the middle of one often. Each kill is followed by a resume, killed in turn."""
    rng = random.Random(4)
    args = ["data.dataset=mnist-sample", "data.train_limit=64", "data.validation=0",
            "data.test_limit=50", "training.batch_size=32", "training.epochs=100000", "--no-plots",
            "--quiet"]
    run = tmp_path / "lenet"
    last = run / "checkpoints" / "last.npz"
    epochs_seen = []
    for attempt in range(6):
        cmd = (["train", LENET, *args, "--runs-dir", tmp_path] if attempt == 0
               else ["train", "--resume", run, "--no-plots", "--quiet"])
        proc = subprocess.Popen([sys.executable, "-m", "cnntrain", *map(str, cmd)], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        start_mtime = last.stat().st_mtime_ns if last.exists() else 0
        deadline = time.monotonic() + 60
        while not (last.exists() and last.stat().st_mtime_ns != start_mtime):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()
        ckpt = load_checkpoint(last)  # raises on a torn file
        epochs_seen.append(ckpt.metadata["epoch"])
        assert ckpt.metadata["resume"]["batch"] == 0  # only epoch ends are saved, without a signal
    assert epochs_seen == sorted(epochs_seen) and epochs_seen[-1] > epochs_seen[0]
    # A last resume to the end: metrics.csv holds every epoch once, in order.
    done = load_checkpoint(last).metadata["epoch"]
    final = cnntrain("train", "--resume", run, f"training.epochs={done + 1}", "--json", "--no-plots",
                     cwd=tmp_path)
    assert final.returncode == 0, final.stderr
    assert json.loads(final.stdout)["status"] == "completed"
    epochs = [int(r["epoch"]) for r in csv.DictReader(open(run / "metrics.csv"))]
    assert epochs == list(range(1, done + 2))
    assert not list(run.rglob("*.tmp"))  # what the kills left behind was cleaned up


def test_exist_ok_reuses_the_folder_on_purpose(tmp_path):
    first = cnntrain("train", LENET, *TINY, "seed=1", "--exist-ok", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "runs" / "lenet"
    (run / "notes.txt").write_text("mine")
    second = cnntrain("train", LENET, *TINY, "seed=2", "--exist-ok", "--json", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["lenet"]
    assert json.loads((run / "summary.json").read_text())["seed"] == 2
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 1  # the first run's row is gone
    assert (run / "notes.txt").read_text() == "mine"  # files cnntrain did not write are kept
    from cnntrain.runs import run_lock
    with run_lock(run):  # a run in progress is never overwritten
        busy = cnntrain("train", LENET, *TINY, "--exist-ok", cwd=tmp_path)
    assert busy.returncode == 1 and "another cnntrain process is training" in busy.stderr


def test_divergence_names_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # epoch 1 at lr 0.01 is fine; epoch 2's lr is 1e5
    result = cnntrain("train", LENET, *TINY, "training.epochs=3", "optimizer.lr=0.01",
                      "optimizer.schedule=step", "optimizer.step_size=1", "optimizer.gamma=1e7",
                      cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    errors = [e for e in result.stderr.splitlines() if e.startswith("error:")]
    assert len(errors) == 1 and "at epoch 2, step " in errors[0]
    assert "checkpoints/last.npz keeps epoch 1" in errors[0] and "(now 100000)" in errors[0]
    run = tmp_path / "runs" / "lenet"
    assert load_checkpoint(run / "checkpoints" / "last.npz").metadata["epoch"] == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["epochs"] == 1
    assert "epoch 2" in summary["error"]
    assert [r["epoch"] for r in csv.DictReader(open(run / "metrics.csv"))] == ["1"]


def test_flatten_config_names_layers():
    flat = flatten_config({"optimizer": {"lr": 0.1}, "model": {"layers": [{"name": "ff5", "units": 3}]}})
    assert flat == {"optimizer.lr": 0.1, "model.layers.ff5.name": "ff5", "model.layers.ff5.units": 3}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """examples/sweep.sh end to end: a 2 x 2 grid on a few bundled images, 4 at a time."""
    tmp = tmp_path_factory.mktemp("sweep")
    env = {**os.environ, "CONFIG": LENET, "RUNS": str(tmp / "sweep"), "LRS": "0.05 0.2",
           "BATCH_SIZES": "16 64", "JOBS": "4", "CNNTRAIN": f"{sys.executable} -m cnntrain",
           "COLUMNS": "200"}
    result = subprocess.run(["bash", str(ROOT / "examples" / "sweep.sh"), *TINY[:-2],
                             "training.epochs=2", "--no-plots"], cwd=tmp, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return tmp / "sweep", result


def test_the_sweep_example_runs_the_grid_and_prints_the_table(sweep):
    folder, result = sweep
    names = ["lr0.05-bs16", "lr0.05-bs64", "lr0.2-bs16", "lr0.2-bs64"]
    assert sorted(p.name for p in folder.iterdir()) == names
    table = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert len(table) == 4
    accs = {n: json.loads((folder / n / "summary.json").read_text())["test_acc"] for n in names}
    order = [line.split("│")[1].strip() for line in table]
    assert [accs[n] for n in order] == sorted(accs.values(), reverse=True)  # best first
    assert "optimizer.lr" in result.stdout and "training.batch_size" in result.stdout
    assert "training.epochs" not in result.stdout  # the same in every run: not a column


def test_runs_json_and_sort_keys(sweep):
    folder, _ = sweep
    out = cnntrain("runs", folder, "--json", "--sort", "optimizer.lr", cwd=folder)
    assert out.returncode == 0, out.stderr
    runs = json.loads(out.stdout)
    assert [r["differs"]["optimizer.lr"] for r in runs] == [0.05, 0.05, 0.2, 0.2]
    assert set(runs[0]["differs"]) == {"optimizer.lr", "training.batch_size"}
    assert runs[0]["status"] == "completed" and runs[0]["epochs"] == 2
    assert runs[0]["overrides"][-2:] == ["optimizer.lr=0.05", "training.batch_size=16"]
    bad = cnntrain("runs", folder, "--sort", "nope", cwd=folder)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --sort nope: expected one of run,")
    missing = cnntrain("runs", folder / "nope", cwd=folder)
    assert missing.returncode == 1 and "no such folder" in missing.stderr


def test_runs_shows_a_killed_run(tmp_path):
    run = tmp_path / "x"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"status": "running", "epochs": 1}))
    (run / "config.yaml").write_text("name: x\n")
    out = cnntrain("runs", tmp_path, "--json", cwd=tmp_path)
    assert json.loads(out.stdout)[0]["status"] == "killed"  # says running, but nobody holds it
