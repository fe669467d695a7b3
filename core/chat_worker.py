"""The chat model runs in its own process; the web UI talks to it over JSON lines.

Why a process: loading or generating may run out of memory or crash, and that
must not take the page server down. Unloading is the process exiting, so the
memory is really returned to the system. The server stays free of torch.

Protocol: one JSON object per line. Requests (stdin) carry an "id" and an "op":
    {"op": "load", "model": ..., "checkpoint": ..., "trust_remote_code": false,
     "head": "causal"|"score"}      score: a reward model, which scores replies
    {"op": "generate", "messages": [...], "settings": {...}, "side": "after"|"before"}
    {"op": "score", "prompt": str, "replies": [str, ...]}     with a reward model loaded
    {"op": "cancel"}     stops the reply being generated (handled at once)
    {"op": "exit"}
Events (stdout) carry the request's "id" and an "event":
    progress {message, fraction} | loaded {info, text} | piece {text} | done {stats}
    | scored {scores} | error {kind: "bad_input"|"oom"|"error", message}
A text for people comes with its language-neutral record beside it (message_msg, text_msg;
a bad_input error's "record": BadInput.record_of()), and the client renders it again in the
page's language: the worker's own language is whatever its environment says.
Run the worker with `python -m core.chat_worker`; `ChatWorker` is the client side.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import queue
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from .errors import BadInput
from .i18n import Msg, msg, recorded_msg, text_of

_ROOT = Path(__file__).resolve().parent.parent  # the folder holding the core package


LOAD_WAIT_S = 600     # a message waits this long for a load in progress (a hub model is slow)
LOAD_GRACE_S = 1.5    # ... and this long for a load whose button was just pressed


class WorkerError(Exception):
    """The worker reported a failure (out of memory, a crash); the message is for people,
    shown in the reader's language when it is a Msg."""

    def __init__(self, message: "str | Msg", kind: str = "error"):
        super().__init__(text_of(message, "en"))
        self.what = message
        self.kind = kind

    def text(self, lang: str | None = None) -> str:
        return text_of(self.what, lang)

    def __str__(self) -> str:
        return self.text()


def _message_of(event: dict, key: str = "message") -> "str | Msg":
    """An event's text as a Msg when the worker sent its record (`<key>_msg`), so that the
    page renders it in its visitor's language; else the text as it came."""
    return recorded_msg(event, key) or ""


def _record(key: str, message) -> dict:
    """The payload of a message: its text in this process's language and, for a Msg, its
    language-neutral record beside it."""
    found = {key: text_of(message)}
    if isinstance(message, Msg):
        found[f"{key}_msg"] = message.record()
    return found


# --- client side (imported by the web UI: no torch here) --------------------------

