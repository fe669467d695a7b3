"""The model process of `tunebench serve`, and the server's handle on it.

Why a process of its own: in one process, the HTTP side (parsing requests, writing SSE
chunks) and the decoding loop take turns on one GIL, and torch hands the GIL over in every
op, so each decoding step waited on the event loop many times. On the demo model the loop
alone answered the benchmark's 64 requests at about 960 tokens/s, but behind the HTTP server
in the same process at 290-410 (bench/RESULTS.md). vLLM splits its API server from its
engine the same way. The server process never imports torch.

One duplex pipe carries everything:
- server -> worker: (op, call id or None, args). Ops: encode_chat, encode_text, submit,
  cancel, add, remove, stats.
- worker -> server: ("ready", info) or ("failed", (what, field, file)) once at start;
  ("reply", call id, ok, value) for calls; ("events", [(row id, kind, value), ...]) once per
  decoding step, where kind is "delta" (new text) or "done" ((finish, text, tokens, message)).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import threading
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field

from .errors import BadInput
from .multi_lora import BASE as BASE_ROW  # a row without an adapter

SWITCH_INTERVAL_S = 0.0002  # the worker's command thread gives the model thread the GIL back soon


@dataclass(frozen=True)
class Sampling:
    """A row's sampling settings (the defaults: greedy)."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False   # write on past the end-of-turn tokens, to max_tokens (vLLM's name)


class Busy(Exception):
    """The queue is full: the client should retry later (HTTP 429)."""


class WorkerDied(Exception):
    """The model process ended (a crash, or the kernel's OOM killer)."""


# --- the worker process ------------------------------------------------------------

def worker_main(conn, model: str, adapters: dict[str, str], max_batch: int,
                prefix_cache_mb: float = 0) -> None:
    """Load the base and its adapters, then serve calls until the server goes away."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see core/train.py
    send = _locked_sender(conn)
    try:
        engine = _load(model, adapters, prefix_cache_mb)
    except BadInput as err:
        send(("failed", _bad(err)))
        return
    from .serve_engine import Scheduler
    scheduler = Scheduler(engine, lambda events: send(("events", events)), max_batch)
    scheduler.start()
    rows: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # for cancel
    send(("ready", _info(engine)))
    while True:
        try:
            op, call, args = conn.recv()
        except (EOFError, OSError):
            return  # the server is gone
        try:
            value = _handle(engine, scheduler, rows, op, args)
            ok = True
        except BadInput as err:
            value, ok = _bad(err), False
        if call is not None:
            send(("reply", call, ok, value))


def _bad(err: BadInput) -> tuple:
    return err.what, err.field, err.file


def _load(model: str, adapters: dict[str, str], prefix_cache_mb: float = 0):
    from .models import count_parameters, pick_cpu_threads
    from .serve_engine import Engine
    engine = Engine(model, prefix_cache_mb=prefix_cache_mb)
    # Decoding is one small step per token, as GRPO's sampling is: a small model runs it on
    # one thread, which leaves the other core to the HTTP server and the clients.
    pick_cpu_threads(count_parameters(engine.model)[1], generates=True)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return engine


def _info(engine) -> dict:
    return {"base_id": engine.base_id, "adapters": dict(engine.adapters),
            "context_length": engine.context_length}


def _handle(engine, scheduler, rows, op: str, args: tuple):
    from .serve_engine import Row
    if op == "submit":
        fresh = [Row(ids, adapter, sampling, max_tokens, tuple(stops), index, row_id)
                 for row_id, ids, adapter, sampling, max_tokens, stops, index in args[0]]
        rows.update((r.id, r) for r in fresh)
        scheduler.submit(fresh)
    elif op == "cancel":
        row = rows.get(args[0])
        if row is not None:
            row.cancelled.set()
    elif op == "encode_chat":
        return engine.encode_chat(args[0])
    elif op == "encode_text":
        return engine.encode_text(args[0])
    elif op == "add":
        engine.add_adapter(*args)
        return dict(engine.adapters)
    elif op == "remove":
        engine.remove_adapter(args[0])
        return dict(engine.adapters)
    elif op == "stats":
        return scheduler.stats()
    return None


def _locked_sender(conn):
    lock = threading.Lock()

    def send(message) -> None:
        with lock:
            conn.send(message)
    return send


# --- the server's side -------------------------------------------------------------

@dataclass(eq=False)
class Handle:
    """The server's view of one row: what its client has been told."""
    id: int
    index: int
    prompt_tokens: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    text: str = ""
    tokens: int = 0
    finish: str | None = None
    worker: "Worker | None" = field(default=None, repr=False)

    def cancel(self) -> None:
        if self.finish is None and self.worker is not None:
            self.worker.cancel(self)


