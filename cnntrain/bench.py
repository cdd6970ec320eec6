"""Throughput of the training and evaluation loops, and of the same network in PyTorch
when torch happens to be importable, timed side by side in one process on the same batches.

Timing method: for each job, one warm-up pass per implementation, then `repeats` rounds in
which cnntrain and PyTorch each make one timed pass over the same images, alternating, so
that both meet the same noise of a shared machine. Each side's median pass is reported,
and the ratio of the medians. Read the ratios; absolute figures vary from run to run.
"""

import time

import numpy as np

from .data.batches import iterate_batches
from .engine.model import build_model
from .engine.optim import SGD
from .memory import peak_rss_mib


def synthetic_data(n, shape, classes, seed=0):
    """Random uint8 images (n, H, W) and labels (n,): the work per image does not depend
    on what the pixels show."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, *shape), dtype=np.uint8),
            rng.integers(0, classes, size=n).astype(np.uint8))


def numpy_jobs(cfg, images, labels, batch_sizes, eval_batch, workers):
    """({job name: one pass over the images}, [the models]) for cnntrain's engine."""
    model_cfg, dtype = cfg["model"], cfg["model"]["dtype"]
    jobs, models = {}, []
    for bs in batch_sizes:
        model = build_model(model_cfg["layers"], model_cfg["input"], dtype,
                            np.random.default_rng(0), workers)
        models.append(model)
        opt = SGD(model.params(), model.grads(), cfg["optimizer"]["lr"])

        def epoch(model=model, opt=opt, bs=bs):
            for x, y in iterate_batches(images, labels, bs, dtype):
                model.loss(x, y)
                opt.step()

        jobs[f"train_{bs}"] = epoch

    def evaluate(model=model):
        for x, _ in iterate_batches(images, labels, eval_batch, dtype):
            model.predict(x)

    jobs["eval"] = evaluate
    return jobs, models


def torch_network(torch, cfg):
    """The config's network in PyTorch (full connections only), or None if it has others."""
    nn = torch.nn
    c = cfg["model"]["input"][0]
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


def torch_jobs(cfg, images, labels, batch_sizes, eval_batch):
    """The same jobs in PyTorch, fed the same float batches; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    if torch_network(torch, cfg) is None:
        return None
    functional = torch.nn.functional
    dtype = cfg["model"]["dtype"]
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    jobs = {}
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

        jobs[f"train_{bs}"] = epoch

    def evaluate(net=net):
        with torch.no_grad():
            for x, _ in iterate_batches(images, labels, eval_batch, dtype):
                net(torch.from_numpy(x))

    jobs["eval"] = evaluate
    return jobs, {"version": torch.__version__, "threads": torch.get_num_threads()}


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_bench(cfg, batch_sizes, images=4096, repeats=5, eval_batch=None, data=None, workers=1):
    """Time cnntrain (and PyTorch if importable) on `images` images of the config's shape.

    Returns a JSON-able dict of images/s per job; never fails on speed.
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
    ours, models = numpy_jobs(cfg, x, y, batch_sizes, eval_batch, workers)
    try:
        return _compare(cfg, x, y, ours, models, batch_sizes, repeats, eval_batch, source, workers)
    finally:
        for model in models:
            model.close()


def _compare(cfg, x, y, ours, models, batch_sizes, repeats, eval_batch, source, workers):
    # Measured before torch is imported, so it is cnntrain's own peak (jobs run once below).
    for job in ours.values():
        job()
    peak = peak_rss_mib()
    # Each model has its own helpers; one training run has one model: report the largest.
    helper_peak = max((p for m in models for p in m.helper_peak_rss_mib()), default=None)
    found = torch_jobs(cfg, x, y, batch_sizes, eval_batch)
    theirs, torch_info = found if found else ({}, None)
    times = {name: ([], []) for name in ours}
    for name, job in ours.items():
        if name in theirs:
            theirs[name]()  # warm-up
        for _ in range(repeats):
            times[name][0].append(_timed(job))
            if name in theirs:
                times[name][1].append(_timed(theirs[name]))

    def rates(side):
        return {name: len(x) / float(np.median(t[side])) for name, t in times.items() if t[side]}

    result = {"images": int(len(x)), "data": source, "repeats": repeats,
              "dtype": cfg["model"]["dtype"], "workers": workers, "eval_batch_size": eval_batch,
              "batch_sizes": list(batch_sizes), "cnntrain": rates(0), "peak_rss_mib": round(peak, 1),
              "helpers": max(0, workers - 1),
              "helper_peak_rss_mib": None if helper_peak is None else round(helper_peak, 1)}
    if torch_info:
        result["torch"] = {**torch_info, **rates(1)}
        result["ratio"] = {name: result["cnntrain"][name] / result["torch"][name] for name in ours}
    return result
