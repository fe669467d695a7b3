"""One machine-wide file lock, for the few read-check-write steps that processes share.

Used for the launch lock (core/jobs.py: check that nothing runs, then start), the
dataset registry (core/data.py: read, add an upload, rewrite) and the demo model
build (core/demo_model.py: a second process waits, then reuses the first build).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock; these steps are rare enough to go unlocked there
    fcntl = None


@contextlib.contextmanager
def held(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) while the block runs.

    flock is released when the file closes, so a holder that crashes or is killed
    never leaves the lock taken. The folder holding `path` must exist.
    """
    with open(path, "a+") as handle:
        if fcntl is None:
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
