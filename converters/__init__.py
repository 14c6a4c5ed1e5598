"""Converters: PyTorch and ONNX models in, edgernn models (and ONNX step models) out.

torch and onnx are imported lazily, inside the functions that need them.
"""


def from_torch(source, **options):
    """A PyTorch module or checkpoint file -> `edgernn.Model`. See `edgernn.converters.torch.from_torch`."""
    from .torch import from_torch as _from_torch
    return _from_torch(source, **options)


__all__ = ["from_torch"]
