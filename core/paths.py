"""Where the web UI may read and write: the allowed roots, and the one gate to them.

Every path that comes from the page, or from a job the page started, goes through
`confine` before it is used: model, dataset (a registered name resolves to its
file, and that file is gated), dataset_dir, checkpoint, resume point, output and
export folders, config files, upload targets. The gate

  - refuses bad text first (NUL bytes, lone surrogates, over-long names), naming
    the field, so nothing is created from it;
  - expands `~`, makes the path absolute against the project folder, and resolves
    symlinks at every level (the file and each parent);
  - checks the result against the allowed roots: the project's data/ and saves/,
    the demo model cache, and folders added with `tunebench webui --allow-root DIR`
    or TUNEBENCH_ALLOWED_ROOTS (os.pathsep-separated).

The page server sets TUNEBENCH_CONFINE=1 in its own environment, which every job
it starts inherits (trainer, preview, chat worker, export). Core code that opens a
user-given path calls `guard`, which is the same gate when confinement is on and
a plain `~` expansion otherwise: the CLI is not confined, since a person at a
terminal already has their own shell.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import limits
from .errors import BadInput
from .i18n import msg

ENV_ROOTS = "TUNEBENCH_ALLOWED_ROOTS"
CONFINE_ENV = "TUNEBENCH_CONFINE"
SAVES_ENV = "TUNEBENCH_SAVES"   # where runs go (`tunebench webui --saves-dir`); default ./saves


def project_root() -> Path:
    """The folder the app serves from (the working directory, where data/ and saves/ live)."""
    return Path.cwd().resolve()


def saves_root() -> Path:
    """Where runs go: `tunebench webui --saves-dir`, else ./saves (relative, as listed)."""
    return Path(os.environ.get(SAVES_ENV) or "saves")


def cache_root() -> Path:
    return Path(os.environ.get("TUNEBENCH_CACHE", "~/.cache/tunebench")).expanduser().resolve()


def allowed_roots(extra: list[str] | None = None) -> list[Path]:
    """The folders the page may use, resolved (a saves/ that is itself a link to a big disk
    is the owner's choice, and its target is the root)."""
    root = project_root()
    roots = [root / "data", root / saves_root(), cache_root()]
    roots += [p for p in os.environ.get(ENV_ROOTS, "").split(os.pathsep) if p]
    roots += list(extra or [])
    return list(dict.fromkeys(Path(p).expanduser().resolve() for p in roots))  # no repeats


def confined() -> bool:
    """True inside the page server and every job it started."""
    return os.environ.get(CONFINE_ENV) == "1"


def confinement_env() -> dict[str, str]:
    """What a process needs in its environment to be confined as the page server is."""
    return {CONFINE_ENV: "1", ENV_ROOTS: os.pathsep.join(str(r) for r in allowed_roots())}


def is_inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def is_allowed(path: Path, roots: list[Path] | None = None) -> bool:
    """Whether an already resolved path lies under one of the roots."""
    return any(is_inside(path, root) for root in (roots if roots is not None
                                                  else allowed_roots()))


def expand_user(text: str | Path) -> Path:
    """`~` expanded, as the shell does; "~someone" with no such user is taken literally."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        return Path(text)


def expand(raw: str | Path, what: str = "path") -> Path:
    """`~` expanded and made absolute against the project folder; symlinks not yet resolved."""
    text = limits.check_path_text(str(raw).strip(), what)
    if not text:
        raise BadInput(msg("config.paths.empty", what=what))
    path = expand_user(text)
    return path if path.is_absolute() else project_root() / path


def confine(raw: str | Path, what: str = "path", roots: list[Path] | None = None,
            must_exist: bool = False) -> Path:
    """The gate: `raw` resolved (symlinks at every level) and checked against the roots.

    The existence check comes after the roots check, so the gate never tells whether
    a file outside the roots exists.
    """
    text = str(raw).strip()
    path = expand(text, what)
    try:
        resolved = path.resolve()  # follows every symlink, so a link out of a root is caught
    except (OSError, RuntimeError) as err:  # a symlink loop, an unreadable parent
        raise BadInput(msg("config.paths.unresolved", what=what, error=str(err))) from None
    roots = roots if roots is not None else allowed_roots()
    if not is_allowed(resolved, roots):
        shown = ", ".join(str(r) for r in roots)
        raise BadInput(msg("config.paths.outside", what=what, path=limits.quote(text),
                           roots=shown))
    if must_exist and not resolved.exists():
        raise BadInput(msg("config.paths.missing", what=what, path=limits.quote(text)))
    return resolved


def guard(raw: str | Path, what: str = "path", must_exist: bool = False) -> Path:
    """The gate when confined (see the module docstring); otherwise `~` expanded."""
    if confined():
        return confine(raw, what, must_exist=must_exist)
    return expand_user(limits.check_path_text(str(raw).strip(), what))


def looks_like_hub_id(text: str) -> bool:
    """'name' or 'org/name' that is not a local path: a model id for an online machine."""
    return (text.count("/") <= 1 and not text.startswith((".", "/", "~"))
            and not (project_root() / text).exists())


def confine_model(raw: str, roots: list[Path] | None = None) -> str:
    """Models may also be 'demo' or a hub id (org/name), which are not paths."""
    text = limits.check_path_text(str(raw).strip(), "model")
    if not text:
        raise BadInput(msg("config.paths.no_model"), field="model")
    if text == "demo" or looks_like_hub_id(text):
        return text
    return str(confine(text, "model", roots, must_exist=True))


def guard_model(raw: str) -> str:
    """`confine_model` when confined; otherwise the name unchanged."""
    return confine_model(raw) if confined() else str(raw).strip()


def confine_config(config, saves_dir: Path | None = None) -> None:
    """Gate every path a config names, as the page does before Start, Preview or Resume.

    The schema marks path settings (`path=True` in core/config.py); each passes the gate.
    A few need more than "inside the roots": the model may be 'demo' or a hub id, a
    registered dataset name resolves to its file (which is gated), and with `saves_dir`
    the run folder must lie inside it (page-started runs live there). A path setting
    added later is gated by the default rule without anyone remembering to.
    """
    import dataclasses

    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not f.metadata.get("path") or value in ("", None, True, False):
            continue
        special = _SPECIAL_PATHS.get(f.name)
        if special is not None:
            special(config, value, saves_dir)
        else:
            for item in value if isinstance(value, list) else [value]:
                confine(item, f.name)


def _confine_datasets(config, names: list[str], saves_dir) -> None:
    from . import data
    for name in names:
        data.resolve(name, config.dataset_dir, confine=True)


def _confine_dataset_dir(config, folder: str, saves_dir) -> None:
    from . import data
    data.data_dir(folder, confine=True)  # the roots plus the bundled data, read-only


def _confine_output_dir(config, folder: str, saves_dir) -> None:
    roots = [Path(saves_dir).resolve()] if saves_dir is not None else None
    confine(folder, "output_dir", roots=roots)


_SPECIAL_PATHS = {
    "model": lambda config, value, saves_dir: confine_model(value),
    "dataset": _confine_datasets,
    "dataset_dir": _confine_dataset_dir,
    "output_dir": _confine_output_dir,
    "resume": lambda config, value, saves_dir: confine(value, "resume", must_exist=True),
}
