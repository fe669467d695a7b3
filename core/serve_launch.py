"""Start, find and stop `tunebench serve` in the background, for the Chat tab's serving panel.

A server is a detached child process, as a launched run is (core/launch.py): its own
session and process group, stdin closed, output appended to `serve.log`. Closing the page
or restarting the web server does not stop it; the page finds it again through the job
folder's status.json, which `tunebench serve --job-dir` keeps up to date (its URL and model
ids once it listens, "completed" when it stops). The page changes the adapters a running
server serves through the server's own API (POST and DELETE /v1/adapters).

One server per saves folder, in `<saves>/.serve/` (a hidden name, so the runs list and the
checkpoint pickers skip it). A server is not a training job: it is not registered in
core/jobs.py and does not block a training run, though both then share the CPU (or GPU).
It listens on loopback only.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import launch, paths, runs
from .config import SERVE_KEY_ENV
from .errors import BadInput
from .i18n import Msg, msg
from .serve_engine import ADAPTER_NAME

FOLDER = ".serve"
LOG = "serve.log"
KIND = "serve"
HOST = "127.0.0.1"
FIRST_PORT = 8000
HEALTH_TIMEOUT_S = 0.5
ADAPTER_CALL_TIMEOUT_S = 120  # loading an adapter reads and checks its folder

_stopping: set[str] = set()   # job folders this process is stopping: their exit is no crash
_lock = threading.Lock()      # two clicks in this process; the file lock covers others


def job_dir(saves_dir: str | Path) -> Path:
    return Path(saves_dir) / FOLDER


def serve_command(model: str, adapters: dict[str, str], port: int, folder: Path) -> list[str]:
    """The argument list of `tunebench serve`, exactly as a user types it."""
    script = Path(sys.executable).with_name("tunebench")
    base = ([str(script)] if script.is_file() else [sys.executable, "-m", "core"])
    argv = base + ["serve", "--model", model]
    for name, path in adapters.items():
        argv += ["--adapter", f"{name}={path}"]
    return argv + ["--host", HOST, "--port", str(port), "--job-dir", str(folder)]


def adapter_name(path: str | Path) -> str:
    """The model id an adapter is served under: its run folder's name for final/
    ("identity"), plus "-ckpt-N" for checkpoint-N/; made valid for the API."""
    path = Path(path)
    run, leaf = path.parent.name, path.name
    if leaf == "final":
        name = run
    elif leaf.startswith("checkpoint-"):
        name = f"{run}-ckpt-{leaf[len('checkpoint-'):]}"
    else:
        name = leaf
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).lstrip("._-")[:64] or "adapter"
    assert ADAPTER_NAME.match(name), name
    return name


def adapter_names(paths_: list[str]) -> dict[str, str]:
    """{name: path} for the picked adapter folders; a repeated name gets "-2", "-3"..."""
    out: dict[str, str] = {}
    for path in paths_:
        base = name = adapter_name(path)
        k = 2
        while name in out:
            suffix = f"-{k}"
            name, k = base[:64 - len(suffix)] + suffix, k + 1
        out[name] = str(path)
    return out


def free_port(first: int = FIRST_PORT) -> int:
    """`first` when nothing listens there on loopback, else a port the system picks."""
    for port in (first, 0):
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise BadInput(msg("chat.serve.no_port", host=HOST))


# --- status -----------------------------------------------------------------------

def server_status(saves_dir: str | Path) -> dict | None:
    """The serve folder's status.json, reconciled with reality (a dead server that could
    not write its ending reads as failed), or None when no server was ever started here."""
    folder = job_dir(saves_dir)
    status = runs.read_status_raw(folder)
    if status is None:
        return None
    if status.get("state") == "running" and not runs.pid_alive(status.get("pid"),
                                                               status.get("started_at")):
        status = runs.write_status(folder, "failed", pid=status.get("pid"), guessed=True,
                                   **_error(msg("chat.serve.disappeared")))
    return status


def find_server(saves_dir: str | Path) -> dict | None:
    """The running server's status (url, models, adapters once it listens), or None."""
    status = server_status(saves_dir)
    return status if status and status.get("state") == "running" else None


