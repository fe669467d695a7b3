"""Saved configs for the form: YAML files under <saves>/configs/, plus the shipped examples/.

Loading goes through `core.config.load`, so a file the form loads is checked by
the same rules as one given to `tunebench train`. Only files listed by
`available()` (or uploaded) are read; a typed path is never opened.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from core import config as cfg
from core import limits, paths, runs
from core.errors import BadInput
from core.i18n import msg

EXAMPLES = Path("examples")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def config_dir(saves_dir: Path) -> Path:
    return Path(saves_dir) / "configs"


LAST_FORM = ".last-form.yaml"   # what the form last started or saved, restored on reload


def available(saves_dir: Path) -> list[str]:
    """Paths of the saved configs (newest first), then the example configs."""
    folder = config_dir(saves_dir)
    saved = sorted((p for p in folder.glob("*.yaml") if not p.name.startswith(".")),
                   key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    examples = sorted(EXAMPLES.glob("*.yaml")) if EXAMPLES.is_dir() else []
    return [str(p) for p in saved + examples]


def _writable_dir(saves_dir: Path) -> Path:
    """configs/, created, resolved inside the saves folder: a link out of it is refused."""
    folder = paths.confine(config_dir(saves_dir), "config folder",
                           roots=[Path(saves_dir).resolve()])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save(config: cfg.TrainConfig, name: str, saves_dir: Path) -> Path:
    """Write the form's config as <saves>/configs/<name>.yaml. Returns the path."""
    name = name.strip().removesuffix(".yaml")
    if not _NAME.match(name):
        raise BadInput(msg("ui.train.err.config_name", name=limits.quote(name)))
    runs.write_atomic(_writable_dir(saves_dir) / f"{name}.yaml", cfg.to_yaml(config))
    return config_dir(saves_dir) / f"{name}.yaml"  # as available() lists it


def load(path: str | Path, allowed: list[str] | None = None) -> cfg.TrainConfig:
    """Read a config file for the form; `allowed` (when given) lists the paths it may be,
    and those are read only where they resolve inside the folders they are listed in."""
    if allowed is not None:
        if str(path) not in allowed:
            raise BadInput(msg("ui.train.err.not_listed_config"), file=limits.quote(str(path)))
        # Listed, but a listed name may be a symlink: its target must stay in the folders
        # the listed files are in.
        roots = list({Path(p).parent.resolve() for p in allowed})
        path = paths.confine(path, "config file", roots=roots, must_exist=True)
    return cfg.load(path)


def for_new_run(config: cfg.TrainConfig) -> cfg.TrainConfig:
    """A run's config, made ready to start a new run (its folder and resume point dropped)."""
    return dataclasses.replace(config, output_dir="", run_name="", resume=False)


def remember(config: cfg.TrainConfig, saves_dir: Path) -> None:
    """Keep the form's config as the one a reloaded page shows (a run's folder and resume
    point dropped: a reload should offer a new run, not repeat the old folder)."""
    try:
        runs.write_atomic(_writable_dir(saves_dir) / LAST_FORM,
                          cfg.to_yaml(for_new_run(config)))
    except (BadInput, OSError):
        pass  # remembering the form is a convenience; Start and Save do not fail over it


def last(saves_dir: Path) -> cfg.TrainConfig | None:
    """The config the form last started or saved, or None (never saved, or no longer
    valid, e.g. its dataset was removed: then the page opens with the first job)."""
    path = config_dir(saves_dir) / LAST_FORM
    if not path.is_file() or path.is_symlink():
        return None
    try:
        return cfg.load(path)
    except BadInput:
        return None
