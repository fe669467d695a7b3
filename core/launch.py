"""Start and stop `tunebench train` in the background, from the web UI or a script.

A launched run is a detached child process: its own session and process group,
stdin closed, stdout and stderr appended to `train.log`. Closing the browser or
restarting the web server does not touch it; from then on the run directory is
the only channel between the trainer and whoever watches it.

One run at a time on this machine, wherever its folder is: a second start is
refused with a message naming the running run (two trainers would fight over
the same CPU or GPU). Running jobs are found through core/jobs.py, and the
check and the spawn happen under its machine-wide lock, so two clicks at once
cannot both pass the check.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from . import config as cfg
from . import jobs, paths, runs
from .errors import BadInput
from .i18n import Msg, msg

# Runs this process is aborting: their exit is "aborted", not a crash.
_aborting: set[str] = set()


def job_command(command: str, config_path: Path) -> list[str]:
    """The argument list that runs `tunebench <command> <config_path>` (train or eval): the
    CLI, exactly as a user types it."""
    script = Path(sys.executable).with_name("tunebench")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), command, str(config_path)]
    return [sys.executable, "-m", "core", command, str(config_path)]


def train_command(config_path: Path) -> list[str]:
    return job_command("train", config_path)


def running_runs(saves_dir: str | Path) -> list[runs.RunSummary]:
    """Every run whose trainer is alive: those under `saves_dir`, and every job tunebench
    started elsewhere on this machine (core/jobs.py). Dead ones are marked failed on the way."""
    found, seen = [], set()
    for child in runs.run_dirs(Path(saves_dir)):
        status = runs.read_status(child)
        if status and status.get("state") == "running":
            found.append(_running(child, status))
            seen.add(child.resolve())
    for job in jobs.active():
        if job.run_dir not in seen:
            status = runs.read_status(job.run_dir) or {"started_at": job.started_at}
            found.append(_running(job.run_dir, status))
    return found


def _running(run_dir: Path, status: dict) -> runs.RunSummary:
    return runs.RunSummary(run_dir, run_dir.name, "running", status.get("started_at", ""),
                           None, "", None)


def refuse_if_busy(saves_dir: Path) -> None:
    """BadInput naming the running job when any run or eval job is going on this machine."""
    busy = running_runs(saves_dir)
    if busy:
        run = busy[0]
        inside = runs.find_run(saves_dir, run.name) is not None
        where = (msg("job.busy.run", name=run.name) if inside
                 else msg("job.busy.elsewhere", path=str(run.path)))
        raise BadInput(msg("job.busy", where=where, started=run.started_at))


def _new_run_dir(config: cfg.TrainConfig, saves_dir: Path) -> Path:
    """The run folder for a Start: the one naming rule (runs.pick_run_dir), with the page's
    extra condition that runs started here live under the saves folder, where the runs
    list finds them."""
    if config.output_dir:
        confined = paths.confine(config.output_dir, "output_dir", roots=[saves_dir.resolve()])
        config = dataclasses.replace(config, output_dir=str(confined))
    return runs.pick_run_dir(config, saves_dir)


def start_run(config: cfg.TrainConfig, saves_dir: str | Path = "saves",
              queue: bool = False) -> Path:
    """Create a new run directory for `config` and start training it in the background.

    Writes config.yaml (with output_dir set to the run folder), command.txt and an
    initial status.json, then spawns `tunebench train <run_dir>/config.yaml`.
    Raises BadInput if another run is still going or the folder is taken; with `queue`,
    a busy machine (or a non-empty queue) queues the run instead (core/job_queue.py,
    status `queued`).
    """
    from . import job_queue
    saves_dir = Path(saves_dir)
    problems = cfg.validate(config)
    if problems:
        raise BadInput(runs.semicolons(problems))

    def place(saves: Path) -> tuple[Path, cfg.TrainConfig]:
        run_dir = _new_run_dir(config, saves)
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir, dataclasses.replace(config, output_dir=str(run_dir),
                                            run_name=run_dir.name)
    return _start_or_queue(saves_dir, place, "train", runs.LOG, queue,
                           gpus=job_queue.gpus_needed(config))


def _start_or_queue(saves_dir: Path, place, command: str, log_name: str, queue: bool,
                    gpus: int = 1, **status) -> Path:
    """The one way a job starts: under the machine-wide lock, start it now when the
    machine is free; when it is busy (or jobs wait), queue it if `queue`, else refuse.
    `place(saves_dir)` makes the job's folder and returns it with the config to write."""
    from . import job_queue
    with jobs.lock():
        waits = queue and bool(running_runs(saves_dir) or job_queue.has_waiting(saves_dir))
        if not waits:
            refuse_if_busy(saves_dir)
        folder, config = place(saves_dir)
        if waits:
            runs.write_atomic(folder / runs.CONFIG, cfg.to_yaml(config))
            job_queue.enqueue(folder, saves_dir, command, gpus)
        else:
            _spawn(folder, config, command, log_name, **status)
    if waits:
        job_queue.ensure_runner(saves_dir)
    return folder


