"""The network: a list of layers built from plain layer specs, plus the loss.

The model's public arrays are PyTorch's NCHW: forward takes images (N, C, H, W). Inside,
feature maps are (C, H, W, N) (see kernels.py); the transpose happens once, at the input.
"""

import numpy as np

from .layers import Conv2D, Dense, Flatten, MaxPool2D, ShapeError
from .loss import softmax_cross_entropy

__all__ = ["Model", "build_model", "ShapeError"]


class Model:
    def __init__(self, layers, input_shape, dtype):
        self.layers = layers
        self.input_shape = tuple(input_shape)  # C, H, W
        self.dtype = np.dtype(dtype)
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
        """Forward and backward on one batch; returns (loss, logits). Weights unchanged."""
        logits = self.forward(images, train=True)
        loss, dlogits, _ = softmax_cross_entropy(logits, labels)
        self.backward(dlogits)
        return loss, logits

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


def build_model(layer_specs, input_shape, dtype="float32", rng=None):
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
    return Model(layers, input_shape, dtype)
