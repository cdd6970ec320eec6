"""Run folders and the files in them: config.yaml, overrides.txt, metrics.csv,
summary.json, checkpoints/, plots; the lock a training process holds on its folder; and
the table of every run in a folder that `cnntrain runs` shows."""

import csv
import io
import json
import os
from pathlib import Path

from .checkpoint import write_atomic

METRICS_COLUMNS = ("epoch", "time_s", "lr", "train_loss", "train_acc", "val_loss", "val_acc")
# What a run writes; `--exist-ok` removes these (and nothing else) before reusing a folder.
RUN_FILES = ("config.yaml", "overrides.txt", "metrics.csv", "summary.json", "results.png",
             "confusion_matrix.png", "checkpoints/last.npz", "checkpoints/best.npz")
LOCK_FILE = ".lock"


class RunBusy(Exception):
    """Another process is training in this run folder."""


def claim_run_dir(runs_dir, name, exist_ok=False):
    """Create and return runs_dir/name, or name2, name3, ... if taken; with exist_ok,
    runs_dir/name whether or not it exists.

    mkdir either creates a folder or fails because it exists, atomically, so processes
    started together each get a folder of their own without any lock.
    """
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    if exist_ok:
        path = runs_dir / name
        path.mkdir(exist_ok=True)
        return path
    n = 1
    while True:
        path = runs_dir / (name if n == 1 else f"{name}{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


def clear_run_files(run_dir):
    """Remove a previous run's files from a folder reused on purpose (`--exist-ok`)."""
    for name in RUN_FILES:
        (Path(run_dir) / name).unlink(missing_ok=True)


def remove_temporaries(run_dir):
    """Delete the temporary files a killed process left beside its checkpoints (call it
    only while holding the run's lock: a live writer's temporary looks the same)."""
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def run_lock(run_dir):
    """The lock a training process holds on its run folder, so that a second process
    (a resume, an --exist-ok run) cannot write into it at the same time. It is an flock:
    the system drops it when the process dies, even by kill -9."""
    from filelock import FileLock

    return FileLock(Path(run_dir) / LOCK_FILE, blocking=False)


def is_locked(run_dir):
    """True while some process holds the run folder's lock."""
    from filelock import Timeout

    if not (Path(run_dir) / LOCK_FILE).exists():
        return False
    lock = run_lock(run_dir)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False


def write_text(path, text):
    write_atomic(path, lambda f: f.write(text.encode()))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def append_metrics(path, row):
    """Append one epoch's row, writing the header first if the file is new."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRICS_COLUMNS)
    if new:
        writer.writeheader()
    writer.writerow({k: _fmt(row.get(k)) for k in METRICS_COLUMNS})
    # One write call in append mode: a kill leaves the row whole or absent, never half of it.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, buf.getvalue().encode())
    finally:
        os.close(fd)


def read_metrics(path):
    """metrics.csv as a list of dicts of numbers (None for empty cells); [] if absent."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        return []
    return [{k: (int(v) if k == "epoch" else float(v)) if v not in ("", None) else None
             for k, v in row.items() if k in METRICS_COLUMNS} for row in rows]


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def flatten_config(cfg, prefix=""):
    """{"optimizer.lr": 0.05, "model.layers.ff5.units": 120, ...}: the dotted keys that
    overrides use, layers by name."""
    flat = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if dotted == "model.layers" and isinstance(value, list):
            for i, layer in enumerate(value):
                label = layer.get("name", i) if isinstance(layer, dict) else i
                flat.update(flatten_config(layer, f"{dotted}.{label}.") if isinstance(layer, dict)
                            else {f"{dotted}.{label}": layer})
        elif isinstance(value, dict):
            flat.update(flatten_config(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


_MISSING = "(absent)"


def collect_runs(folder):
    """One record per run folder (a folder with a summary.json) directly inside `folder`,
    with the config keys whose values differ between the runs under "differs"."""
    import yaml

    records = []
    for run in sorted(p for p in Path(folder).iterdir() if (p / "summary.json").is_file()):
        try:
            summary = json.loads((run / "summary.json").read_text())
            cfg = yaml.safe_load((run / "config.yaml").read_text())
        except (OSError, ValueError, yaml.YAMLError):
            summary, cfg = {"status": "unreadable"}, None
        status = summary.get("status")
        # summary.json says running, but no process holds the folder: killed (kill -9, power cut)
        if status == "running" and not is_locked(run):
            status = "killed"
        records.append({
            "run": run.name, "path": str(run), "status": status,
            "epochs": summary.get("epochs"), "planned_epochs": summary.get("planned_epochs"),
            "best_epoch": summary.get("best_epoch"), "best_val_acc": summary.get("best_val_acc"),
            "test_acc": summary.get("test_acc"), "test_loss": summary.get("test_loss"),
            "images_per_s": summary.get("train_images_per_s"),
            "overrides": summary.get("overrides", []),
            "config": flatten_config(cfg) if isinstance(cfg, dict) else {},
        })
    keys = sorted({k for r in records for k in r["config"]} - {"name"})
    differing = [k for k in keys
                 if len({json.dumps(r["config"].get(k, _MISSING)) for r in records}) > 1]
    for r in records:
        r["differs"] = {k: r["config"].get(k) for k in differing}
        del r["config"]
    return records, differing