def resume_run(run_dir: str | Path, saves_dir: str | Path = "saves") -> Path:
    """Continue a stopped run from its last checkpoint, in the same run directory."""
    run_dir = Path(run_dir)
    status = runs.read_status(run_dir)
    if status is None:
        raise BadInput(msg("job.not_run_folder"), file=str(run_dir))
    if status["state"] in ("running", "queued"):
        raise BadInput(msg("job.resume.still", name=run_dir.name,
                           state=msg(f"job.state.{status['state']}")))
    if runs.last_checkpoint(run_dir) is None:
        raise BadInput(msg("job.resume.no_checkpoint", name=run_dir.name))
    config = cfg.load(run_dir / runs.CONFIG)
    config = dataclasses.replace(config, output_dir=str(run_dir), resume=True)
    with jobs.lock():
        refuse_if_busy(Path(saves_dir))
        _spawn(run_dir, config)
    return run_dir


def start_eval(config: cfg.EvalConfig, saves_dir: str | Path = "saves",
               queue: bool = False) -> Path:
    """Create an eval job folder under `saves_dir` and start `tunebench eval` on it in the
    background, as start_run does for training (one job at a time on this machine; with
    `queue`, a busy machine queues it)."""
    from .evaluate import KIND, LOG, job_dir_for

    def place(saves: Path):
        folder = job_dir_for(dataclasses.replace(config, output_dir=""), saves)
        folder.mkdir(parents=True)
        return folder, dataclasses.replace(config, output_dir=str(folder))
    return _start_or_queue(Path(saves_dir), place, "eval", LOG, queue, kind=KIND)


def start_export(job, saves_dir: str | Path = "saves", queue: bool = False) -> Path:
    """Create an export job folder under `saves_dir`/exports and start `tunebench export` on
    it in the background (core/export_job.py), as start_eval does for an eval job. The
    light checks (settings, destination, free disk space) refuse before anything starts."""
    from .export_job import KIND, LOG, job_dir_for, preflight
    preflight(job)

    def place(saves: Path):
        folder = job_dir_for(saves, job)
        folder.mkdir(parents=True)
        return folder, job
    return _start_or_queue(Path(saves_dir), place, "export", LOG, queue, kind=KIND)


def _spawn(run_dir: Path, config, command: str = "train", log_name: str = runs.LOG,
           **status) -> subprocess.Popen:
    runs.write_atomic(run_dir / runs.CONFIG, cfg.to_yaml(config))
    return spawn_job(run_dir, command, log_name, **status)


def spawn_job(run_dir: Path, command: str = "train", log_name: str = runs.LOG,
              env: dict | None = None, cwd: str | None = None, **status) -> subprocess.Popen:
    """Start `tunebench <command>` on the config.yaml already in `run_dir`, detached
    (`env`: extra variables; `cwd`: where its relative paths point; the queue uses both)."""
    config_path = run_dir / runs.CONFIG
    argv = job_command(command, config_path)
    runs.write_atomic(run_dir / runs.COMMAND, shlex.join(argv) + "\n")
    _aborting.discard(str(run_dir.resolve()))
    with open(run_dir / log_name, "ab") as log:
        # Own session: the trainer and its workers form one process group that
        # abort can signal as a whole, and that a Ctrl-C in the server's terminal
        # (or the server exiting) never reaches.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                close_fds=True, env=_child_env() | (env or {}), cwd=cwd)
    # Written right after the spawn; the trainer rewrites both (same pid) once it runs.
    runs.write_status(run_dir, "running", pid=proc.pid, **status)
    jobs.register(run_dir, proc.pid)
    threading.Thread(target=_reap, args=(proc, run_dir), daemon=True,
                     name=f"reap-{proc.pid}").start()
    return proc


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # the log tail should show lines as they are printed
    return env


