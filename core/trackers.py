"""Experiment trackers (`report_to`): transformers' own integrations, one row each.

transformers does the logging; tunebench only checks, before any model loads, that the
tracker's package is installed and that it can log in (an error an hour into a run, or a
login prompt in a process with no terminal, is what this avoids), and points the tracker
at the run folder unless the user's environment already says where to write.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .i18n import Msg, msg


def _env_says(name: str, *values: str) -> bool:
    return os.environ.get(name, "").lower() in values


def _netrc_has(host: str, path: Path | None = None) -> bool:
    try:
        return netrc.netrc(str(path) if path else None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _wandb_ready() -> bool:
    return (bool(os.environ.get("WANDB_API_KEY"))
            or _env_says("WANDB_MODE", "offline", "dryrun", "disabled")
            or _netrc_has("api.wandb.ai"))


def _swanlab_ready() -> bool:
    return (bool(os.environ.get("SWANLAB_API_KEY"))
            or _env_says("SWANLAB_MODE", "local", "offline", "disabled")
            or _netrc_has("api.swanlab.cn", Path.home() / ".swanlab" / ".netrc"))


@dataclass(frozen=True)
class Tracker:
    package: str                              # what must be importable
    where: Callable[[Path], dict[str, str]]   # environment that points it at the run folder
    ready: Callable[[], bool] = lambda: True  # logged in, or told to stay offline
    login: str = ""                           # what to do when not ready (a message id)


TRACKERS = {
    "tensorboard": Tracker("tensorboard",
                           lambda run: {"TENSORBOARD_LOGGING_DIR": str(run / "tensorboard")}),
    # mlflow 3 refuses its file store unless told (it steers to a database server); a store
    # in the run folder is what an offline workbench wants
    "mlflow": Tracker("mlflow", lambda run: {"MLFLOW_TRACKING_URI": (run / "mlruns").as_uri(),
                                             "MLFLOW_ALLOW_FILE_STORE": "true"}),
    "wandb": Tracker("wandb", lambda run: {"WANDB_DIR": str(run)}, _wandb_ready,
                     "config.trackers.login.wandb"),
    "swanlab": Tracker("swanlab", lambda run: {"SWANLAB_LOG_DIR": str(run / "swanlog")},
                       _swanlab_ready,
                       "config.trackers.login.swanlab"),
}
CHOICES = ("none", *TRACKERS)


def problems(name: str) -> list[Msg]:
    """Why `name` cannot log from this machine; empty when it can (or for "none")."""
    tracker = TRACKERS.get(name)
    if tracker is None:
        return []
    if importlib.util.find_spec(tracker.package) is None:
        return [msg("config.trackers.not_installed", name=name)]
    if not tracker.ready():
        return [msg("config.trackers.needs_login", name=name, login=msg(tracker.login))]
    return []


def prepare(name: str, run_dir: Path) -> list[str]:
    """Point the tracker at the run folder (where the environment does not already say);
    returns the trainer's `report_to`."""
    tracker = TRACKERS.get(name)
    if tracker is None:
        return []
    for key, value in tracker.where(Path(run_dir)).items():
        os.environ.setdefault(key, value)
    return [name]
