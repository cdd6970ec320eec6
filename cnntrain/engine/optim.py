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
        """params and grads: dicts of name -> array, the same names; updated in place."""
        self.params, self.grads = params, grads
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.velocity = {}  # name -> momentum buffer, created on first use

    def step(self, lr=None):
        # A Python float stays a weak scalar: a NumPy float64 lr would promote float32 weights.
        lr = float(self.lr if lr is None else lr)
        for name, w in self.params.items():
            g = self.grads[name]
            if self.weight_decay:
                g = g + self.weight_decay * w
            if self.momentum:
                v = self.velocity.get(name)
                if v is None:
                    v = self.velocity[name] = g.copy()
                else:
                    v *= self.momentum
                    v += g
                g = v
            w -= lr * g  # in place: the layers hold these same arrays

    def state(self):
        """Momentum buffers by parameter name (empty without momentum), for checkpoints."""
        return {name: v.copy() for name, v in self.velocity.items()}

    def load_state(self, velocity):
        for name, v in velocity.items():
            if name not in self.params or np.shape(v) != self.params[name].shape:
                raise ValueError(f"optimizer state for {name!r} does not match the model")
            self.velocity[name] = np.array(v, dtype=self.params[name].dtype)
