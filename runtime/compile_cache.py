"""Where the compiled kernels live: the directory handed to Numba before it is imported.

Numba reads ``NUMBA_CACHE_DIR`` once, when it is imported, and each kernel picks its cache directory when
its module is imported: code cannot move the cache later. So `edgernn serve` and `edgernn warmup` read the
config first and export the directory before anything imports numba (importing this module does not).

Which directory, first match wins:

1. ``[state] compile_cache`` in the config: the operator wrote it for this daemon;
2. ``NUMBA_CACHE_DIR`` in the environment (the systemd unit sets ``/var/cache/edgernn``; the tests set
   their own), so an environment that already chose a cache keeps it;
3. ``<[state] dir>/numba-cache``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_VARIABLE = "NUMBA_CACHE_DIR"
DEFAULT_SUBDIR = "numba-cache"


def compile_cache_dir(state_config, environ=os.environ) -> tuple[Path, str]:
    """(the directory, where it came from in words) for a `StateConfig`."""
    if state_config.compile_cache is not None:
        return Path(state_config.compile_cache), "the config's [state] compile_cache"
    if environ.get(CACHE_VARIABLE):
        return Path(environ[CACHE_VARIABLE]), f"{CACHE_VARIABLE} in the environment"
    return Path(state_config.dir) / DEFAULT_SUBDIR, "the default, [state] dir/" + DEFAULT_SUBDIR


def use_compile_cache(state_config) -> tuple[Path, str]:
    """Export the compile cache as ``NUMBA_CACHE_DIR`` for this process and its children, before numba loads;
    returns what `compile_cache_dir` said (asked again afterwards, it would name the environment).

    A process that imported numba already keeps its cache; that is logged, not fatal (the kernels still run,
    they may just compile again).
    """
    directory, origin = compile_cache_dir(state_config)
    os.environ[CACHE_VARIABLE] = str(directory)
    numba_config = sys.modules.get("numba.core.config")
    if numba_config is not None and os.path.abspath(numba_config.CACHE_DIR or "") != os.path.abspath(directory):
        log.warning("numba was imported before the config was read: kernels are cached in %r, not in %s (%s)",
                    numba_config.CACHE_DIR, directory, origin)
    else:
        log.debug("compile cache: %s (%s)", directory, origin)
    return directory, origin


def numba_cache_in_use() -> str | None:
    """The directory Numba caches kernels in for this process, or None where the NumPy kernels run."""
    from edgernn.jit import NUMBA_AVAILABLE

    if not NUMBA_AVAILABLE:
        return None
    from numba.core import config as numba_config

    return numba_config.CACHE_DIR or None
