"""The network: a list of layers built from plain layer specs, plus the loss.

The model's public arrays are PyTorch's NCHW: forward takes images (N, C, H, W). Inside,
feature maps are (C, H, W, N) (see kernels.py); the transpose happens once, at the input.

Batches of CHUNK or more examples run as chunks of at most CHUNK, each on its own copy of
the layers (shared weights, own caches and gradients), on `workers` threads; the chunks'
gradients are then added in chunk order. The split depends on the batch size only, so
the result is the same bit for bit whatever the number of workers. Chunks keep each
layer's arrays small enough for the CPU caches, and NumPy and BLAS release the GIL, so
two workers use two cores.
"""

import copy
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .layers import Conv2D, Dense, Flatten, MaxPool2D, ShapeError
from .loss import softmax_cross_entropy

__all__ = ["Model", "build_model", "chunk_bounds", "ShapeError", "CHUNK"]

CHUNK = 64


def chunk_bounds(n):
    """[(start, stop), ...] splitting a batch of n: whole below CHUNK, else into at least
    two near-equal chunks of at most CHUNK (64 -> 32 + 32, 256 -> 4 x 64)."""
    k = 1 if n < CHUNK else max(2, -(-n // CHUNK))
    edges = [n * i // k for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


class Model:
    def __init__(self, layers, input_shape, dtype, workers=1, flat_params=None):
        self.layers = layers
        self.input_shape = tuple(input_shape)  # C, H, W
        self.dtype = np.dtype(dtype)
        self.workers = workers
        self._replicas = []  # per-chunk copies of the layers, made on first use
        self._pool = self._blas = None
        # All weights live in one flat buffer, and all gradients in another, each layer's
        # arrays being views into them: the optimiser then updates every weight in one
        # NumPy call, and chunks' gradients add up in one call, instead of one per array.
        # A replica passes the flat buffer its layers' weights already live in.
        self.flat_params = (flat_params if flat_params is not None
                            else pack([layer.params for layer in layers], self.dtype))
        self.flat_grads = pack([layer.grads for layer in layers], self.dtype)
        # The first layer's input is the data: its gradient is never used, so skip it.
        for layer in layers:
            if hasattr(layer, "needs_input_grad"):
                layer.needs_input_grad = False
                break

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
        bounds = chunk_bounds(n)
        if len(bounds) == 1:
            logits = self.forward(images, train=True)
            loss, dlogits, _ = softmax_cross_entropy(logits, labels)
            self.backward(dlogits)
            return loss, logits
        replicas = self._replicas_for(len(bounds))

        def run(i):
            lo, hi = bounds[i]
            logits = replicas[i].forward(images[lo:hi], train=True)
            # each chunk's share of the whole batch's mean: divide by n, not by hi - lo
            loss, dlogits, _ = softmax_cross_entropy(logits, labels[lo:hi], denominator=n)
            replicas[i].backward(dlogits)
            return loss * (hi - lo), logits

        results = self._map(run, range(len(bounds)))
        np.copyto(self.flat_grads, replicas[0].flat_grads)
        for replica in replicas[1:len(bounds)]:
            self.flat_grads += replica.flat_grads
        return sum(r[0] for r in results) / n, np.concatenate([r[1] for r in results])

    def predict(self, images):
        """Logits (N, K) for any number of images, in chunks, keeping no caches."""
        bounds = chunk_bounds(len(images))
        if len(bounds) == 1:
            return self.forward(images, train=False)
        chunks = self._map(lambda b: self.forward(images[b[0]:b[1]], train=False), bounds)
        return np.concatenate(chunks)

    def _map(self, fn, items):
        """fn over the chunks, on the worker threads when there are several; in order.

        BLAS runs one thread per chunk whatever the number of workers: OpenBLAS may split
        a product differently across threads and round differently, and the result must
        not depend on `workers`. Two workers x one BLAS thread each is also the fastest
        way to use two cores here (x two BLAS threads each ran 35% slower).
        """
        if self._blas is None:
            from threadpoolctl import ThreadpoolController

            self._blas = ThreadpoolController()
        with self._blas.limit(limits=1, user_api="blas"):
            if self.workers == 1:
                return [fn(i) for i in items]
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="cnntrain")
            return list(self._pool.map(fn, items))

    def _replicas_for(self, count):
        while len(self._replicas) < count:
            layers = []
            for layer in self.layers:
                twin = copy.copy(layer)  # shares the params dict: the very same weights
                twin.grads = dict(layer.grads)  # re-pointed to the twin's own buffer below
                twin.cache = None
                layers.append(twin)
            self._replicas.append(Model(layers, self.input_shape, self.dtype,
                                        flat_params=self.flat_params))
        return self._replicas

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


def pack(dicts, dtype):
    """Move the arrays of several name -> array dicts into one new flat buffer, in order,
    replacing each dict entry by a view of it (same shape, same values); returns the buffer."""
    arrays = [d[k] for d in dicts for k in d]
    flat = np.empty(sum(a.size for a in arrays), dtype=dtype)
    start = 0
    for d in dicts:
        for k, a in d.items():
            view = flat[start:start + a.size].reshape(a.shape)
            view[...] = a
            d[k] = view
            start += a.size
    return flat


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
    return Model(layers, input_shape, dtype, workers)
