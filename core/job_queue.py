"""The job queue: runs (and eval jobs) that wait for the devices, kept on disk under saves/.

Starting a job while the devices are busy puts it here instead of refusing it
(`tunebench train CONFIG --queue`, or Start on the Train tab). Everything is files:

    saves/.queue/<key>.json          one waiting job: run_dir, command, gpus, order, cwd,
                                     and the claim of the runner starting it (if any)
    saves/.queue/started/<key>.json  a job the runner started: pid and the GPUs it was given
    saves/.queue/runner.lock         flock held by the live runner (one per queue folder)
    saves/.queue/runner.log          the runner's own output

and the job's own run folder, created at once with config.yaml and status.json in the
state `queued` (the folder is hidden from the runs list: `.queue` starts with a dot).

A runner process (`python -m core.job_queue SAVES`, detached in its own session like a
trainer) polls the queue and starts its head when the devices it needs are free, then
exits when the queue is empty. Whatever queues a job makes sure a runner is alive, and
the page's tick revives a dead one. The browser, the page server and the runner can all
die without losing a job: the queue is only these files.

No job starts twice: a runner claims a job (rewrites its entry with its own pid) and
spawns it while holding the machine-wide launch lock (core/jobs.py), then moves the
entry to started/. A runner killed between those steps leaves a claimed entry; the next
runner, under the same lock, looks for evidence that the job started (its status left
`queued`, or a live process runs its config) before starting it again.

Devices: on a CPU machine every job takes the whole machine (one slot). With GPUs, a job
needs `num_devices` of them (1 for anything else) and runs beside others when that many
are free, with CUDA_VISIBLE_DEVICES set to its share. A job the queue did not start (from
a terminal, or Start on an idle machine) is taken to hold every device.
TUNEBENCH_FAKE_GPUS=N pretends the machine has N GPUs, for the slot logic only: a test
hook, so side-by-side scheduling can be tested on a CPU machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from . import jobs, runs
from .errors import BadInput
from .i18n import msg, t

QUEUE_DIR = ".queue"
STARTED = "started"
RUNNER_LOCK, RUNNER_LOG = "runner.lock", "runner.log"
FAKE_GPUS_ENV = "TUNEBENCH_FAKE_GPUS"  # test hook: the GPU count the slot logic sees
POLL_S = 0.5
JOB_LOGS = {"train": runs.LOG, "eval": runs.EVAL_LOG, "export": runs.EXPORT_LOG}
CANCELLED = "cancelled while queued; it never started"  # job.queue.cancelled's English

try:
    import fcntl
except ImportError:  # Windows: no flock, so no runner liveness check; jobs still start
    fcntl = None


@dataclass
class Entry:
    """One waiting job (a file in the queue folder)."""
    path: Path
    run_dir: Path
    command: str          # "train", "eval" or "export": the tunebench subcommand that runs it
    gpus: int             # GPUs it needs when the machine has any
    order: int            # place in the queue, smallest first
    cwd: str              # where it was queued: relative paths in its config mean this
    queued_at: str
    claim: dict | None    # {"pid", "started_at", "devices"} of the runner starting it

    def to_json(self) -> str:
        return json.dumps({"run_dir": str(self.run_dir), "command": self.command,
                           "gpus": self.gpus, "order": self.order, "cwd": self.cwd,
                           "queued_at": self.queued_at, "claim": self.claim}, indent=1)


def queue_dir(saves_dir: str | Path) -> Path:
    return Path(saves_dir).resolve() / QUEUE_DIR


def _key(run_dir: Path) -> str:
    return hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:20]


def _read_entry(path: Path) -> Entry | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Entry(path, Path(raw["run_dir"]), raw["command"], int(raw["gpus"]),
                     int(raw["order"]), raw.get("cwd") or os.getcwd(), raw["queued_at"],
                     raw.get("claim"))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a half-written file cannot exist (atomic writes); a foreign one is skipped


def entries(saves_dir: str | Path) -> list[Entry]:
    """The waiting jobs, head first."""
    folder = queue_dir(saves_dir)
    found = [e for e in map(_read_entry, sorted(folder.glob("*.json"))) if e is not None] \
        if folder.is_dir() else []
    return sorted(found, key=lambda e: (e.order, e.queued_at))


def position(run_dir: Path) -> int | None:
    """1 for the job that starts next; None when `run_dir` is not waiting in its queue."""
    status = runs.read_status_raw(run_dir) or {}
    if status.get("state") != "queued" or not status.get("queue"):
        return None
    resolved = Path(run_dir).resolve()
    for n, entry in enumerate(entries(Path(status["queue"]).parent), start=1):
        if entry.run_dir.resolve() == resolved:
            return n
    return None


def waiting_text(run_dir: Path) -> str:
    """What the page says of a queued job, on every tab."""
    place = position(run_dir)
    return t("job.queue.waiting", place=place) if place else t("job.queue.lost")


def state_label(run_dir: Path, state: str) -> str:
    """The runs list's state column: `queued #2` for a waiting job."""
    if state != "queued":
        return t(f"job.state.{state}") if state in runs.STATES else state
    n = position(run_dir)
    return t("job.queue.label", n=n) if n else t("job.state.queued")


