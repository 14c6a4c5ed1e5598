"""Test-session setup.

Numba's on-disk cache is keyed by each kernel's own source file, so editing a cell module leaves the
cached entry points in stack.py stale. The tests therefore compile into a cache directory named by a
hash of all of edgernn's sources: a changed source always means a fresh compile, never stale kernels.
"""

import hashlib
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "edgernn").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache" / _sources_digest()))
