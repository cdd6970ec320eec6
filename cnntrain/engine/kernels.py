"""Vectorised helpers for convolution and pooling on channels-last arrays.

Layout: images are (N, H, W, C). With channels last, the im2col matrix has one row per
output pixel and its columns ordered (C, kH, kW), which is exactly PyTorch's weight
layout (F, C, kH, kW) flattened, so the GEMM needs no transposes. The naive loop twins
of these functions live in tests/reference.py.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def pad_hw(x, padding):
    """Zero-pad the two spatial axes of (N, H, W, C) by `padding` on every side."""
    if padding == 0:
        return x
    n, h, w, c = x.shape
    # np.pad is several times slower than a zeroed buffer and one slice assignment.
    out = np.zeros((n, h + 2 * padding, w + 2 * padding, c), dtype=x.dtype)
    out[:, padding:padding + h, padding:padding + w, :] = x
    return out


def im2col(xp, kh, kw):
    """Patches of a padded (N, Hp, Wp, C) image as a (N*Ho*Wo, C*kh*kw) matrix."""
    n, hp, wp, c = xp.shape
    ho, wo = hp - kh + 1, wp - kw + 1
    windows = sliding_window_view(xp, (kh, kw), axis=(1, 2))  # N,Ho,Wo,C,kh,kw (a view)
    return windows.reshape(n * ho * wo, c * kh * kw)  # the one copy im2col costs


def col2im(dcols, padded_shape, kh, kw, padding):
    """Adjoint of im2col: sum patch gradients back into an unpadded (N, H, W, C) image.

    dcols is (N*Ho*Wo, C*kh*kw). Overlapping windows add up; the loop runs over the
    kh*kw kernel offsets (25 for LeNet), each one strided add over the whole batch.
    """
    n, hp, wp, c = padded_shape
    ho, wo = hp - kh + 1, wp - kw + 1
    d = dcols.reshape(n, ho, wo, c, kh, kw)
    dxp = np.zeros(padded_shape, dtype=dcols.dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, i:i + ho, j:j + wo, :] += d[:, :, :, :, i, j]
    if padding:
        dxp = dxp[:, padding:hp - padding, padding:wp - padding, :]
    return dxp


def maxpool_forward(x, size):
    """Max over non-overlapping size x size windows of (N, H, W, C); rows/cols that do
    not fill a window are dropped (PyTorch's floor mode).

    Returns (out (N, Ho, Wo, C), argmax (N, Ho, Wo, C) int8: window offset di*size+dj).
    Ties go to the first maximum in row-major order, as in PyTorch: offsets are visited
    in that order and only a strictly greater value takes over.
    """
    n, h, w, c = x.shape
    ho, wo = h // size, w // size
    out = x[:, 0:ho * size:size, 0:wo * size:size, :].copy()
    argmax = np.zeros(out.shape, dtype=np.int8)
    for k in range(1, size * size):
        di, dj = divmod(k, size)
        v = x[:, di:ho * size:size, dj:wo * size:size, :]
        better = v > out
        np.copyto(out, v, where=better)
        argmax[better] = k
    return out, argmax


def maxpool_backward(dout, argmax, input_shape, size):
    """Route each window's gradient to its one argmax position; zeros elsewhere."""
    dx = np.zeros(input_shape, dtype=dout.dtype)
    ho, wo = dout.shape[1], dout.shape[2]
    for k in range(size * size):
        di, dj = divmod(k, size)
        dx[:, di:ho * size:size, dj:wo * size:size, :] = np.where(argmax == k, dout, 0)
    return dx
