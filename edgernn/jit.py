"""Numba where it imports, stand-ins where it does not: the one place edgernn imports numba at load time.

32-bit Raspberry Pi OS has no numba wheels. There the Numba kernels (`edgernn.stack`, `edgernn.cells`)
still import -- ``njit`` leaves them plain, unused Python functions -- and `edgernn.model` runs the NumPy
kernels (`edgernn.numpy_stack`) instead: the same results, much slower. One warning says so and why, logged
(logger ``edgernn.jit``) rather than issued with `warnings`, which the CLI silences. ``EDGERNN_DISABLE_NUMBA=1``
chooses the NumPy kernels where numba is installed.
"""

from __future__ import annotations

import logging
import os

DISABLE_VARIABLE = "EDGERNN_DISABLE_NUMBA"
log = logging.getLogger(__name__)


def _import_numba():
    """(numba module or None, why not)."""
    setting = os.environ.get(DISABLE_VARIABLE, "").strip()
    if setting not in ("", "0"):
        return None, f"numba is disabled by {DISABLE_VARIABLE}={setting}"
    try:
        import numba
    except Exception as exc:  # ImportError, or a broken install (llvmlite's library fails to load: OSError)
        return None, f"numba is not importable ({type(exc).__name__}: {exc})"
    return numba, None


_numba, UNAVAILABLE_REASON = _import_numba()
NUMBA_AVAILABLE = _numba is not None
KERNELS = "numba" if NUMBA_AVAILABLE else f"numpy ({UNAVAILABLE_REASON})"
"""Which kernels `edgernn.Model` runs, in words, for logs: "numba" or "numpy (why numba is not used)"."""

if NUMBA_AVAILABLE:
    from numba import get_thread_id, njit, prange
else:
    log.warning("%s: edgernn runs its NumPy kernels, which give the same results but are many times slower; "
                "%s for full speed", UNAVAILABLE_REASON,
                f"unset {DISABLE_VARIABLE}" if UNAVAILABLE_REASON.startswith("numba is disabled") else "install numba",
                extra={"event": "kernels", "kernels": "numpy"})
    prange = range

    def njit(*args, **options):
        """`numba.njit`'s stand-in, as ``@njit`` and ``@njit(...)``: the function itself, not compiled."""
        if len(args) == 1 and callable(args[0]) and not options:
            return args[0]
        return lambda function: function

    def get_thread_id() -> int:
        return 0


def thread_count() -> int:
    """Threads the batched kernels may use (Numba's pool; the NumPy kernels run on the calling thread)."""
    return _numba.config.NUMBA_NUM_THREADS if NUMBA_AVAILABLE else 1