def health_url(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1") + "/health"


def answering(status: dict | None) -> bool:
    """Whether the server of `status` listens and answers GET /health (0.5 s at most)."""
    url = (status or {}).get("url")
    if not url:
        return False
    try:
        with urllib.request.urlopen(health_url(url), timeout=HEALTH_TIMEOUT_S) as reply:
            return reply.status == 200
    except (OSError, ValueError):
        return False


# --- start and stop ----------------------------------------------------------------

class _FolderLock:
    """An exclusive lock on the serve folder, across processes (two page servers)."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"

    def __enter__(self):
        _lock.acquire()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a")
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()
        _lock.release()


def start_server(model: str, adapters: dict[str, str], saves_dir: str | Path,
                 port: int | None = None) -> Path:
    """Start `tunebench serve` for `model` and `adapters` ({name: path}) in the background.

    Returns the job folder (`<saves>/.serve`). Adapters must lie in the allowed folders;
    BadInput if a server already runs for this saves folder, naming its URL.
    """
    model = paths.confine_model(model or "")
    checked = _checked(adapters)
    folder = job_dir(saves_dir)
    with _FolderLock(folder):
        running = find_server(saves_dir)
        if running:
            where = running.get("url") or msg("chat.serve.starting_port",
                                              port=str(running.get("port", "?")))
            raise BadInput(msg("chat.serve.already_running", where=where))
        port = free_port() if port is None else port
        _spawn(folder, serve_command(model, checked, port, folder), port, model, checked)
    return folder


def _checked(adapters: dict[str, str]) -> dict[str, str]:
    """{name: resolved path}: valid model ids, folders under the allowed ones."""
    checked = {}
    for name, path in adapters.items():
        if not ADAPTER_NAME.match(name or ""):
            raise BadInput(msg("chat.serve.bad_adapter_name", name=str(name)))
        checked[name] = str(paths.confine(path, f"adapter '{name}'", must_exist=True))
    return checked


def apply_adapters(saves_dir: str | Path, adapters: dict[str, str]) -> tuple[list[str], list[str]]:
    """Make the running server serve exactly these adapters ({name: path}), through its own
    API: the base stays loaded and requests keep being answered. Returns (added, removed)
    names; an adapter served under the same name from another folder is replaced.
    All or nothing: when the server refuses one (BadInput, its reason named), the changes
    made before it are undone. BadInput too when no server answers."""
    checked = _checked(adapters)
    folder = job_dir(saves_dir)
    with _FolderLock(folder):
        status = find_server(saves_dir)
        if not status or not answering(status):
            raise BadInput(msg("chat.serve.not_running"))
        served = {n: str(Path(p).resolve()) for n, p in (status.get("adapters") or {}).items()}
        removed = [n for n, p in served.items() if checked.get(n) != p]
        added = [n for n, p in checked.items() if served.get(n) != p]
        new = [("POST", n, checked[n]) for n in added if n not in served]
        replaced = [change for n in added if n in served
                    for change in (("DELETE", n, served[n]), ("POST", n, checked[n]))]
        dropped = [("DELETE", n, served[n]) for n in removed if n not in checked]
        # new names first and plain removals last: a refusal then leaves the least to undo
        _change_all(status["url"], new + replaced + dropped)
    return added, removed


def _change_all(url: str, changes: list[tuple[str, str, str]]) -> None:
    """(method, name, path) calls in order; on a refusal, the ones made are undone."""
    made = []
    try:
        for change in changes:
            _change(url, *change)
            made.append(change)
    except BadInput:
        for method, name, path in reversed(made):
            try:
                _change(url, "DELETE" if method == "POST" else "POST", name, path)
            except BadInput:
                pass  # the server lost it meanwhile: the refusal below says what happened
        raise


def _change(url: str, method: str, name: str, path: str) -> None:
    if method == "POST":
        _call(url, "POST", "/adapters", name, {"name": name, "path": path})
    else:
        _call(url, "DELETE", f"/adapters/{name}", name)


def _call(url: str, method: str, route: str, name: str, body: dict | None = None) -> dict:
    """One call to the server's adapter API (its key from the environment, if it has one)."""
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(SERVE_KEY_ENV)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url.rstrip("/") + route, data=data, headers=headers,
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=ADAPTER_CALL_TIMEOUT_S) as reply:
            return json.load(reply)
    except urllib.error.HTTPError as err:
        try:
            why = json.load(err)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            why = f"HTTP {err.code}"
        raise BadInput(msg("chat.serve.adapter_refused", name=name, why=why)) from None
    except OSError as err:
        raise BadInput(msg("chat.serve.adapter_refused", name=name, why=str(err))) from None


