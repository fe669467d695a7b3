"""Where the web UI may read and write: the allowed roots, and confinement to them.

Every path typed or uploaded in the page (model, dataset, checkpoint, export
dir, config) goes through `confine` before use. The roots are the project's
data/ and saves/, the demo model cache, and whatever the user adds with
`tunebench webui --allow-root DIR` or TUNEBENCH_ALLOWED_ROOTS (os.pathsep-
separated). Paths are fully resolved first, so `../` tricks and symlinks that
point outside a root are refused too.

The CLI is not confined: a person at a terminal already has their own shell.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import BadInput

ENV_ROOTS = "TUNEBENCH_ALLOWED_ROOTS"


def project_root() -> Path:
    """The folder the app serves from (the working directory, where data/ and saves/ live)."""
    return Path.cwd().resolve()


def cache_root() -> Path:
    return Path(os.environ.get("TUNEBENCH_CACHE", "~/.cache/tunebench")).expanduser().resolve()


def allowed_roots(extra: list[str] | None = None) -> list[Path]:
    root = project_root()
    roots = [root / "data", root / "saves", cache_root()]
    env = [p for p in os.environ.get(ENV_ROOTS, "").split(os.pathsep) if p]
    roots += [Path(p).expanduser().resolve() for p in env + list(extra or [])]
    return roots


def is_inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def confine(raw: str | Path, what: str = "path", roots: list[Path] | None = None,
            must_exist: bool = False) -> Path:
    """Resolve `raw` (relative to the project) and check it lies under an allowed root."""
    text = str(raw).strip()
    if not text:
        raise BadInput(f"{what} is empty")
    if "\x00" in text:
        raise BadInput(f"{what} contains a NUL byte")
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = project_root() / path
    resolved = path.resolve()  # follows symlinks, so a link out of a root is caught below
    roots = roots if roots is not None else allowed_roots()
    if not any(is_inside(resolved, root) for root in roots):
        shown = ", ".join(str(r) for r in roots)
        raise BadInput(f"{what} '{text}' is outside the allowed folders ({shown}); start the app "
                       "with --allow-root DIR to allow another folder")
    if must_exist and not resolved.exists():
        raise BadInput(f"{what} '{text}' does not exist")
    return resolved


def confine_model(raw: str, roots: list[Path] | None = None) -> str:
    """Models may also be 'demo' or a hub id (org/name), which are not paths."""
    text = str(raw).strip()
    looks_like_hub_id = (text.count("/") <= 1 and not text.startswith((".", "/", "~"))
                         and not Path(text).exists())
    if text == "demo" or looks_like_hub_id:
        return text
    return str(confine(text, "model", roots, must_exist=True))
