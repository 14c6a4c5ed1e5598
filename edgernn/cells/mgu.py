"""Minimal gated unit (Zhou et al., 2016): a GRU whose reset and update gates are one forget gate f.
Gate blocks in canonical order f, n:

    f  = sigmoid(W_f x + Wb_f + R_f h + Rb_f)
    n  = tanh(W_n x + Wb_n + R_n (f * h) + Rb_n)
    h' = (1 - f) * h + f * n
"""

import numpy as np

from .activations import sigmoid_reference


def mgu_reference(x, h, W, R, Wb, Rb, f=sigmoid_reference, g=np.tanh, clip=None):
    """One step: x (I,), h (H,), W (2H, I), R (2H, H), Wb/Rb (2H,) or None -> h' (H,)."""
    H = h.shape[0]
    if Wb is None:
        Wb = Rb = np.zeros(2 * H)
    bound = (lambda v: v) if clip is None else (lambda v: np.clip(v, -clip, clip))
    W_f, W_n = np.split(W, 2)
    R_f, R_n = np.split(R, 2)
    Wb_f, Wb_n = np.split(Wb, 2)
    Rb_f, Rb_n = np.split(Rb, 2)
    forget = f(bound(W_f @ x + Wb_f + R_f @ h + Rb_f))
    n = g(bound(W_n @ x + Wb_n + R_n @ (forget * h) + Rb_n))
    return (1.0 - forget) * h + forget * n
