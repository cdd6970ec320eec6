"""The training and evaluation loops: the seed's train(input, label) = forward; backward;
updateWeights, over shuffled batches, with a validation pass per epoch and a test pass
at the end. No argument parsing or printing here: progress goes to a `report` callback.
"""

import time

import numpy as np

from . import __version__
from .checkpoint import save_checkpoint
from .data.batches import iterate_batches, num_batches, split_validation
from .engine.loss import softmax_cross_entropy
from .engine.model import ShapeError, build_model
from .engine.optim import SGD
from .runs import append_metrics, write_json, write_text


class DataMismatch(ValueError):
    """The data does not fit the model (image shape or number of classes)."""


def make_model(cfg, seed_rng=None):
    """Build the network a config describes, with its initial weights drawn from the seed."""
    model_cfg = cfg["model"]
    rng = seed_rng if seed_rng is not None else init_rng(cfg["seed"])
    return build_model(model_cfg["layers"], model_cfg["input"], model_cfg["dtype"], rng)


def init_rng(seed):
    # Two independent streams from one seed: weights, and the epochs' shuffles. Changing
    # the number of epochs or the batch size then never changes the initial weights.
    return np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0])


def shuffle_rng(seed):
    return np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])


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
    if len(images) == 0:
        return None, None
    total_loss, correct = 0.0, 0
    for x, y in iterate_batches(images, labels, batch_size, model.dtype):
        logits = model.forward(x, train=False)
        loss, _, _ = softmax_cross_entropy(logits, y)
        total_loss += loss * len(y)
        correct += int(np.count_nonzero(logits.argmax(axis=1) == y))
    return total_loss / len(images), correct / len(images)


def confusion_matrix(model, images, labels, batch_size, classes):
    """(classes, classes) counts: row = true label, column = predicted label."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    for x, y in iterate_batches(images, labels, batch_size, model.dtype):
        pred = model.forward(x, train=False).argmax(axis=1)
        np.add.at(matrix, (y, pred), 1)
    return matrix


def train(cfg, model, splits, run_dir, data_info, report=lambda event, **kw: None,
          config_yaml=None):
    """Train `model` as the resolved config `cfg` (a plain dict) says, writing every file
    of the run into run_dir. Returns the summary dict (also written as summary.json).

    report(event, **fields) receives "epoch_start", "batch", "epoch_end" events for
    whoever shows progress.
    """
    opt_cfg, tr = cfg["optimizer"], cfg["training"]
    epochs, eval_bs = tr["epochs"], tr["eval_batch_size"]
    optimizer = SGD(model.params(), model.grads(), opt_cfg["lr"], opt_cfg["momentum"],
                    opt_cfg["weight_decay"])
    rng = shuffle_rng(cfg["seed"]) if cfg["data"]["shuffle"] else None
    train_x = splits["train"][0]
    steps_per_epoch = num_batches(len(train_x), tr["batch_size"])
    if config_yaml is not None:
        write_text(run_dir / "config.yaml", config_yaml)
    summary = {
        "name": cfg["name"], "status": "running", "seed": cfg["seed"],
        "cnntrain_version": __version__, "data": data_info,
        "train_images": len(train_x), "val_images": len(splits["val"][0]),
        "test_images": len(splits["test"][0]),
    }
    write_json(run_dir / "summary.json", summary)

    started = time.perf_counter()
    try:
        # Overflow on the way to a NaN is reported once, as divergence, not as warnings.
        with np.errstate(over="ignore", invalid="ignore"):
            history, step, train_seconds = _epochs(
                model, optimizer, splits, run_dir, cfg, rng, report, steps_per_epoch)
    except FloatingPointError:
        summary.update(status="diverged", wall_time_s=round(time.perf_counter() - started, 3))
        write_json(run_dir / "summary.json", summary)
        raise

    # test the final weights
    test_loss, test_acc = evaluate(model, *splits["test"], eval_bs)
    summary.update({
        "status": "completed", "epochs": epochs, "steps": step,
        "test_loss": test_loss, "test_acc": test_acc,
        "final_train_loss": history[-1]["train_loss"], "final_val_acc": history[-1]["val_acc"],
        "wall_time_s": round(time.perf_counter() - started, 3),
        "train_images_per_s": round(len(train_x) * epochs / train_seconds, 1),
        "checkpoint": str(run_dir / "checkpoints" / "last.npz"),
        "run_dir": str(run_dir),
    })
    write_json(run_dir / "summary.json", summary)
    return summary


def _epochs(model, optimizer, splits, run_dir, cfg, rng, report, steps_per_epoch):
    """The epochs themselves; returns (history rows, steps taken, seconds spent training)."""
    epochs, batch_size = cfg["training"]["epochs"], cfg["training"]["batch_size"]
    eval_bs, lr = cfg["training"]["eval_batch_size"], cfg["optimizer"]["lr"]
    train_x, train_y = splits["train"]
    train_seconds, step, history = 0.0, 0, []
    for epoch in range(1, epochs + 1):
        # train: forward, backward, update, one batch at a time
        report("epoch_start", epoch=epoch, epochs=epochs, steps=steps_per_epoch)
        t0 = time.perf_counter()
        seen, loss_sum, correct = 0, 0.0, 0
        for x, y in iterate_batches(train_x, train_y, batch_size, model.dtype, rng):
            loss, logits = model.loss(x, y)
            if not np.isfinite(loss):
                raise FloatingPointError(
                    f"the loss became {loss} at epoch {epoch}, step {step + 1}: "
                    f"try a smaller optimizer.lr (now {lr})")
            optimizer.step()
            step += 1
            seen += len(y)
            loss_sum += loss * len(y)
            correct += int(np.count_nonzero(logits.argmax(axis=1) == y))
            report("batch", loss=loss)
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds

        # validate, record, checkpoint
        val_loss, val_acc = evaluate(model, *splits["val"], eval_bs)
        row = {"epoch": epoch, "time_s": round(epoch_seconds, 3), "lr": lr,
               "train_loss": loss_sum / seen, "train_acc": correct / seen,
               "val_loss": val_loss, "val_acc": val_acc}
        history.append(row)
        append_metrics(run_dir / "metrics.csv", row)
        save_checkpoint(run_dir / "checkpoints" / "last.npz", model.params(),
                        {"config": cfg, "epoch": epoch, "step": step, "metrics": row,
                         "cnntrain_version": __version__},
                        optimizer.state())
        report("epoch_end", **row, epochs=epochs)

    return history, step, train_seconds


__all__ = ["DataMismatch", "ShapeError", "confusion_matrix", "evaluate", "make_model",
           "prepare_data", "train"]
