"""A warm parent that answers each request in a fresh forked child.

The page reads datasets in a child process (see data_worker.py), so a hostile file
cannot grow the server's memory for good or crash it. Starting a Python process that
imports transformers takes about 3 s on a two-core machine, and a dataset preview
needed that every time. Here one long-lived parent imports everything once and then
forks a child per request: the child starts in a few milliseconds with every module
loaded, does the work, and exits, so its memory still goes with it and a crash still
takes down only the child. multiprocessing's "forkserver" context does not fit: it
pickles a callable per task and keeps no way to kill one task by its own deadline.

The protocol is one Unix-socket connection per request: the client sends one JSON
request and closes its side; the child sends its pid on the first line (so a client
whose deadline passed can kill it) and one JSON answer on the second.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Callable

from core.i18n import t

READY = "ready"
START_TIMEOUT_S = 120


class WorkerFailed(Exception):
    """The child died or answered nothing usable; the message says what is known."""


class ForkServer:
    """The client side: starts the parent on first use (again when the environment changed,
    since a child inherits the parent's environment), and sends requests to it."""

    def __init__(self, module: str):
        self.module = module
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.folder: Path | None = None
        self.env_key: tuple | None = None

    def ask(self, request: dict, timeout: float) -> dict:
        """Run one request in a fresh child; its answer. Raises TimeoutError, WorkerFailed."""
        path = self._ensure_started()
        payload = json.dumps({**request, "cwd": os.getcwd()}).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(path))
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            reply = _read_all(conn, timeout)
        return _answer_of(reply)

    def stop(self) -> None:
        with self.lock:
            self._stop()

    def _ensure_started(self) -> Path:
        key = tuple(sorted(os.environ.items()))
        with self.lock:
            if self.proc is not None and (self.proc.poll() is not None or key != self.env_key):
                self._stop()
            if self.proc is None:
                self._start(key)
            return self.folder / "sock"

    def _start(self, key: tuple) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="tunebench-fork-"))  # mode 0700
        self.proc = subprocess.Popen([sys.executable, "-m", self.module, "--fork-server",
                                      str(self.folder / "sock")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.env_key = key
        line = _readline_within(self.proc, START_TIMEOUT_S)
        if line.strip() != READY:
            self._stop()
            raise WorkerFailed(t("ui.train.err.worker_start", said=repr(line.strip())))

    def _stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout):
                pipe.close()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.proc, self.folder, self.env_key = None, None, None


def _readline_within(proc: subprocess.Popen, timeout: float) -> str:
    done: list[str] = []
    reader = threading.Thread(target=lambda: done.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return done[0] if done else ""


def _read_all(conn: socket.socket, timeout: float) -> bytes:
    """Everything the child sends; on a passed deadline, kill the child (its pid came first)."""
    chunks = []
    try:
        while chunk := conn.recv(1 << 16):
            chunks.append(chunk)
    except TimeoutError:
        pid = b"".join(chunks).split(b"\n", 1)[0]
        if pid.isdigit():
            _kill(int(pid))
        raise
    return b"".join(chunks)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _answer_of(reply: bytes) -> dict:
    lines = reply.decode("utf-8", errors="replace").splitlines()
    try:
        answer = json.loads(lines[1]) if len(lines) > 1 else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        raise WorkerFailed(t("ui.train.err.worker_died"))
    if "crash" in answer:
        raise WorkerFailed(answer["crash"])
    return answer


# --- the parent's side ---------------------------------------------------------------------

def serve(path: str, handle: Callable[[dict], dict]) -> int:
    """Listen on `path` until stdin closes (the client process is gone); fork per request."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print(READY, flush=True)
    os.dup2(2, 1)  # nobody reads the pipe after READY: what children print goes to stderr
    try:
        _accept_until_stdin_closes(listener, handle)
    finally:
        Path(path).unlink(missing_ok=True)
        Path(path).parent.rmdir()  # the client's private folder, empty now
    return 0


def _accept_until_stdin_closes(listener: socket.socket, handle: Callable[[dict], dict]) -> None:
    events = selectors.DefaultSelector()
    events.register(listener, selectors.EVENT_READ)
    events.register(sys.stdin, selectors.EVENT_READ)
    while True:
        for key, _ in events.select():
            if key.fileobj is sys.stdin:
                return  # EOF: whoever started this parent has exited
            conn, _ = listener.accept()
            if os.fork() == 0:
                listener.close()
                _child(conn, handle)  # never returns
            conn.close()


def _child(conn: socket.socket, handle: Callable[[dict], dict]) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the child's own subprocesses are waited on
    code = 0
    try:
        conn.sendall(f"{os.getpid()}\n".encode())
        with conn.makefile("rb") as stream:
            request = json.loads(stream.read())
        os.chdir(request.pop("cwd"))
        answer = handle(request)
    except BaseException:  # whatever happens, the client gets an answer, not a hang
        answer, code = {"crash": _last_lines(traceback.format_exc())}, 1
    try:
        conn.sendall((json.dumps(answer, ensure_ascii=False) + "\n").encode())
        conn.close()
    finally:
        os._exit(code)


def _last_lines(text: str, count: int = 5) -> str:
    return "\n".join(text.strip().splitlines()[-count:])
