"""Converters: PyTorch and ONNX models in, edgernn models (and ONNX step models) out.

torch and onnx are imported lazily, inside the functions that need them.
"""


def from_torch(source, **options):
    """A PyTorch module or checkpoint file -> `edgernn.Model`. See `edgernn.converters.torch.from_torch`."""
    from .torch import from_torch as _from_torch
    return _from_torch(source, **options)


def from_onnx(source, **options):
    """An ONNX file or ModelProto (torch.onnx.export, tf2onnx from Keras) -> `edgernn.Model`.
    See `edgernn.converters.onnx_import.from_onnx`."""
    from .onnx_import import from_onnx as _from_onnx
    return _from_onnx(source, **options)


def to_onnx(model, path=None, **options):
    """An `edgernn.Model` -> ONNX step model (one sample for B streams). See `edgernn.converters.onnx_export`."""
    from .onnx_export import to_onnx as _to_onnx
    return _to_onnx(model, path, **options)


__all__ = ["from_onnx", "from_torch", "to_onnx"]
