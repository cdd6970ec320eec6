"""Vectorised helpers for convolution and pooling.

Layout: feature maps are (C, H, W, N), batch innermost (cuda-convnet's layout).
Every window offset then addresses runs of W*N contiguous floats, so the copies and adds
that im2col, col2im and pooling are made of run at memory speed instead of stepping
through rows of 5 or 10. Measured on LeNet's shapes at batch 64 (2 cores, medians):

| kernel            | NHWC    | CNHW    | CHWN    |
|-------------------|---------|---------|---------|
| conv1 im2col      | 1.26 ms | 0.29 ms | 0.14 ms |
| conv3 im2col      | 0.89 ms | 0.49 ms | 0.13 ms |
| conv3 col2im      |         | 1.04 ms | 0.39 ms |
| pool2 forward     | 2.30 ms | 0.39 ms | 0.16 ms |

The GEMM weight (F, C*k*k) @ cols (C*k*k, Ho*Wo*N) gives (F, Ho, Wo, N) directly, the
next layer's layout, and the weight is PyTorch's (F, C, kH, kW) flattened, a free view.
The naive loop twins of these functions live in tests/reference.py.
"""

import numpy as np


def pad_hw(x, padding):
    """Zero-pad the two spatial axes of (C, H, W, N) by `padding` on every side."""
    if padding == 0:
        return x
    c, h, w, n = x.shape
    # np.pad is several times slower than a zeroed buffer and one slice assignment.
    out = np.zeros((c, h + 2 * padding, w + 2 * padding, n), dtype=x.dtype)
    out[:, padding:padding + h, padding:padding + w, :] = x
    return out


def im2col(xp, kh, kw):
    """Patches of a padded (C, Hp, Wp, N) map as a (C*kh*kw, Ho*Wo*N) matrix."""
    xp = np.ascontiguousarray(xp)
    c, hp, wp, n = xp.shape
    ho, wo = hp - kh + 1, wp - kw + 1
    sc, sh, sw, sn = xp.strides
    # A read-only strided view (C, kh, kw, Ho, Wo, N) of xp: moving one step in a kernel
    # offset or in an output position moves the same step in the input. Built with the
    # ndarray constructor: sliding_window_view's checks cost 3x the copy at batch 1.
    windows = np.ndarray((c, kh, kw, ho, wo, n), xp.dtype, xp, 0, (sc, sh, sw, sh, sw, sn))
    cols = np.ascontiguousarray(windows)                        # C,kh,kw,Ho,Wo,N
    return cols.reshape(c * kh * kw, ho * wo * n)


def col2im(dcols, padded_shape, kh, kw, padding):
    """Adjoint of im2col: sum patch gradients back into an unpadded (C, H, W, N) map.

    dcols is (C*kh*kw, Ho*Wo*N). Overlapping windows add up; the loop runs over the
    kh*kw kernel offsets (25 for LeNet), each one strided add over the whole batch.
    """
    c, hp, wp, n = padded_shape
    ho, wo = hp - kh + 1, wp - kw + 1
    d = dcols.reshape(c, kh, kw, ho, wo, n)
    dxp = np.zeros(padded_shape, dtype=dcols.dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, i:i + ho, j:j + wo, :] += d[:, i, j]
    if padding:
        dxp = dxp[:, padding:hp - padding, padding:wp - padding, :]
    return dxp


def _window_views(x, size):
    """The size*size strided views of (C, H, W, N), one per window offset, in row-major
    offset order; rows/cols that do not fill a window are left out (PyTorch's floor mode)."""
    ho, wo = x.shape[1] // size, x.shape[2] // size
    return [x[:, di:ho * size:size, dj:wo * size:size, :]
            for di in range(size) for dj in range(size)]


def maxpool_forward(x, size, winners=True):
    """Max over non-overlapping size x size windows of (C, H, W, N).

    Returns (out (C, Ho, Wo, N), winners), winners None when not asked for (inference
    needs no backward). winners[k] is a bool (C, Ho, Wo, N) map, true
    where window offset k (row-major, k = di*size + dj) holds the window's gradient. Exactly
    one offset wins per window, the first maximum in row-major order, as in PyTorch.
    Bool maps rather than an argmax index: building and applying them is ufunc work,
    several times faster here than fancy-index assignment of an argmax index.
    """
    views = _window_views(x, size)
    out = views[0].copy()
    for v in views[1:]:
        np.maximum(out, v, out=out)
    if not winners:
        return out, None
    taken = np.zeros(out.shape, dtype=bool)
    winners = []
    for v in views[:-1]:
        win = np.equal(v, out)
        win &= ~taken  # an earlier offset already holds this window's maximum
        taken |= win
        winners.append(win)
    winners.append(~taken)
    return out, winners


def maxpool_backward(dout, winners, input_shape, size):
    """Route each window's gradient to its one winning position; zeros elsewhere."""
    _, h, w, _ = input_shape
    tiled = h % size == 0 and w % size == 0  # the windows cover every input position...
    dx = (np.empty if tiled else np.zeros)(input_shape, dtype=dout.dtype)  # ...so all get written
    for view, win in zip(_window_views(dx, size), winners):
        np.multiply(dout, win, out=view)
    return dx