def _reap(proc: subprocess.Popen, run_dir: Path) -> None:
    """Wait for the trainer (so it leaves no zombie) and record a death it could not report."""
    code = proc.wait()
    status = runs.read_status_raw(run_dir) or {}
    unreported = status.get("state") == "running" or status.get("guessed")
    if not unreported or status.get("pid") != proc.pid:
        return  # the trainer wrote its own ending (or a newer start owns the folder)
    if str(run_dir.resolve()) in _aborting:
        return  # abort_run writes the ending
    runs.write_status(run_dir, "failed", pid=proc.pid, exit_code=code,
                      **runs.error_fields(_death_message(code, run_dir)))


def _death_message(code: int, run_dir: Path) -> Msg:
    what = runs.job_word((runs.read_status_raw(run_dir) or {}).get("kind"))
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = msg("job.death.signal", number=-code)
        oom = msg("job.death.oom_hint") if code == -signal.SIGKILL else ""
        cause = msg("job.death.killed", what=what, name=name, hint=oom)
    else:
        cause = msg("job.death.exited", what=what, code=code)
    log = runs.log_path(run_dir)
    tail = log_tail(log, lines=8).strip()
    return msg("job.death.with_tail", cause=cause, log=log.name, tail=tail) if tail else cause


def log_tail(path: Path, lines: int = 30, max_bytes: int = 64 * 1024) -> str:
    """The last `lines` lines of a log, reading at most `max_bytes` from its end."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            chunk = fh.read()
    except FileNotFoundError:
        return ""
    text = chunk.decode("utf-8", errors="replace")
    # Progress bars redraw with \r; show each bar's latest state only.
    rows = [row.rsplit("\r", 1)[-1] for row in text.split("\n")]
    if size > max_bytes:
        rows = rows[1:]  # the first row was cut in the middle
    return "\n".join(rows[-lines - 1:] if rows and rows[-1] == "" else rows[-lines:])


def abort_run(run_dir: str | Path, grace_s: float = 8.0) -> dict:
    """Stop a run's whole process tree and mark it aborted. Returns the final status.

    SIGTERM first, so the trainer can write "aborted" and finish its checkpoint;
    SIGKILL after `grace_s`. If the trainer could not write its ending (it died
    hard, or was killed), the ending is written here.
    """
    run_dir = Path(run_dir)
    status = runs.read_status(run_dir)
    if status is None:
        raise BadInput(msg("job.not_run_folder"), file=str(run_dir))
    if status["state"] != "running":
        return status
    pid = status["pid"]
    _aborting.add(str(run_dir.resolve()))
    leader = _is_group_leader(pid)
    _signal_tree(pid, signal.SIGTERM)
    if not _wait_gone(pid, status.get("started_at"), grace_s):
        _signal_tree(pid, signal.SIGKILL)
        _wait_gone(pid, status.get("started_at"), 5.0)
    if leader:
        _wait_group_gone(pid, 5.0)
    final = runs.read_status_raw(run_dir) or {}
    if final.get("state") == "running" or (final.get("state") == "failed" and not
                                           final.get("exit_code")):
        final = runs.write_status(run_dir, "aborted", pid=pid, exit_code=final.get("exit_code"),
                                  error=None)
    return final


def stop_job(run_dir: str | Path, saves_dir: str | Path) -> None:
    """Stop a job where it stands: a queued one leaves the queue (its folder says it never
    started), a running one is aborted. BadInput when it is neither."""
    from . import job_queue
    state = (runs.read_status(Path(run_dir)) or {}).get("state")
    if state == "queued":
        job_queue.cancel(saves_dir, Path(run_dir))
    elif state == "running":
        abort_run(run_dir)
    else:
        raise BadInput(msg("job.stop.not_active", name=Path(run_dir).name,
                           state=msg(f"job.state.{state}") if state else "None"))


def _is_group_leader(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def _signal_tree(pid: int, sig: int) -> None:
    """Signal the trainer and everything it started.

    A trainer launched here leads its own process group, so the group is signalled.
    One started by hand (`tunebench train` from a script) shares its parent's
    group, which must not be hit: then the process and its descendants are.
    """
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
            return
        targets = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except (ProcessLookupError, psutil.NoSuchProcess):
        return
    except PermissionError:
        raise BadInput(msg("job.stop.not_allowed", pid=pid)) from None
    for target in targets:
        try:
            os.kill(target, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(pid: int, started_at: str | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not runs.pid_alive(pid, started_at):
            return True
        time.sleep(0.1)
    return not runs.pid_alive(pid, started_at)


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is left in the group."""
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return False


def _wait_group_gone(pgid: int, timeout: float) -> None:
    """Wait for stragglers (data workers) of the group; kill them if they outlive the leader."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
