"""Shared fixtures.

The demo model is built once per test session (about a minute on 2 cores) into a
cache folder that every subprocess also sees through TUNEBENCH_CACHE, so
`model=demo` in a `tunebench train` subprocess or a browser test resolves to
the same folder. The build is deterministic, so a cache left by an earlier
session is reused as it is (the folder name carries the recipe version).
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TUNEBENCH_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) /
                                             "tunebench-test-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    from core.demo_model import ensure_demo_model

    return Path(ensure_demo_model(progress=lambda *args, **kwargs: None))