class ChatWorker:
    """Starts and talks to one chat worker process. Thread-safe; one request at a time."""

    def __init__(self, env: dict | None = None):
        self.env = env or {}                   # extra environment for the worker process
        self.proc: subprocess.Popen | None = None
        self.info: dict | None = None          # what is loaded (ChatEngine.Loaded as a dict)
        self.described: str | Msg = ""         # the loaded model, described for the page
        self._ids = itertools.count(1)
        self._busy = threading.Lock()
        self._write = threading.Lock()
        self._loading = threading.Event()      # set from Load's press until the load ends
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)

    @property
    def text(self) -> str:
        """The loaded model, described in the current language (the page's visitor's)."""
        return text_of(self.described)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **self.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
        self._stderr.clear()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "core.chat_worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
            bufsize=1, env=env, cwd=str(_ROOT))
        threading.Thread(target=self._drain_stderr, args=(self.proc,), daemon=True).start()

    def _drain_stderr(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self._stderr.append(line.rstrip())

    def _send(self, request: dict) -> None:
        with self._write:
            try:
                self.proc.stdin.write(json.dumps(request, ensure_ascii=False) + "\n")
                self.proc.stdin.flush()
            except (OSError, ValueError, AttributeError):
                raise self._gone() from None

    def _gone(self) -> WorkerError:
        self.info = None
        code = self.proc.wait(timeout=5) if self.proc else None
        why = (msg("chat.worker.killed") if code in (-9, 137)
               else msg("chat.worker.exit_code", code=str(code)))
        last = [line for line in self._stderr if line.strip()][-3:]
        detail = (": " + " | ".join(last)[-400:]) if last and code not in (-9, 137) else ""
        return WorkerError(msg("chat.worker.stopped", why=why, detail=detail), "crash")

    def _events(self, request_id: int) -> Iterator[dict]:
        """Events for one request until its final one (loaded, done, scored or error)."""
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise self._gone()
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # not protocol output; the worker routes prints to stderr anyway
            if event.get("id") != request_id:
                continue
            if event["event"] == "error":
                if event["kind"] == "bad_input":
                    raise _bad_input(event)
                raise WorkerError(_message_of(event), event["kind"])
            if "message_msg" in event:  # a progress line, in this page's language
                event["message"] = text_of(_message_of(event))
            yield event
            if event["event"] in ("loaded", "done", "scored"):
                return

    def _acquire(self, timeout: float = 1.0) -> None:
        if not self._busy.acquire(timeout=timeout):
            raise BadInput(msg("chat.busy"))

    def expect_load(self) -> None:
        """Load was pressed: a message sent from now on waits for the load to finish."""
        self._loading.set()

    def load_abandoned(self) -> None:
        """The load that was expected will not happen (its input was refused)."""
        if self._busy.acquire(blocking=False):  # not mid-load
            self._loading.clear()
            self._busy.release()

    def _wait_for_load(self) -> float:
        """How long to wait for the model lock: a load in progress (or just requested) is
        waited for, so a message sent right after Load is answered, not refused."""
        if self.info is None and not self._loading.is_set():
            self._loading.wait(LOAD_GRACE_S)  # Load's handler may start a moment after ours
        return LOAD_WAIT_S if self._loading.is_set() else 1.0

    def load(self, model: str, checkpoint: str | None = None,
             trust_remote_code: bool = False, head: str = "causal") -> Iterator[dict]:
        """Start a fresh worker and load into it; yields progress events, then 'loaded'.
        head 'score' loads a reward model (for `score`) instead of a model to chat with."""
        self._loading.set()
        try:
            self._acquire(LOAD_WAIT_S)
        except BadInput:
            self._loading.clear()
            raise
        try:
            self._stop()
            self._start()
            request_id = next(self._ids)
            self._send({"id": request_id, "op": "load", "model": model, "checkpoint": checkpoint,
                        "trust_remote_code": trust_remote_code, "head": head})
            for event in self._events(request_id):
                if event["event"] == "loaded":
                    self.info, self.described = event["info"], _message_of(event, "text")
                    event["text"] = self.text
                yield event
        except BaseException:
            if self.info is None:
                self._stop()  # a failed load leaves nothing running
            raise
        finally:
            self._loading.clear()
            self._busy.release()

    def generate(self, messages: list[dict], settings: dict, side: str = "after",
                 stats: dict | None = None) -> Iterator[str]:
        """Stream a reply as text pieces; `stats` (if given) receives the final figures."""
        self._acquire(self._wait_for_load())
        finished = False
        try:
            if not self.alive or self.info is None:
                finished = True
                raise BadInput(msg("chat.no_model_pick"))
            request_id = next(self._ids)
            self._send({"id": request_id, "op": "generate", "messages": messages,
                        "settings": settings, "side": side})
            for event in self._events(request_id):
                if event["event"] == "piece":
                    yield event["text"]
                elif event["event"] == "done" and stats is not None:
                    stats.update(event["stats"])
            finished = True
        except (BadInput, WorkerError):
            finished = True
            raise
        finally:
            if not finished and self.alive:  # the page went away mid-reply: stop and resync
                self._send({"op": "cancel"})
                for _ in self._events(request_id):
                    pass
            self._busy.release()

    def score(self, prompt: str, replies: list[str]) -> list[float]:
        """The loaded reward model's score of each reply to `prompt` (one user message)."""
        self._acquire(self._wait_for_load())
        try:
            if not self.alive or self.info is None:
                raise BadInput(msg("chat.no_reward_model_pick"))
            request_id = next(self._ids)
            self._send({"id": request_id, "op": "score", "prompt": prompt,
                        "replies": list(replies)})
            for event in self._events(request_id):
                if event["event"] == "scored":
                    return [float(x) for x in event["scores"]]
            raise WorkerError(msg("chat.worker.no_scores"))  # not expected
        finally:
            self._busy.release()

    def cancel(self) -> None:
        if self.alive:
            self._send({"op": "cancel"})

    def _stop(self) -> None:
        proc, self.proc, self.info, self.described = self.proc, None, None, ""
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
            proc.stdin.flush()
            proc.wait(timeout=10)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()

    def unload(self) -> None:
        """End the worker process, which returns all its memory to the system."""
        self.cancel()
        self._acquire()
        try:
            self._stop()
        finally:
            self._busy.release()


def _bad_input(event: dict) -> BadInput:
    """The worker's BadInput, rebuilt from its record so that it reads in the language of
    whoever sees it on the page; from its text when no record came."""
    return BadInput.rebuilt(event.get("record"), event["message"])


# --- worker side ----------------------------------------------------------------

def _handle(engine, request: dict, emit) -> None:
    from .chat import oom_message
    from .config import gen_config
    from .memory import is_out_of_memory

    request_id = request.get("id")
    op = request.get("op")
    try:
        if op == "load":
            loaded = engine.load(
                request["model"], request.get("checkpoint"), bool(request.get("trust_remote_code")),
                progress=lambda message, fraction: emit(request_id, "progress",
                                                        **_record("message", message),
                                                        fraction=fraction),
                head=request.get("head") or "causal")
            emit(request_id, "loaded", info=asdict(loaded),
                 **_record("text", loaded.describe_msg()))
        elif op == "score":
            scores = engine.score(str(request.get("prompt", "")),
                                  [str(r) for r in request.get("replies", [])])
            emit(request_id, "scored", scores=scores)
        elif op == "generate":
            settings = gen_config(request.get("settings", {}), source="the chat settings")
            for piece in engine.stream(request["messages"], settings, request.get("side", "after")):
                emit(request_id, "piece", text=piece)
            stats = engine.stats
            emit(request_id, "done", stats=dict(asdict(stats), tokens_per_s=stats.tokens_per_s))
        else:
            emit(request_id, "error", kind="error", message=f"unknown request '{op}'")
    except BadInput as err:
        emit(request_id, "error", kind="bad_input", message=str(err), record=err.record_of())
    except Exception as err:  # noqa: BLE001 - reported to the page, the worker lives on
        if is_out_of_memory(err):
            emit(request_id, "error", kind="oom", **_record("message", oom_message(op)))
        else:
            import traceback
            traceback.print_exc()  # to stderr, for the developer; the page gets one line
            emit(request_id, "error", kind="error", message=f"{type(err).__name__}: {err}")


def _cap_memory() -> None:
    """TUNEBENCH_CHAT_MEMORY_MB caps what the model may take, so a model too big for the
    machine fails here with a clear "out of memory" (see memory.cap_from_env)."""
    from .memory import cap_from_env
    cap_from_env("TUNEBENCH_CHAT_MEMORY_MB",
                 ("peft", "transformers.modeling_utils", "safetensors.torch"))


def serve() -> int:
    """The worker's main loop: read requests from stdin, answer on stdout."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    lock = threading.Lock()

    def emit(request_id, event, **payload):
        with lock:
            protocol.write(json.dumps({"id": request_id, "event": event, **payload},
                                      ensure_ascii=False) + "\n")

    from .chat import ChatEngine
    engine = ChatEngine()
    requests: queue.Queue = queue.Queue()

    def read():
        for line in sys.stdin:
            try:
                request = json.loads(line)
            except json.JSONDecodeError:
                continue
            if request.get("op") == "cancel":
                engine.cancel()  # at once, even while a reply is being generated
            else:
                requests.put(request)
        requests.put({"op": "exit"})  # the server went away: exit too

    threading.Thread(target=read, daemon=True).start()
    _cap_memory()  # after starting the reader: a thread's stack counts as address space
    while True:
        request = requests.get()
        if request.get("op") == "exit":
            return 0
        _handle(engine, request, emit)


if __name__ == "__main__":
    sys.exit(serve())
