"""Layers: each forward directly followed by its backward.

Feature maps are (C, H, W, N), batch innermost; see kernels.py for why.
Dense activations are (N, features). Parameters keep PyTorch's layouts: conv weight
(F, C, kH, kW), dense weight (out, in). Shapes given to constructors are (C, H, W).

A layer's forward caches only what its backward needs, and only when `train` is true.
backward(dout) returns the gradient for the layer's input and fills `self.grads`; it
never changes a weight (the optimiser does that, after backward).
"""

import numpy as np

from . import kernels

# LeCun et al. 1998, Table I: which pool2 maps each of conv3's 16 maps sees.
LENET5_CONNECTIONS = (
    [[i, (i + 1) % 6, (i + 2) % 6] for i in range(6)]                  # 0-5: 3 contiguous
    + [[(i + k) % 6 for k in range(4)] for i in range(6)]              # 6-11: 4 contiguous
    + [[0, 1, 3, 4], [1, 2, 4, 5], [0, 2, 3, 5]]                       # 12-14: 4 non-contiguous
    + [[0, 1, 2, 3, 4, 5]]                                             # 15: all six
)
LENET5_CONNECTIONS = [sorted(maps) for maps in LENET5_CONNECTIONS]


class ShapeError(ValueError):
    """A layer does not fit the shape of its input; the message names both."""


def _uniform(rng, bound, shape, dtype):
    # PyTorch's default init for conv and linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    # `bound` may be an array broadcasting against `shape` (one bound per filter).
    return (rng.uniform(-1.0, 1.0, size=shape) * bound).astype(dtype)


class Conv2D:
    """Stride-1 convolution with zero padding, optional ReLU and a connection table."""

    def __init__(self, name, in_shape, filters, kernel, padding=0, relu=False,
                 connections="full", dtype=np.float32, rng=None):
        c, h, w = in_shape
        if kernel > h + 2 * padding or kernel > w + 2 * padding:
            raise ShapeError(
                f"{name}: kernel {kernel}x{kernel} with padding {padding} does not fit its "
                f"input of {c}x{h}x{w} (channels x height x width)")
        self.name, self.kernel, self.padding, self.relu = name, kernel, padding, relu
        self.in_shape = in_shape
        self.out_shape = (filters, h + 2 * padding - kernel + 1, w + 2 * padding - kernel + 1)
        self.mask = connection_mask(name, connections, filters, c)  # (F, C) bool or None
        fan_in = (c if self.mask is None else self.mask.sum(axis=1)) * kernel * kernel
        # With a connection table the fan-in differs per filter, and so does the bound.
        bound = 1.0 / np.sqrt(np.asarray(fan_in, dtype=np.float64))
        rng = rng if rng is not None else np.random.default_rng(0)
        weight = _uniform(rng, np.reshape(bound, (-1, 1, 1, 1)), (filters, c, kernel, kernel), dtype)
        if self.mask is not None:
            weight *= self.mask[:, :, None, None]
        bias = _uniform(rng, bound, (filters,), dtype)
        self.params = {"weight": weight, "bias": bias}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.needs_input_grad = True
        self.cache = None

    def forward(self, x, train=True):
        """x (C, H, W, N) -> (F, Ho, Wo, N)."""
        n = x.shape[3]
        k, f = self.kernel, self.params["weight"].shape[0]
        xp = kernels.pad_hw(x, self.padding)
        cols = kernels.im2col(xp, k, k)                    # C*k*k, Ho*Wo*N
        w_flat = self.params["weight"].reshape(f, -1)      # F, C*k*k
        out = w_flat @ cols                                # F, Ho*Wo*N
        out += self.params["bias"][:, None]
        if self.relu:
            np.maximum(out, 0, out=out)
        if train:
            self.cache = (cols, xp.shape, out)
        return out.reshape(*self.out_shape, n)             # F, Ho, Wo, N

    def backward(self, dout):
        """dout (F, Ho, Wo, N) -> dx (C, H, W, N), or None when no input gradient is needed."""
        cols, padded_shape, out = self.cache
        f = dout.shape[0]
        d = dout.reshape(f, -1)                            # F, Ho*Wo*N
        if self.relu:
            d = d * (out > 0)  # the seed's rule: no gradient where the output was <= 0
        # (cols @ d.T).T rather than d @ cols.T: the same sums, but OpenBLAS runs this
        # long-reduction shape 1.5-1.9x faster (0.63 vs 0.94 ms for conv1 at batch 64).
        dw = (cols @ d.T).T.reshape(self.params["weight"].shape)
        if self.mask is not None:
            dw *= self.mask[:, :, None, None]  # unconnected weights must stay exactly zero
        self.grads["weight"][...] = dw
        self.grads["bias"][...] = d.sum(axis=1)
        if not self.needs_input_grad:
            return None
        dcols = self.params["weight"].reshape(f, -1).T @ d  # C*k*k, Ho*Wo*N
        return kernels.col2im(dcols, padded_shape, self.kernel, self.kernel, self.padding)


