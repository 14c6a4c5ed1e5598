"""Where the tests, benchmarks and reliability scripts keep Numba's compiled kernels.

Numba's on-disk cache is keyed by each kernel's own source file, so editing a cell module leaves the
cached entry points in stack.py stale. The tests therefore compile into a cache directory named by a
hash of all of edgernn's sources: a changed source always means a fresh compile, never stale kernels.
Child processes (a daemon started by a test) inherit the variable and share the cache.
"""

import hashlib
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def numba_cache_dir() -> Path:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "edgernn").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return ROOT / ".numba_cache" / digest.hexdigest()[:16]


def use_test_cache() -> None:
    """Point ``NUMBA_CACHE_DIR`` at the tests' cache (unless set already): before anything imports numba."""
    os.environ.setdefault("NUMBA_CACHE_DIR", str(numba_cache_dir()))
