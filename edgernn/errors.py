"""The exception hierarchy. Every error edgernn raises on purpose is an `EdgeRNNError`.

Each also derives from the builtin a caller would naturally catch (ValueError, OSError), so code that
does not know edgernn still handles it sensibly.
"""


class EdgeRNNError(Exception):
    """Base class of every error edgernn raises on purpose."""


class SpecError(EdgeRNNError, ValueError):
    """A model spec is invalid; the message names the offending field."""


class InputError(EdgeRNNError, ValueError):
    """An input sample or state has the wrong shape, dtype or a non-finite value.

    Raised before any state is touched: the state is unchanged.
    """


class FormatError(EdgeRNNError, OSError):
    """A model or snapshot file is truncated, corrupted, foreign or of an unknown version."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConversionError(EdgeRNNError, ValueError):
    """A source model cannot be converted, or its conversion does not compute what the source does."""


class StreamingError(EdgeRNNError, ValueError):
    """The model cannot advance one sample at a time (e.g. a bidirectional layer)."""


class SignatureError(EdgeRNNError, ValueError):
    """A model file's signature is missing, does not match the file, or is by no trusted key; or a key file is
    not an Ed25519 key (`edgernn.signing`). The message names the file; ``reason`` is one word for counters:
    unsigned, bad_signature (not a signature), tampered, untrusted (no trusted key made it), key, unreadable."""

    def __init__(self, message: str, reason: str = "key"):
        super().__init__(message)
        self.reason = reason