def connection_mask(name, connections, filters, channels):
    """(filters, channels) bool table of which input maps each filter sees; None for full."""
    if connections in (None, "full"):
        return None
    if connections == "lenet5":
        if (filters, channels) != (16, 6):
            raise ShapeError(
                f"{name}: connections lenet5 needs 6 input maps and 16 filters, "
                f"found {channels} input maps and {filters} filters")
        connections = LENET5_CONNECTIONS
    if len(connections) != filters:
        raise ShapeError(f"{name}: connections lists {len(connections)} filters, the layer has {filters}")
    mask = np.zeros((filters, channels), dtype=bool)
    for f, maps in enumerate(connections):
        bad = [m for m in maps if not 0 <= m < channels]
        if bad:
            raise ShapeError(
                f"{name}: filter {f} connects to input map {bad[0]}, but the input has "
                f"{channels} maps (0..{channels - 1})")
        mask[f, maps] = True
    return mask


class MaxPool2D:
    """Max pooling over size x size windows with stride = size, optionally followed by ReLU.

    build_model moves a conv layer's ReLU here when the pool comes right after it: ReLU and
    max commute (both are monotone), so relu(pool(z)) == pool(relu(z)) exactly, on a map a
    quarter of the size. The gradients are identical too: where a window's max is positive
    both orders pick the same winner, and where it is not, both give zero.
    """

    def __init__(self, name, in_shape, size, relu=False):
        c, h, w = in_shape
        if size > h or size > w:
            raise ShapeError(
                f"{name}: pooling window {size}x{size} does not fit its input of "
                f"{c}x{h}x{w} (channels x height x width)")
        self.name, self.size, self.in_shape, self.relu = name, size, in_shape, relu
        self.out_shape = (c, h // size, w // size)
        self.params, self.grads = {}, {}
        self.cache = None

    def forward(self, x, train=True):
        """x (C, H, W, N) -> (C, H//size, W//size, N)."""
        out, winners = kernels.maxpool_forward(x, self.size, winners=train)
        if self.relu:
            np.maximum(out, 0, out=out)
        if train:
            self.cache = (winners, x.shape, out)
        return out

    def backward(self, dout):
        winners, shape, out = self.cache
        if self.relu:
            dout = dout * (out > 0)
        return kernels.maxpool_backward(dout, winners, shape, self.size)


class Flatten:
    """(C, H, W, N) -> (N, C*H*W) in PyTorch's (C, H, W) order, so checkpoints match."""

    def __init__(self, name, in_shape):
        c, h, w = in_shape
        self.name, self.in_shape, self.out_shape = name, in_shape, (c * h * w,)
        self.params, self.grads = {}, {}

    def forward(self, x, train=True):
        return x.transpose(3, 0, 1, 2).reshape(x.shape[3], -1)  # N,C,H,W -> N,C*H*W

    def backward(self, dout):
        c, h, w = self.in_shape
        return dout.reshape(-1, c, h, w).transpose(1, 2, 3, 0)  # N,C,H,W -> C,H,W,N


class Dense:
    """Fully connected layer, y = x W^T + b, with optional ReLU."""

    def __init__(self, name, in_features, units, relu=False, dtype=np.float32, rng=None):
        self.name, self.relu = name, relu
        self.in_shape, self.out_shape = (in_features,), (units,)
        bound = 1.0 / np.sqrt(in_features)
        rng = rng if rng is not None else np.random.default_rng(0)
        self.params = {"weight": _uniform(rng, bound, (units, in_features), dtype),
                       "bias": _uniform(rng, bound, (units,), dtype)}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.needs_input_grad = True
        self.cache = None

    def forward(self, x, train=True):
        """x (N, in) -> (N, units)."""
        out = x @ self.params["weight"].T
        out += self.params["bias"]
        if self.relu:
            np.maximum(out, 0, out=out)
        if train:
            self.cache = (x, out)
        return out

    def backward(self, dout):
        """dout (N, units) -> dx (N, in)."""
        x, out = self.cache
        if self.relu:
            dout = dout * (out > 0)
        # np.dot, not np.matmul: for a batch of 1 matmul misses BLAS on this (units, 1) @
        # (1, in) product and takes 55 us instead of 7. Straight into the buffer: no copy.
        np.dot(dout.T, x, out=self.grads["weight"])
        np.sum(dout, axis=0, out=self.grads["bias"])
        if not self.needs_input_grad:
            return None
        return dout @ self.params["weight"]
