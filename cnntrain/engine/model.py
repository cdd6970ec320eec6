"""The network: a list of layers built from plain layer specs, plus the loss.

The model's public arrays are PyTorch's NCHW: forward takes images (N, C, H, W). Inside,
feature maps are (C, H, W, N) (see kernels.py); the transpose happens once, at the input.

Batches of CHUNK or more examples run as chunks of at most CHUNK. With `workers` > 1,
chunk i runs in helper process i % workers (0 is this process; see workers.py for why
processes), and the chunks' gradients are added in chunk order. The split depends on the
batch size only, and every chunk runs the same code with one BLAS thread, so the result
is the same bit for bit whatever the number of workers. Chunks also keep each layer's
arrays small enough for the CPU caches.
"""

import copy
import os
import weakref

import numpy as np

from . import workers as helpers
from .errors import WorkerError
from .layers import Conv2D, Dense, Flatten, MaxPool2D, ShapeError
from .loss import softmax_cross_entropy

__all__ = ["Model", "build_model", "chunk_bounds", "ShapeError", "CHUNK", "WorkerError"]

CHUNK = 64


def chunk_bounds(n):
    """[(start, stop), ...] splitting a batch of n: whole below CHUNK, else into at least
    two near-equal chunks of at most CHUNK (64 -> 32 + 32, 256 -> 4 x 64)."""
    k = 1 if n < CHUNK else max(2, -(-n // CHUNK))
    edges = [n * i // k for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


class Model:
    def __init__(self, layers, input_shape, dtype, workers=1, flat_params=None, specs=None):
        """`specs` (the layer specs build_model was given) let helper processes build the
        same layers; without them, or where processes are not supported, chunks run here
        one after the other."""
        self.layers = layers
        self.input_shape = tuple(input_shape)  # C, H, W
        self.dtype = np.dtype(dtype)
        self.specs = specs
        self.workers = workers if specs is not None and helpers.processes_supported() else 1
        self._twin = None       # a copy of the layers (shared weights) for this process's chunks
        self._helpers = None    # helper processes, started at the first batch that needs them
        self._blas = None
        self._params_fd = None
        # The first layer's input is the data: its gradient is never used, so skip it.
        for layer in layers:
            if hasattr(layer, "needs_input_grad"):
                layer.needs_input_grad = False
                break
        # All weights live in one flat buffer, and all gradients in another, each layer's
        # arrays being views into them: the optimiser then updates every weight in one
        # NumPy call, and chunks' gradients add up in one call, instead of one per array.
        # With helper processes the weights' buffer is shared memory that they map too.
        # A twin passes the flat buffer its layers' weights already live in.
        if flat_params is None:
            n_params = sum(a.size for layer in layers for a in layer.params.values())
            if self.workers > 1:
                flat_params, self._params_fd = helpers.shared_array(n_params, self.dtype)
                weakref.finalize(self, _close_fd, self._params_fd)
            else:
                flat_params = np.empty(n_params, dtype=self.dtype)
            pack([layer.params for layer in layers], flat_params)
        self.flat_params = flat_params
        self.flat_grads = pack([layer.grads for layer in layers],
                               np.empty(self.flat_params.size, dtype=self.dtype))

    def forward(self, images, train=True):
        """images (N, C, H, W) -> logits (N, K)."""
        if tuple(images.shape[1:]) != self.input_shape:
            raise ShapeError(f"the model takes images of {self.input_shape} (channels, height, "
                             f"width), found {tuple(images.shape[1:])}")
        x = np.ascontiguousarray(images.transpose(1, 2, 3, 0), dtype=self.dtype)  # C,H,W,N
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def backward(self, dlogits):
        """Walk the layers in reverse, filling every layer's grads; returns nothing."""
        d = dlogits
        for layer in reversed(self.layers):
            d = layer.backward(d)
            if d is None:
                break

    def loss(self, images, labels):
        """Forward and backward on one batch: returns (mean loss, logits) and leaves the
        gradient of the mean loss in grads(). Weights unchanged."""
        n = len(images)
        if n < CHUNK:
            logits = self.forward(images, train=True)
            loss, dlogits, _ = softmax_cross_entropy(logits, labels)
            self.backward(dlogits)
            return loss, logits
        labels = np.asarray(labels)
        total, logits = self._run_chunks(images, labels, train=True)
        return total / n, logits

    def predict(self, images):
        """Logits (N, K) for any number of images, in chunks, keeping no caches."""
        if len(images) < CHUNK:
            return self.forward(images, train=False)
        return self._run_chunks(images, None, train=False)[1]

    def _run_chunks(self, images, labels, train):
        """Chunk i on worker i % workers (0: here, in order; others: helper processes),
        gradients summed in chunk order into flat_grads. Returns (sum of the chunks'
        loss x size, logits (N, K))."""
        n = len(images)
        bounds = chunk_bounds(n)
        k = min(self.workers, len(bounds))
        pool = self._start_helpers() if k > 1 else None
        twin = self._twin_model()
        op = b"T" if train else b"P"
        logits = None
        total = 0.0

        def submit(i):
            lo, hi = bounds[i]
            pool.submit(i % k - 1, op, images[lo:hi],
                        None if labels is None else labels[lo:hi], n)

        if self._blas is None:
            from threadpoolctl import ThreadpoolController

            self._blas = ThreadpoolController()
        # One BLAS thread, as in the helpers: OpenBLAS may split a product differently
        # across threads and round differently, and the result must not depend on workers.
        with self._blas.limit(limits=1, user_api="blas"):
            try:
                for i in range(1, k):
                    submit(i)
                for i, (lo, hi) in enumerate(bounds):
                    if i % k == 0:
                        if train:
                            out = twin.forward(images[lo:hi], train=True)
                            # each chunk's share of the batch's mean: divide by n, not hi - lo
                            loss, dlogits, _ = softmax_cross_entropy(out, labels[lo:hi],
                                                                     denominator=n)
                            twin.backward(dlogits)
                            grads = twin.flat_grads
                        else:
                            out = twin.forward(images[lo:hi], train=False)
                    else:
                        slot = pool.result(i % k - 1)
                        out, loss, grads = slot["logits"][:hi - lo], slot["loss"][0], slot["grads"]
                    if logits is None:
                        logits = np.empty((n, out.shape[1]), dtype=out.dtype)
                    logits[lo:hi] = out
                    if train:
                        total += float(loss) * (hi - lo)
                        if i == 0:
                            np.copyto(self.flat_grads, grads)
                        else:
                            self.flat_grads += grads
                    if i % k and i + k < len(bounds):
                        submit(i + k)  # the helper's slot is free again: its next chunk
            except BaseException:
                # A helper that failed, or a chunk left running (whose answer would be
                # taken for the next request's): the next batch starts fresh helpers.
                if pool is not None:
                    self.close()
                raise
        return total, logits

    def _start_helpers(self):
        if self._helpers is None:
            classes = self.layers[-1].out_shape[0]
            self._helpers = helpers.Helpers(self.workers - 1, self.specs, self.input_shape,
                                            classes, self._params_fd, self.flat_params.size,
                                            self.dtype, CHUNK)
            self._finalizer = weakref.finalize(self, self._helpers.close)
        return self._helpers

    def helper_peak_rss_mib(self):
        """Peak resident memory of each running helper process, in MiB ([] if none)."""
        return self._helpers.peak_rss_mib() if self._helpers is not None else []

    def close(self):
        """Stop the helper processes, if any (they start again when needed)."""
        if self._helpers is not None:
            self._finalizer()
            self._helpers = None

    def _twin_model(self):
        if self._twin is None:
            layers = []
            for layer in self.layers:
                twin = copy.copy(layer)  # shares the params dict: the very same weights
                twin.grads = dict(layer.grads)  # re-pointed to the twin's own buffer
                twin.cache = None
                layers.append(twin)
            self._twin = Model(layers, self.input_shape, self.dtype, flat_params=self.flat_params)
        return self._twin

    def params(self):
        """name -> array, PyTorch names (`conv1.weight`) and layouts, in layer order."""
        return {f"{layer.name}.{k}": v for layer in self.layers for k, v in layer.params.items()}

    def grads(self):
        return {f"{layer.name}.{k}": v for layer in self.layers for k, v in layer.grads.items()}

    def load_params(self, arrays):
        """Copy arrays (name -> array) into the weights; every name and shape must match."""
        own = self.params()
        missing = sorted(set(own) - set(arrays))
        if missing:
            raise ShapeError(f"missing parameters: {', '.join(missing)}")
        for name, w in own.items():
            a = np.asarray(arrays[name])
            if a.shape != w.shape:
                raise ShapeError(f"{name}: expected shape {w.shape}, found {a.shape}")
            w[...] = a
        for layer in self.layers:
            mask = getattr(layer, "mask", None)
            if mask is not None and np.any(layer.params["weight"][~mask]):
                raise ShapeError(f"{layer.name}.weight: unconnected weights are not zero "
                                 "(the checkpoint was made with other connections)")


def pack(dicts, flat):
    """Copy the arrays of several name -> array dicts into the flat buffer, in order, and
    replace each dict entry by its view there (same shape, same values); returns flat."""
    old = [d.copy() for d in dicts]
    adopt(dicts, flat)
    for d, before in zip(dicts, old):
        for k, a in before.items():
            d[k][...] = a
    return flat


def adopt(dicts, flat):
    """Replace each entry of the dicts, in order, by a view of the next part of `flat`
    (same shape; the values are flat's). Returns flat."""
    start = 0
    for d in dicts:
        for k, a in d.items():
            d[k] = flat[start:start + a.size].reshape(a.shape)
            start += a.size
    if start != flat.size:
        raise ValueError(f"{start} values for a buffer of {flat.size}")
    return flat


def _close_fd(fd):
    try:
        os.close(fd)
    except OSError:
        pass


def build_model(layer_specs, input_shape, dtype="float32", rng=None, workers=1):
    """Build a Model from specs like {"name": "conv1", "type": "conv", "filters": 6, ...}.

    Shapes are checked here, layer by layer: a misfit raises ShapeError naming the layer
    and both shapes. A flatten is inserted before the first dense layer after a spatial one.
    """
    dtype = np.dtype(dtype)
    rng = rng if rng is not None else np.random.default_rng(0)
    shape = tuple(input_shape)  # C, H, W
    layers = []
    for spec in layer_specs:
        kind, name = spec["type"], spec["name"]
        relu = spec.get("activation", "none") == "relu"
        if kind in ("conv", "maxpool") and len(shape) != 3:
            raise ShapeError(f"{name}: a {kind} layer needs an image input (channels x height "
                             f"x width), found a flat vector of {shape[0]} values")
        if kind == "conv":
            layer = Conv2D(name, shape, spec["filters"], spec["kernel"], spec.get("padding", 0),
                           relu, spec.get("connections", "full"), dtype, rng)
        elif kind == "maxpool":
            layer = MaxPool2D(name, shape, spec["size"])
        elif kind == "dense":
            if len(shape) == 3:
                flat = Flatten(f"{name}_flatten", shape)
                layers.append(flat)
                shape = flat.out_shape
            layer = Dense(name, shape[0], spec["units"], relu, dtype, rng)
        else:
            raise ValueError(f"{name}: unknown layer type {kind!r}")
        if any(d < 1 for d in layer.out_shape):
            raise ShapeError(f"{name}: its output would be empty ({layer.out_shape})")
        layers.append(layer)
        shape = layer.out_shape
    if not layers or not isinstance(layers[-1], Dense):
        raise ShapeError("the last layer must be dense: it gives the class scores")
    for conv, pool in zip(layers, layers[1:]):
        if isinstance(conv, Conv2D) and isinstance(pool, MaxPool2D) and conv.relu:
            conv.relu, pool.relu = False, True  # same maths, a quarter of the work: see MaxPool2D
    return Model(layers, input_shape, dtype, workers, specs=[dict(s) for s in layer_specs])
