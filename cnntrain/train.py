"""The training and evaluation loops: the seed's train(input, label) = forward; backward;
updateWeights, over shuffled batches, with a validation pass per epoch and a test pass
at the end. No argument parsing or printing here: progress goes to a `report` callback.

A run can stop and go on. `last.npz` carries, besides weights and momentum buffers, a
RunState: epochs and steps done, the batches done in an unfinished epoch, the shuffle
generator's state at that epoch's start (so its permutation can be drawn again) and the
epoch's running sums. A resumed run therefore takes exactly the steps the uninterrupted
run would have taken, and ends with bitwise-identical weights.
"""

import itertools
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from . import __version__
from .checkpoint import load_checkpoint, save_checkpoint
from .data.batches import iterate_batches, num_batches, split_validation
from .engine.loss import softmax_cross_entropy
from .engine.malloc import keep_freed_memory
from .engine.model import ShapeError, build_model
from .engine.optim import SGD
from .memory import run_peak_rss_mib
from .runs import append_metrics, write_json, write_text


class DataMismatch(ValueError):
    """The data does not fit the model (image shape or number of classes)."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run after a step; last.npz can resume it."""

    def __init__(self, request, epoch, step, run_dir):
        self.exit_code = request.exit_code
        super().__init__(
            f"interrupted by {request.name} in epoch {epoch}, after step {step}; saved "
            f"{Path(run_dir) / 'checkpoints' / 'last.npz'}; continue with: "
            f"cnntrain train --resume {run_dir}")


@dataclass
class RunState:
    """Everything besides weights and momentum that continuing a run needs; stored in
    last.npz's metadata under "resume". Plain JSON values only."""

    epoch: int = 0                  # epochs completed
    step: int = 0                   # optimizer steps taken, all epochs
    batch: int = 0                  # batches already done in epoch + 1 (an interrupted epoch)
    rng: Optional[dict] = None      # shuffle generator state at the start of epoch + 1
    seen: int = 0                   # epoch + 1 so far: images, summed loss, right answers
    loss_sum: float = 0.0
    correct: int = 0
    epoch_seconds: float = 0.0
    train_seconds: float = 0.0      # time in training steps, all sessions
    wall_seconds: float = 0.0       # wall time of the sessions before this one
    best_epoch: Optional[int] = None
    best_val_acc: Optional[float] = None
    last_row: Optional[dict] = None  # metrics.csv row of the last completed epoch


def make_model(cfg, seed_rng=None):
    """Build the network a config describes, with its initial weights drawn from the seed."""
    keep_freed_memory()  # this process is about to run the engine: see engine/malloc.py
    model_cfg = cfg["model"]
    rng = seed_rng if seed_rng is not None else init_rng(cfg["seed"])
    return build_model(model_cfg["layers"], model_cfg["input"], model_cfg["dtype"], rng,
                       workers=worker_threads(cfg["training"].get("threads")))


def worker_threads(threads):
    """training.threads, or one per core this process may use, at most 4 (null)."""
    if threads:
        return threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def init_rng(seed):
    # Two independent streams from one seed: weights, and the epochs' shuffles. Changing
    # the number of epochs or the batch size then never changes the initial weights.
    return np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0])


def shuffle_rng(seed):
    return np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])