# --- putting jobs in, taking them out (callers hold jobs.lock) --------------------------

def has_waiting(saves_dir: str | Path) -> bool:
    return bool(entries(saves_dir))


def enqueue(run_dir: Path, saves_dir: str | Path, command: str = "train", gpus: int = 1) -> int:
    """Put the job in `run_dir` (its config.yaml already written) at the end of the queue;
    returns its position. Hold jobs.lock, then call ensure_runner."""
    folder = queue_dir(saves_dir)
    (folder / STARTED).mkdir(parents=True, exist_ok=True)
    waiting = entries(saves_dir)
    run_dir = Path(run_dir).resolve()
    path = folder / f"{_key(run_dir)}.json"
    if any(e.path == path for e in waiting):
        raise BadInput(msg("job.queue.already"), file=str(run_dir))
    entry = Entry(path, run_dir, command, max(1, int(gpus)),
                  max((e.order for e in waiting), default=0) + 1, os.getcwd(), runs.now_iso(),
                  None)
    runs.write_status(run_dir, "queued", pid=None, queue=str(folder), **_kind(command))
    runs.write_atomic(path, entry.to_json())
    return len(waiting) + 1


def _kind(command: str) -> dict:
    return {} if command == "train" else {"kind": command}


def _find(saves_dir: str | Path, run_dir: Path) -> tuple[list[Entry], int]:
    waiting = entries(saves_dir)
    resolved = Path(run_dir).resolve()
    for i, entry in enumerate(waiting):
        if entry.run_dir.resolve() == resolved:
            return waiting, i
    raise BadInput(msg("job.queue.not_waiting", name=Path(run_dir).name))


def cancel(saves_dir: str | Path, run_dir: Path) -> dict:
    """Take a waiting job out of the queue. Its folder stays (config.yaml, to start again)
    and says `aborted`, with the reason as its error."""
    with jobs.lock():
        _settle(saves_dir)
        waiting, i = _find(saves_dir, run_dir)
        waiting[i].path.unlink()
        return runs.write_status(Path(run_dir), "aborted", pid=None,
                                 **runs.error_fields(msg("job.queue.cancelled")))


def move_up(saves_dir: str | Path, run_dir: Path) -> int:
    """Swap a waiting job with the one before it; returns its new position."""
    with jobs.lock():
        _settle(saves_dir)
        waiting, i = _find(saves_dir, run_dir)
        if i == 0:
            return 1
        this, before = waiting[i], waiting[i - 1]
        this.order, before.order = before.order, this.order
        if this.order == before.order:  # equal orders (hand-edited files): make room
            this.order -= 1
        runs.write_atomic(this.path, this.to_json())
        runs.write_atomic(before.path, before.to_json())
        return i


# --- devices ----------------------------------------------------------------------

def pick_devices(total: int, running: list[frozenset | None], need: int) -> tuple | None:
    """The devices a job needing `need` GPUs gets now, or None when it must wait.

    `total`: GPUs on the machine (0: a CPU machine, one slot). `running`: the devices each
    running job holds; None for a job that holds the whole machine. Returns () on a CPU
    machine, else the `need` lowest free device indices (`need` is capped at `total`).
    """
    if total <= 0 or any(r is None for r in running):
        return () if not running else None
    used = set().union(*running)
    free = [d for d in range(total) if d not in used]
    need = min(max(1, need), total)
    return tuple(free[:need]) if len(free) >= need else None


