"""SGD: the only code that changes weights.

Defined as PyTorch's SGD (dampening 0, no Nesterov), so runs compare step for step:
    g = grad + weight_decay * w
    v = momentum * v + g        (v = g on the first step)
    w = w - lr * v
With momentum 0 and weight_decay 0 this is the seed's `w -= learningRate * gradient`.
"""

import numpy as np


class SGD:
    def __init__(self, params, grads, lr, momentum=0.0, weight_decay=0.0):
        """params and grads: dicts of name -> array, the same names; updated in place.

        When the arrays are consecutive views of one flat buffer (as a Model's are), each
        step is a few NumPy calls on the whole buffer instead of a few per array: the same
        element-wise arithmetic, so the same bits, at a tenth of the cost for batch 1.
        """
        self.params, self.grads = params, grads
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        names = list(params)
        flat_w, flat_g = _tiled_base(params.values()), _tiled_base(grads[n] for n in names)
        if flat_w is not None and flat_g is not None:
            self._pairs = [(flat_w, flat_g)]
        else:
            self._pairs = [(params[n], grads[n]) for n in names]
        self._velocity = None  # momentum buffers, one per pair, created on the first step

    def step(self, lr=None):
        # A Python float stays a weak scalar: a NumPy float64 lr would promote float32 weights.
        lr = float(self.lr if lr is None else lr)
        if self.momentum and self._velocity is None:
            self._velocity = [None] * len(self._pairs)
        for i, (w, g) in enumerate(self._pairs):
            if self.weight_decay:
                g = g + self.weight_decay * w
            if self.momentum:
                v = self._velocity[i]
                if v is None:
                    v = self._velocity[i] = g.copy()
                else:
                    v *= self.momentum
                    v += g
                g = v
            w -= lr * g  # in place: the layers hold these same arrays

    @property
    def velocity(self):
        """name -> momentum buffer (views of the buffers the steps use); empty before the
        first step with momentum."""
        if self._velocity is None:
            return {}
        return _views_like(self.params, self._pairs, self._velocity)

    def state(self):
        """Momentum buffers by parameter name (empty without momentum), for checkpoints."""
        return {name: v.copy() for name, v in self.velocity.items()}

    def load_state(self, velocity):
        """Restore momentum buffers saved by state(): all of them, or none."""
        for name, v in velocity.items():
            if name not in self.params or np.shape(v) != self.params[name].shape:
                raise ValueError(f"optimizer state for {name!r} does not match the model")
        if not velocity:
            return
        missing = sorted(set(self.params) - set(velocity))
        if missing:
            raise ValueError(f"optimizer state lacks {', '.join(missing)}")
        self._velocity = [np.empty_like(w) for w, _ in self._pairs]
        for name, view in _views_like(self.params, self._pairs, self._velocity).items():
            view[...] = velocity[name]


def _tiled_base(arrays):
    """The flat buffer that `arrays` are consecutive, contiguous views of, in order and
    covering all of it; None when they are not."""
    arrays = list(arrays)
    if not arrays:
        return None
    base = arrays[0].base
    if base is None or base.ndim != 1 or not base.flags.c_contiguous:
        return None
    address = base.ctypes.data
    for a in arrays:
        if a.base is not base or not a.flags.c_contiguous or a.dtype != base.dtype \
                or a.ctypes.data != address:
            return None
        address += a.nbytes
    return base if address == base.ctypes.data + base.nbytes else None


def _views_like(params, pairs, buffers):
    """name -> the part of `buffers` (one per pair, shaped like the pair's weight) that
    lies where params[name] lies in its pair's weight."""
    if len(pairs) == len(params) and all(w is params[n] for (w, _), n in zip(pairs, params)):
        return dict(zip(params, buffers))
    flat, start, views = buffers[0], 0, {}
    for name, w in params.items():
        views[name] = flat[start:start + w.size].reshape(w.shape)
        start += w.size
    return views
