"""Obviously correct, slow references: explicit loops over examples and pixels, NCHW.

The engine's vectorised kernels are checked against these. They follow the seed notes
line by line and share no code with cnntrain.
"""

import numpy as np


def conv2d(x, w, b, padding=0, mask=None):
    """x (N, C, H, W), w (F, C, k, k), b (F,) -> (N, F, Ho, Wo); mask (F, C) drops inputs."""
    n, c, h, wd = x.shape
    f, _, k, _ = w.shape
    xp = np.zeros((n, c, h + 2 * padding, wd + 2 * padding), dtype=x.dtype)
    xp[:, :, padding:padding + h, padding:padding + wd] = x
    ho, wo = h + 2 * padding - k + 1, wd + 2 * padding - k + 1
    out = np.zeros((n, f, ho, wo), dtype=x.dtype)
    for e in range(n):
        for m in range(f):
            for i in range(ho):
                for j in range(wo):
                    s = b[m]
                    for ch in range(c):
                        if mask is not None and not mask[m, ch]:
                            continue
                        s += np.sum(xp[e, ch, i:i + k, j:j + k] * w[m, ch])
                    out[e, m, i, j] = s
    return out


def maxpool(x, size):
    """x (N, C, H, W) -> (out, argmax positions) scanning each window in row-major order;
    a later value wins only when strictly greater (the first maximum is kept)."""
    n, c, h, w = x.shape
    ho, wo = h // size, w // size
    out = np.zeros((n, c, ho, wo), dtype=x.dtype)
    where = np.zeros((n, c, ho, wo, 2), dtype=int)
    for e in range(n):
        for ch in range(c):
            for i in range(ho):
                for j in range(wo):
                    best, pos = None, None
                    for di in range(size):
                        for dj in range(size):
                            v = x[e, ch, i * size + di, j * size + dj]
                            if best is None or v > best:
                                best, pos = v, (i * size + di, j * size + dj)
                    out[e, ch, i, j] = best
                    where[e, ch, i, j] = pos
    return out, where


def maxpool_backward(dout, where, input_shape):
    """The seed's rule: only the max position gets the gradient."""
    dx = np.zeros(input_shape, dtype=dout.dtype)
    n, c, ho, wo = dout.shape
    for e in range(n):
        for ch in range(c):
            for i in range(ho):
                for j in range(wo):
                    mi, mj = where[e, ch, i, j]
                    dx[e, ch, mi, mj] += dout[e, ch, i, j]
    return dx


def seed_sgd_step(params, image, label, lr, padding1):
    """One training step of the seed's 7-layer network on ONE example, in loops.

    params: PyTorch-named arrays (conv1, conv3, ff5, ff6, output), float64. conv1 and conv3
    are full convolutions with ReLU, pool2/pool4 are 2x2 max pools, ff5/ff6 dense + ReLU.
    Returns the updated params (a new dict), written from the seed's update rules:
    w -= lr * gradient * input, b -= lr * bias_gradient.
    """
    p = {k: v.copy() for k, v in params.items()}
    x = image[None]  # 1, C, H, W
    # forward
    c1 = np.maximum(conv2d(x, p["conv1.weight"], p["conv1.bias"], padding1), 0)
    p2, w2 = maxpool(c1, 2)
    c3 = np.maximum(conv2d(p2, p["conv3.weight"], p["conv3.bias"]), 0)
    p4, w4 = maxpool(c3, 2)
    flat = p4.reshape(-1)
    f5 = np.maximum(p["ff5.weight"] @ flat + p["ff5.bias"], 0)
    f6 = np.maximum(p["ff6.weight"] @ f5 + p["ff6.bias"], 0)
    z = p["output.weight"] @ f6 + p["output.bias"]
    out = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    # backward, as in the notes
    g_out = np.array([out[i] - (1.0 if i == label else 0.0) for i in range(len(out))])
    g6 = np.zeros_like(f6)
    for i in range(len(f6)):
        for n_ in range(len(g_out)):
            g6[i] += g_out[n_] * params["output.weight"][n_, i]
        if f6[i] <= 0:
            g6[i] = 0.0
    g5 = np.zeros_like(f5)
    for i in range(len(f5)):
        for n_ in range(len(g6)):
            g5[i] += g6[n_] * params["ff6.weight"][n_, i]
        if f5[i] <= 0:
            g5[i] = 0.0
    g_flat = np.zeros_like(flat)
    for i in range(len(flat)):
        for n_ in range(len(g5)):
            g_flat[i] += g5[n_] * params["ff5.weight"][n_, i]
    g_p4 = g_flat.reshape(p4.shape)
    g_c3 = maxpool_backward(g_p4, w4, c3.shape)
    g_c3[c3 <= 0] = 0.0
    g_p2 = np.zeros_like(p2)
    k3 = params["conv3.weight"].shape[-1]
    for f in range(g_c3.shape[1]):
        for i in range(g_c3.shape[2]):
            for j in range(g_c3.shape[3]):
                g_p2[0, :, i:i + k3, j:j + k3] += g_c3[0, f, i, j] * params["conv3.weight"][f]
    g_c1 = maxpool_backward(g_p2, w2, c1.shape)
    g_c1[c1 <= 0] = 0.0
    # updates
    p["output.weight"] -= lr * np.outer(g_out, f6)
    p["output.bias"] -= lr * g_out
    p["ff6.weight"] -= lr * np.outer(g6, f5)
    p["ff6.bias"] -= lr * g6
    p["ff5.weight"] -= lr * np.outer(g5, flat)
    p["ff5.bias"] -= lr * g5
    for name, g, inp, pad in (("conv3", g_c3, p2, 0), ("conv1", g_c1, x, padding1)):
        w = params[name + ".weight"]
        k = w.shape[-1]
        xin = np.pad(inp, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        dw = np.zeros_like(w)
        for f in range(g.shape[1]):
            for i in range(g.shape[2]):
                for j in range(g.shape[3]):
                    dw[f] += g[0, f, i, j] * xin[0, :, i:i + k, j:j + k]
        p[name + ".weight"] -= lr * dw
        p[name + ".bias"] -= lr * g[0].sum(axis=(1, 2))
    return p