def visible_devices() -> list[str]:
    """The GPU ids jobs can be given (CUDA_VISIBLE_DEVICES' entries, when it is set)."""
    fake = os.environ.get(FAKE_GPUS_ENV)
    if fake is not None:
        return [str(i) for i in range(int(fake))]
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch
        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def _held_devices(saves_dir: str | Path) -> list[frozenset | None]:
    """What each running job holds: its share when the queue started it, else everything."""
    folder = queue_dir(saves_dir) / STARTED
    shares = {}
    for path in folder.glob("*.json") if folder.is_dir() else []:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if runs.pid_alive(raw.get("pid"), raw.get("started_at")):
            shares[Path(raw["run_dir"]).resolve()] = frozenset(raw.get("devices") or ())
        else:
            path.unlink(missing_ok=True)
    return [shares.get(job.run_dir.resolve()) for job in jobs.active()]


# --- starting (the runner's side, under jobs.lock) ----------------------------------

def _running_pid(entry: Entry) -> int | None:
    """The pid of a live process running this job's config, if one exists."""
    config = str(entry.run_dir / runs.CONFIG)
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if config in (proc.info["cmdline"] or []) and proc.status() != psutil.STATUS_ZOMBIE:
                return proc.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _settle(saves_dir: str | Path) -> None:
    """Finish what a killed runner left half done. Claims, starts and the move to started/
    all happen under jobs.lock, which the caller holds: any claim seen here is left over.
    A claimed job that started (its status left `queued`, or a live process runs its
    config) is moved to started/; one that never started loses its claim and waits again."""
    for entry in entries(saves_dir):
        if not entry.claim:
            continue
        status = runs.read_status_raw(entry.run_dir) or {}
        pid = status.get("pid") if status.get("state") != "queued" else _running_pid(entry)
        if status.get("state") != "queued" or pid:
            _record_start(saves_dir, entry, pid, entry.claim.get("devices") or [])
        else:
            entry.claim = None
            runs.write_atomic(entry.path, entry.to_json())


def _record_start(saves_dir, entry: Entry, pid: int | None, devices: list) -> None:
    record = {"run_dir": str(entry.run_dir), "pid": pid, "started_at": runs.now_iso(),
              "devices": list(devices)}
    started = queue_dir(saves_dir) / STARTED
    started.mkdir(parents=True, exist_ok=True)
    runs.write_atomic(started / entry.path.name, json.dumps(record))
    entry.path.unlink(missing_ok=True)


def start_ready(saves_dir: str | Path, ids: list[str] | None = None) -> list[Path]:
    """Start the head of the queue, and the jobs after it, while the devices they need are
    free (strict order: a job that must wait holds back the ones behind it). Call under
    jobs.lock. Returns the run folders started."""
    from . import launch
    _settle(saves_dir)
    ids = visible_devices() if ids is None else ids
    held = _held_devices(saves_dir)
    started = []
    for entry in entries(saves_dir):
        devices = pick_devices(len(ids), held, entry.gpus)
        if devices is None:
            break
        entry.claim = {"pid": os.getpid(), "started_at": runs.now_iso(),
                       "devices": list(devices)}
        runs.write_atomic(entry.path, entry.to_json())  # the claim, before anything starts
        env = {"CUDA_VISIBLE_DEVICES": ",".join(ids[d] for d in devices)} if ids else {}
        log = JOB_LOGS[entry.command]
        proc = launch.spawn_job(entry.run_dir, entry.command, log, env=env, cwd=entry.cwd,
                                **_kind(entry.command))
        _record_start(saves_dir, entry, proc.pid, devices)
        held.append(frozenset(devices) if ids else None)
        started.append(entry.run_dir)
    return started


# --- the runner ---------------------------------------------------------------------

@contextlib.contextmanager
def _runner_lock(saves_dir: str | Path):
    """Yields an open handle holding the runner lock, or None when another runner holds it."""
    folder = queue_dir(saves_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / RUNNER_LOCK, "a+") as handle:
        if fcntl is None:
            yield handle
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def runner_alive(saves_dir: str | Path) -> bool:
    with _runner_lock(saves_dir) as handle:
        return handle is None and fcntl is not None