class Worker:
    """The model process, started and spoken to from the server: the base's id, the adapters
    served, the context length, tokenizing, rows in and their events out."""

    def __init__(self, model: str, adapters: dict[str, str], max_batch: int, max_queue: int,
                 prefix_cache_mb: float = 0):
        import multiprocessing
        self.max_queue = max_queue
        ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no threads forked
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker_main,
                                   args=(child, model, adapters, max_batch, prefix_cache_mb),
                                   name="tunebench-serve-model", daemon=True)
        self.process.start()
        child.close()
        self.info = self._wait_ready()
        self.adapters: dict[str, str] = dict(self.info["adapters"])
        self._send = _locked_sender(self.conn)
        self._calls: dict[int, Future] = {}
        self._ids = itertools.count(1)
        self._rows: dict[int, Handle] = {}
        self._lock = threading.Lock()
        self.dead: str | None = None
        self.on_death = None              # called (from the reader thread) if the process dies
        self.closing = False
        threading.Thread(target=self._read, daemon=True, name="tunebench-serve-reader").start()

    def _wait_ready(self) -> dict:
        try:
            message = self.conn.recv()
        except EOFError:
            raise BadInput(f"the model process ended while loading (exit code "
                           f"{self.process.exitcode}); see the messages above") from None
        if message[0] == "failed":
            self.process.join(timeout=10)
            what, where, file = message[1]
            raise BadInput(what, field=where, file=file)
        return message[1]

    @property
    def base_id(self) -> str:
        return self.info["base_id"]

    @property
    def context_length(self) -> int | None:
        return self.info["context_length"]

    def model_ids(self) -> list[str]:
        return [self.base_id, *self.adapters]

    def load(self) -> int:
        with self._lock:
            return len(self._rows)

    # calls: awaited on the event loop, answered by the reader thread
    async def call(self, op: str, *args):
        if self.dead:
            raise WorkerDied(self.dead)
        future: Future = Future()
        call = next(self._ids)
        self._calls[call] = future
        self._send((op, call, args))
        ok, value = await asyncio.wrap_future(future)
        if not ok and value is None:
            raise WorkerDied(self.dead)
        if not ok:
            what, where, file = value
            raise BadInput(what, field=where, file=file)
        return value

    async def encode_chat(self, messages: list[dict]) -> list[int]:
        return await self.call("encode_chat", messages)

    async def encode_text(self, text: str) -> list[int]:
        return await self.call("encode_text", text)

    async def add_adapter(self, name: str, path: str) -> None:
        self.adapters = await self.call("add", name, path, True)

    async def remove_adapter(self, name: str) -> None:
        self.adapters = await self.call("remove", name)

    async def stats(self) -> dict:
        return await self.call("stats")

    def submit(self, prompts: list[list[int]], adapter: str, sampling: Sampling, max_tokens: int,
               stops: tuple, n: int) -> tuple[list[Handle], asyncio.Queue]:
        """Queue a request's rows (n per prompt); Busy when that would pass max_queue."""
        if self.dead:
            raise WorkerDied(self.dead)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        with self._lock:
            if len(self._rows) + len(prompts) * n > self.max_queue:
                raise Busy()
            handles = [Handle(next(self._ids), i * n + k, len(p), loop, events, worker=self)
                       for i, p in enumerate(prompts) for k in range(n)]
            self._rows.update((h.id, h) for h in handles)
        specs = [(h.id, prompts[h.index // n], adapter, sampling, max_tokens, stops, h.index)
                 for h in handles]
        self._send(("submit", None, (specs,)))
        return handles, events

    def cancel(self, handle: Handle) -> None:
        if not self.dead:
            self._send(("cancel", None, (handle.id,)))

    def _read(self) -> None:
        """The reader thread: replies to their callers, events to their rows' loops."""
        try:
            while True:
                message = self.conn.recv()
                if message[0] == "reply":
                    future = self._calls.pop(message[1])
                    future.set_result((message[2], message[3]))
                elif message[0] == "events":
                    self._dispatch(message[1])
        except (EOFError, OSError):
            self._died()

    def _dispatch(self, events: list) -> None:
        by_loop: dict = {}
        with self._lock:
            for row_id, kind, value in events:
                handle = self._rows.get(row_id)
                if handle is None:
                    continue
                if kind == "done":
                    del self._rows[row_id]
                by_loop.setdefault(handle.loop, []).append((handle, kind, value))
        for loop, items in by_loop.items():  # one wakeup per event loop for a whole step
            loop.call_soon_threadsafe(_apply, items)

    def _died(self) -> None:
        self.process.join(timeout=5)
        self.dead = f"the model process ended (exit code {self.process.exitcode})"
        for future in list(self._calls.values()):
            future.set_result((False, None))
        with self._lock:
            rows, self._rows = list(self._rows.values()), {}
        self._dispatch_lost(rows)
        if self.on_death is not None and not self.closing:
            self.on_death(self.dead)

    def _dispatch_lost(self, rows: list[Handle]) -> None:
        for handle in rows:
            handle.loop.call_soon_threadsafe(
                _apply, [(handle, "done", ("error", handle.text, handle.tokens, self.dead))])

    def close(self) -> None:
        """The server is stopping: the worker reads the end of its pipe and exits."""
        self.closing = True
        self.conn.close()
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.terminate()


def _apply(items: list) -> None:
    """On the event loop: the rows' state, then their events for the replies to read."""
    for handle, kind, value in items:
        if kind == "done":
            handle.finish, handle.text, handle.tokens = value[0], value[1], value[2]
        handle.events.put_nowait((kind, handle.index, value))