def learning_rate(opt, epoch, epochs):
    """The learning rate of `epoch` (1-based) under optimizer.schedule."""
    lr = opt["lr"]
    if opt["schedule"] == "step":
        return lr * opt["gamma"] ** ((epoch - 1) // opt["step_size"])
    if opt["schedule"] == "cosine":  # lr at epoch 1, approaching min_lr at the end
        return opt["min_lr"] + (lr - opt["min_lr"]) * (1 + math.cos(math.pi * (epoch - 1) / epochs)) / 2
    return lr


def prepare_data(cfg, dataset, model):
    """Apply train_limit, test_limit and the validation split; check the data fits the
    model. Returns dict of (images uint8 (N, H, W), labels) for train, val and test."""
    d = cfg["data"]
    train_x, train_y = dataset.train_images, dataset.train_labels
    test_x, test_y = dataset.test_images, dataset.test_labels
    if d.get("train_limit"):
        train_x, train_y = train_x[:d["train_limit"]], train_y[:d["train_limit"]]
    if d.get("test_limit"):
        test_x, test_y = test_x[:d["test_limit"]], test_y[:d["test_limit"]]
    c, h, w = model.input_shape
    if c != 1 or train_x.shape[1:] != (h, w):
        raise DataMismatch(
            f"model.input is {[c, h, w]} but the data's images are 1x{train_x.shape[1]}x"
            f"{train_x.shape[2]} (channels x height x width)")
    classes = model.layers[-1].out_shape[0]
    top = int(max(train_y.max(), test_y.max()))
    if top >= classes:
        raise DataMismatch(f"the output layer has {classes} units but the data has label {top}")
    n_train, n_val = split_validation(len(train_x), d["validation"])
    return {
        "train": (train_x[:n_train], train_y[:n_train]),
        "val": (train_x[n_train:], train_y[n_train:]),
        "test": (test_x, test_y),
    }


def evaluate(model, images, labels, batch_size):
    """Mean loss and accuracy over a whole uint8 set, in inference mode (no caches)."""
    loss, acc, _ = evaluate_with_confusion(model, images, labels, batch_size)
    return loss, acc


def evaluate_with_confusion(model, images, labels, batch_size):
    """(mean loss, accuracy, confusion matrix) in one pass; the matrix is (K, K) counts,
    row = true label, column = predicted label. (None, None, zeros) for an empty set."""
    classes = model.layers[-1].out_shape[0]
    matrix = np.zeros((classes, classes), dtype=np.int64)
    if len(images) == 0:
        return None, None, matrix
    total_loss, correct = 0.0, 0
    for x, y in iterate_batches(images, labels, batch_size, model.dtype):
        logits = model.predict(x)
        loss, _, _ = softmax_cross_entropy(logits, y)
        total_loss += loss * len(y)
        pred = logits.argmax(axis=1)
        correct += int(np.count_nonzero(pred == y))
        np.add.at(matrix, (y, pred), 1)
    return total_loss / len(images), correct / len(images), matrix


def _silent(event, **kw):
    pass


def train(cfg, model, splits, run_dir, data_info, report=_silent, config_yaml=None, *,
          stop=None, state=None, velocity=None, summary=None, restore_rows=(), plots=True):
    """Train `model` as the resolved config `cfg` (a plain dict) says, writing every file
    of the run into run_dir. Returns the summary dict (also written as summary.json).

    A resumed run passes `state` and `velocity` (the momentum buffers) from last.npz, with
    the model already holding last.npz's weights, `summary` (the run's summary so far) and
    `restore_rows` (metrics rows the checkpoint has but metrics.csv lost to a kill).
    `stop` (an interrupt.StopRequest) is checked after every step. plots=False skips
    results.png and confusion_matrix.png.

    report(event, **fields) receives "epoch_start", "batch", "epoch_end" and "note".
    Raises FloatingPointError (diverged), Interrupted or any error, each after writing
    summary.json with the run's status.
    """
    run_dir = Path(run_dir)
    opt_cfg, tr = cfg["optimizer"], cfg["training"]
    optimizer = SGD(model.params(), model.grads(), opt_cfg["lr"], opt_cfg["momentum"],
                    opt_cfg["weight_decay"])
    if velocity:
        optimizer.load_state(velocity)
    state = state if state is not None else RunState()
    rng = shuffle_rng(cfg["seed"]) if cfg["data"]["shuffle"] else None
    if rng is not None and state.rng is not None:
        rng.bit_generator.state = state.rng
    train_x = splits["train"][0]
    if config_yaml is not None:
        write_text(run_dir / "config.yaml", config_yaml)
    summary = {**(summary or {}),
               "name": cfg["name"], "status": "running", "seed": cfg["seed"],
               "cnntrain_version": __version__, "data": data_info,
               "train_images": len(train_x), "val_images": len(splits["val"][0]),
               "test_images": len(splits["test"][0]), "planned_epochs": tr["epochs"],
               "run_dir": str(run_dir)}
    overrides = summary.setdefault("overrides", [])
    write_text(run_dir / "overrides.txt", "".join(f"{o}\n" for o in overrides))
    for row in restore_rows:
        append_metrics(run_dir / "metrics.csv", row)
    started = time.perf_counter()

    def elapsed():
        return state.wall_seconds + time.perf_counter() - started

    def write_summary(status, **fields):
        summary.update(status=status, epochs=state.epoch, steps=state.step,
                       best_epoch=state.best_epoch, best_val_acc=state.best_val_acc,
                       wall_time_s=round(elapsed(), 3), **fields)
        write_json(run_dir / "summary.json", summary)

    write_summary("running")
    try:
        # Overflow on the way to a NaN is reported once, as divergence, not as warnings.
        with np.errstate(over="ignore", invalid="ignore"):
            stopped_early = _epochs(model, optimizer, splits, run_dir, cfg, state, rng, report,
                                    stop, elapsed, lambda: write_summary("running"))
    except FloatingPointError as e:
        write_summary("diverged", error=str(e))
        raise
    except Interrupted:
        write_summary("interrupted", interrupted_by=stop.name)
        raise
    except KeyboardInterrupt:  # a second Ctrl-C: last.npz is the last epoch's, or a stop's
        write_summary("interrupted", interrupted_by="SIGINT")
        raise
    except Exception as e:
        write_summary("failed", error=f"{type(e).__name__}: {e}")
        raise

    # test the last weights, then the best ones (highest validation accuracy) if they differ
    eval_bs = tr["eval_batch_size"]
    last_loss, last_acc, last_matrix = evaluate_with_confusion(model, *splits["test"], eval_bs)
    best_path = run_dir / "checkpoints" / "best.npz"
    test_loss, test_acc, matrix = last_loss, last_acc, last_matrix
    if state.best_epoch is not None and state.best_epoch != state.epoch:
        model.load_params(load_checkpoint(best_path).params)
        test_loss, test_acc, matrix = evaluate_with_confusion(model, *splits["test"], eval_bs)
    with_best = state.best_epoch is not None
    last_row = state.last_row or {}
    write_summary(
        "completed", stopped_early=stopped_early,
        test_checkpoint="best" if with_best else "last",
        checkpoint=str(best_path if with_best else run_dir / "checkpoints" / "last.npz"),
        test_loss=test_loss, test_acc=test_acc,
        final_test_loss=last_loss, final_test_acc=last_acc,
        final_train_loss=last_row.get("train_loss"), final_val_acc=last_row.get("val_acc"),
        train_images_per_s=round(len(train_x) * state.epoch / state.train_seconds, 1)
        if state.train_seconds else None,
        peak_rss_mib=round(run_peak_rss_mib(model), 1),
        test_confusion_matrix=matrix.tolist())
    model.close()  # the helper processes are done: gone before the plots' memory comes

    if plots:
        from .plots import draw_run_plots

        note = draw_run_plots(run_dir, matrix, data_info.get("dataset"))
        if note:
            report("note", text=note)
    return summary


def _epochs(model, optimizer, splits, run_dir, cfg, state, rng, report, stop, elapsed,
            epoch_done):
    """The epochs from state.epoch + 1 on, updating `state`; True if early stopping ended them."""
    tr = cfg["training"]
    epochs, batch_size, eval_bs, patience = (tr["epochs"], tr["batch_size"],
                                             tr["eval_batch_size"], tr["patience"])
    train_x, train_y = splits["train"]
    steps_per_epoch = num_batches(len(train_x), batch_size)
    last_path, best_path = run_dir / "checkpoints" / "last.npz", run_dir / "checkpoints" / "best.npz"

    def save(path, row=None):
        resume = {**asdict(state), "wall_seconds": elapsed()}
        save_checkpoint(path, model.params(),
                        {"config": cfg, "epoch": state.epoch, "step": state.step, "metrics": row,
                         "cnntrain_version": __version__, "resume": resume},
                        optimizer.state())

    for epoch in range(state.epoch + 1, epochs + 1):
        if patience is not None and state.best_epoch is not None and epoch - 1 - state.best_epoch >= patience:
            return True

        # train: forward, backward, update, one batch at a time
        lr = learning_rate(cfg["optimizer"], epoch, epochs)
        report("epoch_start", epoch=epoch, epochs=epochs, steps=steps_per_epoch, done=state.batch)
        epoch_rng = rng.bit_generator.state if rng is not None else None  # before the permutation
        # a resumed epoch draws the same permutation again and skips the batches already done
        batches = itertools.islice(
            iterate_batches(train_x, train_y, batch_size, model.dtype, rng), state.batch, None)
        t0 = time.perf_counter()
        for x, y in batches:
            loss, logits = model.loss(x, y)
            if not np.isfinite(loss):
                kept = (f"checkpoints/last.npz keeps epoch {state.epoch}" if state.epoch
                        else "no checkpoint was written")
                raise FloatingPointError(
                    f"the loss became {loss} at epoch {epoch}, step {state.step + 1} (batch "
                    f"{state.batch + 1} of {steps_per_epoch}): try a smaller optimizer.lr "
                    f"(now {lr:g}); {kept}")
            optimizer.step(lr=lr)
            state.step += 1
            state.batch += 1
            state.seen += len(y)
            state.loss_sum += loss * len(y)
            state.correct += int(np.count_nonzero(logits.argmax(axis=1) == y))
            report("batch", loss=loss)
            if stop and state.batch < steps_per_epoch:
                seconds = time.perf_counter() - t0
                state.epoch_seconds += seconds
                state.train_seconds += seconds
                state.rng = epoch_rng
                save(last_path)
                raise Interrupted(stop, epoch, state.step, run_dir)
        seconds = time.perf_counter() - t0
        state.train_seconds += seconds

        # validate and record
        val_loss, val_acc = evaluate(model, *splits["val"], eval_bs)
        row = {"epoch": epoch, "time_s": round(state.epoch_seconds + seconds, 3), "lr": lr,
               "train_loss": state.loss_sum / state.seen, "train_acc": state.correct / state.seen,
               "val_loss": val_loss, "val_acc": val_acc}
        improved = val_acc is not None and (state.best_val_acc is None or val_acc > state.best_val_acc)
        if improved:
            state.best_epoch, state.best_val_acc = epoch, val_acc
        state.epoch, state.batch, state.last_row = epoch, 0, row
        state.seen, state.loss_sum, state.correct, state.epoch_seconds = 0, 0.0, 0, 0.0
        state.rng = rng.bit_generator.state if rng is not None else None

        # checkpoints first, then the metrics row: a kill in between loses the row, which
        # a resume restores from last.npz; metrics.csv never gets ahead of the checkpoint
        if improved:
            save(best_path, row)
        save(last_path, row)
        append_metrics(run_dir / "metrics.csv", row)
        epoch_done()
        report("epoch_end", **row, epochs=epochs)
        if stop:
            raise Interrupted(stop, epoch, state.step, run_dir)
    return False


__all__ = ["DataMismatch", "Interrupted", "RunState", "ShapeError",
           "evaluate", "evaluate_with_confusion", "learning_rate", "make_model",
           "prepare_data", "train"]
