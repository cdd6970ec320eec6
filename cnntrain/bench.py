"""Throughput of the training and evaluation loops, and the same network in PyTorch when
torch happens to be importable, timed in the same process on the same batches.

Timing method: a warm-up, then `repeats` timed passes over the same images; the median
pass is reported, since these machines are shared and noisy. Speeds are meant to be read
as ratios measured in one run, never as absolute figures from different runs.
"""

import resource
import sys
import time

import numpy as np

from .data.batches import iterate_batches
from .engine.model import build_model
from .engine.optim import SGD


def synthetic_data(n, shape, classes, seed=0):
    """Random uint8 images (n, H, W) and labels (n,): the work per image does not depend
    on what the pixels show."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, *shape), dtype=np.uint8),
            rng.integers(0, classes, size=n).astype(np.uint8))


def _median_rate(run_once, images, repeats):
    run_once()  # warm-up: first-touch allocations, BLAS thread start-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_once()
        times.append(time.perf_counter() - t0)
    return images / float(np.median(times))


def numpy_rates(cfg, images, labels, batch_sizes, eval_batch, repeats, workers):
    """{batch_size: training images/s} and evaluation images/s for cnntrain's engine."""
    model_cfg = cfg["model"]
    dtype = model_cfg["dtype"]
    train = {}
    for bs in batch_sizes:
        model = build_model(model_cfg["layers"], model_cfg["input"], dtype,
                            np.random.default_rng(0), workers)
        opt = SGD(model.params(), model.grads(), cfg["optimizer"]["lr"])

        def epoch(model=model, opt=opt, bs=bs):
            for x, y in iterate_batches(images, labels, bs, dtype):
                model.loss(x, y)
                opt.step()

        train[bs] = _median_rate(epoch, len(images), repeats)

    def evaluate():
        for x, _ in iterate_batches(images, labels, eval_batch, dtype):
            model.predict(x)

    return train, _median_rate(evaluate, len(images), repeats)


def torch_network(torch, cfg):
    """The config's network in PyTorch (full connections only), or None if it has others."""
    nn = torch.nn
    c, h, w = cfg["model"]["input"]
    layers, spatial = [], True
    for spec in cfg["model"]["layers"]:
        if spec["type"] == "conv":
            if spec.get("connections", "full") != "full":
                return None
            layers.append(nn.Conv2d(c, spec["filters"], spec["kernel"], padding=spec["padding"]))
            c = spec["filters"]
        elif spec["type"] == "maxpool":
            layers.append(nn.MaxPool2d(spec["size"]))
        else:
            if spatial:
                layers.append(nn.Flatten())
                spatial = False
            layers.append(nn.LazyLinear(spec["units"]))
        if spec.get("activation") == "relu":
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def torch_rates(cfg, images, labels, batch_sizes, eval_batch, repeats):
    """The same loops in PyTorch, fed the same float batches; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    functional = torch.nn.functional
    dtype = cfg["model"]["dtype"]
    if torch_network(torch, cfg) is None:
        return None
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    train = {}
    for bs in batch_sizes:
        torch.manual_seed(0)
        net = torch_network(torch, cfg).to(tdtype)
        net(torch.zeros((1, *cfg["model"]["input"]), dtype=tdtype))  # materialise lazy layers
        opt = torch.optim.SGD(net.parameters(), lr=cfg["optimizer"]["lr"])

        def epoch(net=net, opt=opt, bs=bs):
            for x, y in iterate_batches(images, labels, bs, dtype):
                loss = functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        train[bs] = _median_rate(epoch, len(images), repeats)

    def evaluate():
        with torch.no_grad():
            for x, _ in iterate_batches(images, labels, eval_batch, dtype):
                net(torch.from_numpy(x))

    return {"train": train, "eval": _median_rate(evaluate, len(images), repeats),
            "version": torch.__version__, "threads": torch.get_num_threads()}


def peak_rss_mib():
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run_bench(cfg, batch_sizes, images=4096, repeats=5, eval_batch=None, data=None, workers=1):
    """Time cnntrain (and PyTorch if importable) on `images` images of the config's shape.

    Returns a JSON-able dict; never fails on speed.
    """
    c, h, w = cfg["model"]["input"]
    classes = cfg["model"]["layers"][-1]["units"]
    eval_batch = eval_batch or cfg["training"]["eval_batch_size"]
    if data is None:
        x, y = synthetic_data(images, (h, w), classes)
        source = "synthetic"
    else:
        x, y = data.train_images[:images], data.train_labels[:images]
        source = data.name
    ours_train, ours_eval = numpy_rates(cfg, x, y, batch_sizes, eval_batch, repeats, workers)
    result = {
        "images": int(len(x)), "data": source, "repeats": repeats, "dtype": cfg["model"]["dtype"],
        "workers": workers,
        "eval_batch_size": eval_batch,
        "cnntrain": {"train": ours_train, "eval": ours_eval},
        # before torch is imported, so it is cnntrain's own peak
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
    theirs = torch_rates(cfg, x, y, batch_sizes, eval_batch, repeats)
    if theirs is not None:
        result["torch"] = theirs
        result["ratio"] = {"train": {bs: ours_train[bs] / theirs["train"][bs] for bs in batch_sizes},
                           "eval": ours_eval / theirs["eval"]}
    return result