def _spawn(folder: Path, argv: list[str], port: int, model: str,
           adapters: dict[str, str]) -> subprocess.Popen:
    runs.write_atomic(folder / runs.COMMAND, shlex.join(argv) + "\n")
    _stopping.discard(str(folder.resolve()))
    with open(folder / LOG, "ab") as log:
        # Own session: stop_server signals the group; the page server's Ctrl-C never does.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                close_fds=True, env=launch._child_env())
    # Written at once, so the page shows "starting"; the server rewrites it when it listens.
    runs.write_status(folder, "running", pid=proc.pid, kind=KIND, url=None, port=port,
                      model=model, models=[], adapters=adapters)
    threading.Thread(target=_reap, args=(proc, folder), daemon=True,
                     name=f"reap-serve-{proc.pid}").start()
    return proc


def _reap(proc: subprocess.Popen, folder: Path) -> None:
    """Wait for the server (no zombie) and record a death it could not report."""
    code = proc.wait()
    status = runs.read_status_raw(folder) or {}
    unreported = status.get("state") == "running" or status.get("guessed")
    if not unreported or status.get("pid") != proc.pid or str(folder.resolve()) in _stopping:
        return
    tail = launch.log_tail(folder / LOG, lines=8).strip()
    cause = (msg("chat.serve.killed", signal=-code) if code < 0
             else msg("chat.serve.exited", code=code))
    runs.write_status(folder, "failed", pid=proc.pid, exit_code=code, **_error(
        msg("chat.serve.with_log", cause=cause, log=LOG, tail=tail) if tail else cause))


def _error(why: Msg) -> dict:
    """status.json's English `error` and, beside it, its record (`error_msg`) for the page."""
    err = BadInput(why)
    return {"error": err.text("en"), "error_msg": runs.error_record(err)}


def stop_server(saves_dir: str | Path, grace_s: float = 10.0) -> dict | None:
    """Stop the running server (SIGTERM to its process group, SIGKILL after `grace_s`) and
    return its final status ("completed"); None when none was ever started here."""
    folder = job_dir(saves_dir)
    status = server_status(saves_dir)
    if status is None or status.get("state") != "running":
        return status
    pid, started = status["pid"], status.get("started_at")
    _stopping.add(str(folder.resolve()))
    leader = launch._is_group_leader(pid)
    launch._signal_tree(pid, signal.SIGTERM)
    if not launch._wait_gone(pid, started, grace_s):
        launch._signal_tree(pid, signal.SIGKILL)
        launch._wait_gone(pid, started, 5.0)
    if leader:
        launch._wait_group_gone(pid, 5.0)
    final = runs.read_status_raw(folder) or {}
    if final.get("state") != "completed":
        # uvicorn re-raises the SIGTERM it caught once it has shut down, so the server
        # dies before its own "completed" is written: write it here, keeping what it served.
        kept = {k: status[k] for k in ("url", "models", "adapters") if k in status}
        final = runs.write_status(folder, "completed", pid=pid, error=None,
                                  exit_code=final.get("exit_code"), **kept)
    return final


def wait_answering(saves_dir: str | Path, timeout: float) -> dict:
    """Block until the server answers /health (for scripts and tests); BadInput if it dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = server_status(saves_dir) or {}
        if status.get("state") not in (None, "running"):
            raise BadInput(msg("chat.serve.stopped",
                               why=runs.error_text(status) or status["state"]))
        if answering(status):
            return status
        time.sleep(0.2)
    raise BadInput(msg("chat.serve.no_answer", timeout=timeout))