def runner_pid(saves_dir: str | Path) -> int | None:
    """The live runner's pid (it writes it into the lock file), or None."""
    if not runner_alive(saves_dir):
        return None
    try:
        return int((queue_dir(saves_dir) / RUNNER_LOCK).read_text().strip())
    except (OSError, ValueError):
        return None  # it is between taking the lock and writing its pid


def run_queue(saves_dir: str | Path) -> int:
    """The runner's loop: start what fits, wait, and exit once nothing waits."""
    with _runner_lock(saves_dir) as handle:
        if handle is None:
            return 0  # another runner serves this queue
        handle.seek(0), handle.truncate(), handle.write(f"{os.getpid()}\n"), handle.flush()
        while True:
            with jobs.lock():
                for run_dir in start_ready(saves_dir):
                    print(f"{runs.now_iso()} started {run_dir}", flush=True)
                if not entries(saves_dir):
                    # Released under the launch lock: a job queued after this check finds
                    # no runner and starts a new one.
                    if fcntl is not None:
                        fcntl.flock(handle, fcntl.LOCK_UN)
                    print(f"{runs.now_iso()} queue empty; runner exits", flush=True)
                    return 0
            time.sleep(POLL_S)


def ensure_runner(saves_dir: str | Path) -> int | None:
    """Start a runner for this queue unless one is alive; returns the new runner's pid."""
    if runner_alive(saves_dir) or not has_waiting(saves_dir):
        return None
    folder = queue_dir(saves_dir)
    argv = [sys.executable, "-m", "core.job_queue", str(folder.parent)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1])] + [p for p in [env.get("PYTHONPATH")] if p])
    with open(folder / RUNNER_LOG, "ab") as log:
        # Own session, like a trainer: a Ctrl-C in the terminal that queued a job, or the
        # page server stopping, does not reach it.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                close_fds=True, env=env)
    _reap_later(proc)
    return proc.pid


def _reap_later(proc: subprocess.Popen) -> None:
    """Wait for the runner in a thread, so a long-lived caller (the page) keeps no zombie."""
    import threading
    threading.Thread(target=proc.wait, daemon=True, name=f"reap-runner-{proc.pid}").start()


_revived_at: dict[str, float] = {}
REVIVE_EVERY_S = 5.0


def revive(saves_dir: str | Path) -> None:
    """For the page's tick: start a runner when jobs wait and none is alive (at most one
    check every few seconds per queue)."""
    key = str(saves_dir)
    if time.monotonic() - _revived_at.get(key, 0.0) < REVIVE_EVERY_S:
        return
    _revived_at[key] = time.monotonic()
    if queue_dir(saves_dir).is_dir():
        ensure_runner(saves_dir)


# --- `tunebench train --queue` ----------------------------------------------------

def train_or_queue(config_path: str | None, overrides: list[str],
                   saves_dir: str | Path = "saves") -> int:
    """Train now in the foreground when nothing runs and nothing waits, as without
    --queue; else queue the run, print its folder and position, and return at once."""
    from . import config as cfg
    from . import train
    config = cfg.load_resolved(config_path, overrides).config
    problems = cfg.validate(config)
    if problems:
        raise BadInput(runs.semicolons(problems))
    with jobs.lock():
        now = not jobs.active() and not has_waiting(saves_dir)
        config, run_dir = train.prepare_run_dir(config, config_path)
        if now:  # claimed before the lock is released: the runner sees a busy machine
            jobs.register(run_dir, os.getpid())
        else:
            where = enqueue(run_dir, saves_dir, "train", gpus_needed(config))
    if now:
        return train.main(str(run_dir / runs.CONFIG), [])
    ensure_runner(saves_dir)
    print(f"queued at position {where}: {run_dir}")
    return 0


def report_handed_off(folder: Path) -> int:
    """For `tunebench eval|export --queue`: say where the job went, and whether it waits."""
    place = position(folder)
    where = f"queued at position {place}" if place else "started in the background"
    kind = (runs.read_status_raw(folder) or {}).get("kind", "train")
    print(f"{where}: {folder} (follow it in {folder / JOB_LOGS.get(kind, runs.LOG)})")
    return 0


def gpus_needed(config) -> int:
    """GPUs a job takes: one per process of a multi-process run, else one."""
    return max(1, int(getattr(config, "num_devices", 1) or 1))


if __name__ == "__main__":
    sys.exit(run_queue(sys.argv[1]))
