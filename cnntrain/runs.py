"""Run folders and the files in them: config.yaml, metrics.csv, summary.json."""

import csv
import json
from pathlib import Path

from .checkpoint import write_atomic

METRICS_COLUMNS = ("epoch", "time_s", "lr", "train_loss", "train_acc", "val_loss", "val_acc")


def claim_run_dir(runs_dir, name, exist_ok=False):
    """Create and return runs_dir/name, or name2, name3, ... if taken.

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


def write_text(path, text):
    write_atomic(path, lambda f: f.write(text.encode()))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def append_metrics(path, row):
    """Append one epoch's row, writing the header first if the file is new."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: _fmt(row.get(k)) for k in METRICS_COLUMNS})


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v
