"""Every job tunebench has running on this machine, wherever its folder is.

A run folder can live anywhere (`output_dir`), so scanning saves/ alone misses
runs, and two trainers could end up fighting over one device. Each running job
therefore has an entry here: one small JSON file per run folder under
`<cache>/jobs/`, written by the launcher right after the spawn and by the
trainer itself when it starts (so runs started from a terminal count too), and
removed when the trainer ends. An entry whose process is gone (kill -9, a
reboot) is dropped when read, so a crash never leaves the machine "busy".

`lock()` serialises "check that nothing runs, then start" across every process
on the machine: two tabs, two servers, or a server and a script.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import locks, paths, runs


@dataclass
class Job:
    run_dir: Path
    pid: int
    started_at: str


def jobs_dir() -> Path:
    return paths.cache_root() / "jobs"


def _entry(run_dir: Path) -> Path:
    key = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:20]
    return jobs_dir() / f"{key}.json"


def lock() -> contextlib.AbstractContextManager:
    """The machine-wide launch lock, held while the block runs (released even on a crash)."""
    jobs_dir().mkdir(parents=True, exist_ok=True)
    return locks.held(jobs_dir() / ".lock")


def register(run_dir: Path, pid: int, started_at: str | None = None) -> None:
    """Record that `pid` is running the job in `run_dir`."""
    jobs_dir().mkdir(parents=True, exist_ok=True)
    job = {"run_dir": str(Path(run_dir).resolve()), "pid": pid,
           "started_at": started_at or runs.now_iso()}
    runs.write_atomic(_entry(run_dir), json.dumps(job))


def unregister(run_dir: Path, pid: int) -> None:
    """Drop the entry of `run_dir` if `pid` still owns it (a newer start keeps its own)."""
    path = _entry(run_dir)
    job = _read(path)
    if job is not None and job.pid == pid:
        path.unlink(missing_ok=True)


def _read(path: Path) -> Job | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Job(Path(raw["run_dir"]), int(raw["pid"]), str(raw["started_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def active() -> list[Job]:
    """The jobs whose process is alive; stale entries are removed on the way."""
    folder = jobs_dir()
    if not folder.is_dir():
        return []
    alive = []
    for path in folder.glob("*.json"):
        job = _read(path)
        if job is not None and runs.pid_alive(job.pid, job.started_at):
            alive.append(job)
        else:
            path.unlink(missing_ok=True)
    return sorted(alive, key=lambda j: j.started_at)


@contextlib.contextmanager
def own_pid_entry(run_dir: Path) -> Iterator[None]:
    """Register this process for `run_dir` while the block runs (the trainer's side)."""
    register(run_dir, os.getpid())
    try:
        yield
    finally:
        unregister(run_dir, os.getpid())
