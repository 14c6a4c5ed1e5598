"""edgernn: streaming edge inference for recurrent networks.

    model = edgernn.load("model.ern")
    state = model.new_state()
    y = model.step(x, state)        # one sample in, one prediction out, state advanced in place

Importing this package loads numpy only; numba compiles lazily on first use, and torch/onnx/paho are
imported only by the modules that need them.
"""

from .errors import ConversionError, EdgeRNNError, FormatError, InputError, SpecError, StreamingError
from .spec import DenseLayer, ModelSpec, RecurrentLayer

__version__ = "0.1.0"

__all__ = [
    "Model", "load", "save", "ModelSpec", "RecurrentLayer", "DenseLayer", "StreamTable",
    "EdgeRNNError", "SpecError", "InputError", "FormatError", "ConversionError", "StreamingError",
]


def __getattr__(name):
    # Lazy so that `import edgernn` stays cheap (the CLI and the daemon import it first).
    if name == "Model":
        from .model import Model
        return Model
    if name in ("load", "save"):
        from . import format as _format
        return getattr(_format, name)
    if name == "StreamTable":
        from .streams import StreamTable
        return StreamTable
    raise AttributeError(f"module 'edgernn' has no attribute {name!r}")
