"""Leaky-integrator unit, the cell of an echo-state network: each unit keeps part of its old value,

    h' = (1 - a) * h + a * tanh(W x + Wb + R h + Rb)        a = leak (H,), one rate per unit in (0, 1]

a = 1 is a plain RNN; a small a is a slow unit (time constant 1/a steps). In an echo-state network W and
R are a fixed random reservoir and only the dense head is trained (`edgernn.reservoir`).
"""

import numpy as np


def leaky_reference(x, h, W, R, Wb, Rb, leak, f=np.tanh, clip=None):
    """One step: x (I,), h (H,), W (H, I), R (H, H), Wb/Rb (H,) or None, leak (H,) -> h' (H,)."""
    a = W @ x + R @ h
    if Wb is not None:
        a = a + Wb + Rb
    return (1.0 - leak) * h + leak * f(a if clip is None else np.clip(a, -clip, clip))
