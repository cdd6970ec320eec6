"""Continuing a run from its folder (`cnntrain train --resume RUN_DIR`).

The run's config.yaml, with any KEY=VALUE overrides applied, rebuilds the network;
checkpoints/last.npz gives the weights, momentum buffers and RunState. Everything is
checked before anything in the folder is touched: the checkpoint must belong to the
run, carry what resuming needs, and the data found now must be the data the run used.
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .checkpoint import load_checkpoint
from .config import Config, ConfigError, load_config
from .data.batches import num_batches
from .runs import flatten_config, read_metrics
from .train import RunState, ShapeError, make_model

# Keys a resume may change: they act only on the epochs still to come. Every other key
# decides what the saved weights, momentum and shuffle position mean.
RESUMABLE_KEYS = ("training.epochs", "training.patience", "training.eval_batch_size",
                  "training.threads", "data.test_limit", "data.mirrors", "optimizer.lr",
                  "optimizer.schedule", "optimizer.step_size", "optimizer.gamma", "optimizer.min_lr")


class ResumeError(Exception):
    """A run that cannot be continued as asked; exit_code 2 for bad usage, 1 otherwise."""

    def __init__(self, message, exit_code=1):
        self.exit_code = exit_code
        super().__init__(message)


@dataclass
class Resume:
    cfg_obj: Config
    cfg: dict
    model: object
    state: RunState
    velocity: dict
    summary: dict
    restore_rows: list


def _frozen_difference(a, b):
    """The first non-resumable dotted key whose value differs between two configs."""
    fa, fb = flatten_config(a), flatten_config(b)
    for key in sorted(set(fa) | set(fb)):
        if key != "name" and key not in RESUMABLE_KEYS and fa.get(key) != fb.get(key):
            return key, fa.get(key), fb.get(key)
    return None


def prepare_resume(run_dir, overrides):
    """Everything a resumed run needs, checked; ResumeError, ConfigError or CheckpointError."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ResumeError(f"{run_dir}: not a run folder (no config.yaml)")
    base = load_config(config_path).to_dict()
    cfg_obj = load_config(config_path, overrides)
    cfg = cfg_obj.to_dict()
    changed = _frozen_difference(base, cfg)
    if changed:
        key, was, now = changed
        raise ResumeError(
            f"--resume {run_dir}: {key} cannot change when resuming (the run was trained with "
            f"{json.dumps(was)}, not {json.dumps(now)}); only {', '.join(RESUMABLE_KEYS)} can", 2)

    last = run_dir / "checkpoints" / "last.npz"
    if not last.exists():
        raise ResumeError(f"{run_dir}: nothing to resume: the run stopped before its first "
                          "checkpoint; start it again")
    ckpt = load_checkpoint(last)
    try:
        stored = Config.from_dict(ckpt.metadata["config"], source=f"{last} (stored config)").to_dict()
    except ConfigError as e:
        raise ResumeError(str(e)) from None
    mismatch = _frozen_difference(stored, base)
    if mismatch:
        key, theirs, ours = mismatch
        raise ResumeError(f"{last}: does not belong to this run: its {key} is "
                          f"{json.dumps(theirs)} but {config_path} says {json.dumps(ours)}")

    state = _run_state(ckpt.metadata.get("resume"), last, cfg)
    model = make_model(cfg)
    try:
        model.load_params(ckpt.params)
    except ShapeError as e:
        raise ResumeError(f"{last}: {e}") from None
    params = model.params()
    for name, v in ckpt.optimizer.items():
        if name not in params or v.shape != params[name].shape:
            raise ResumeError(f"{last}: optimizer state {name!r} does not fit the model")
    if cfg["optimizer"]["momentum"] and state.step:
        missing = [name for name in params if name not in ckpt.optimizer]
        if missing:
            raise ResumeError(f"{last}: optimizer.momentum is {cfg['optimizer']['momentum']:g} but "
                              f"the checkpoint has no momentum buffer for {', '.join(missing)}")

    summary_path = run_dir / "summary.json"
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        summary = {}
    epochs = cfg["training"]["epochs"]
    if state.epoch > epochs or (state.epoch == epochs and state.batch):
        raise ResumeError(f"--resume {run_dir}: training.epochs={epochs} but the run has "
                          f"already done {state.epoch} epochs", 2)
    if state.epoch == epochs and summary.get("status") == "completed":
        raise ResumeError(f"--resume {run_dir}: the run completed all {epochs} epochs; raise "
                          f"training.epochs to train on, e.g. training.epochs={epochs + 5}", 2)

    # metrics.csv may lack the checkpoint's own row (a kill between the two writes), but it
    # never has rows past it; anything else means the files do not belong together
    metrics = run_dir / "metrics.csv"
    done = [row["epoch"] for row in read_metrics(metrics)]
    restore = []
    if done and done[-1] > state.epoch:
        raise ResumeError(f"{metrics}: has rows up to epoch {done[-1]} but {last} is from "
                          f"epoch {state.epoch}")
    if state.epoch and (not done or done[-1] < state.epoch):
        if (done[-1] if done else 0) != state.epoch - 1 or state.last_row is None:
            raise ResumeError(f"{metrics}: ends at epoch {done[-1] if done else 0} but {last} is "
                              f"from epoch {state.epoch}")
        restore = [state.last_row]

    summary["overrides"] = list(summary.get("overrides", [])) + list(overrides)
    summary["resumed"] = summary.get("resumed", 0) + 1
    for stale in ("error", "interrupted_by"):
        summary.pop(stale, None)
    return Resume(cfg_obj, cfg, model, state, dict(ckpt.optimizer), summary, restore)


def _run_state(meta, path, cfg):
    if not isinstance(meta, dict):
        raise ResumeError(f"{path}: has no resume state (not written by `cnntrain train`?); "
                          f"use it with --init to start a new run from its weights")
    known = {f.name for f in fields(RunState)}
    unknown = sorted(set(meta) - known)
    if unknown:
        raise ResumeError(f"{path}: unknown resume state entries: {', '.join(unknown)}")
    state = RunState(**meta)
    for name in ("epoch", "step", "batch", "seen", "correct"):
        value = getattr(state, name)
        if type(value) is not int or value < 0:
            raise ResumeError(f"{path}: resume state {name} must be an integer >= 0, got {value!r}")
    if cfg["data"]["shuffle"]:
        try:  # the state of the PCG64 generator behind np.random.default_rng
            np.random.default_rng().bit_generator.state = state.rng
        except (TypeError, ValueError, KeyError) as e:
            raise ResumeError(f"{path}: resume state rng is not a PCG64 state ({e})") from None
    return state


def check_fits(resume, run_dir, summary_data, data_info, n_train):
    """The data found now must be what the run trained on, and the saved position in
    the epoch must exist in it."""
    for key in ("dataset", "train", "test", "image_shape"):
        if key in summary_data and summary_data[key] != data_info[key]:
            raise ResumeError(f"--resume {run_dir}: the run trained on {summary_data.get('dataset')} "
                              f"({summary_data.get('train')} training images) but now finds "
                              f"{data_info['dataset']} ({data_info['train']})")
    steps = num_batches(n_train, resume.cfg["training"]["batch_size"])
    if resume.state.batch >= steps:
        raise ResumeError(f"--resume {run_dir}: the checkpoint is at batch {resume.state.batch} "
                          f"of an epoch that has only {steps}")
