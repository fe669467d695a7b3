"""The model side of `tunebench serve`: one base model, many LoRA adapters, batched.

`Engine` holds the base once and the adapters as named PEFT adapters on it; adapters are
added and removed while it serves. `Scheduler` is the one thread that runs the model: it
takes waiting rows, groups those that sample alike (temperature, top_p, top_k, penalty,
seed) into a batch of up to `max_batch`, and generates them together, `chunk` tokens at a
time. Between chunks, rows that ended leave and waiting rows join (the rows that continue
are fed their text so far), so a long reply does not hold short ones, or new requests,
until it ends. A batch may mix
adapters and the base: PEFT applies each row's adapter to its row (`adapter_names`), so
requests for different fine-tunes share one forward pass.

Why by hand: transformers' streamers serve one sequence, and a batch's rows end at
different times and stop on different strings; `RowStreamer` and `RowsDone` give each
row its own text, stop strings, token budget and cancellation (a client that goes away
frees its row at the next token). Rows reach the HTTP side through asyncio queues.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import models, paths
from .errors import BadInput

BASE_ROW = "__base__"                    # PEFT's name for "no adapter" in a mixed batch
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Busy(Exception):
    """The queue is full: the client should retry later (HTTP 429)."""


@dataclass(frozen=True)
class Sampling:
    """What must be equal for rows to share a batch."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None


@dataclass(eq=False)  # rows are compared by identity
class Row:
    """One sequence to generate (a request with n > 1 is n rows)."""
    prompt_ids: list[int]
    adapter: str                          # an adapter name, or BASE_ROW
    sampling: Sampling
    max_tokens: int
    stops: tuple[str, ...] = ()
    index: int = 0                        # the choice index within its request
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""                        # the reply so far (cut at a stop string)
    sent: int = 0                         # characters already handed to the client
    finish: str | None = None             # "stop" or "length" once it ended
    cancelled: threading.Event = field(default_factory=threading.Event)
    announced: bool = False               # its "done" event was sent
    first_token_at: float | None = None

    def emit(self, kind: str, value=None) -> None:
        if self.loop is not None and self.events is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, self.index, value))

    def post(self, kind: str, value, outbox: list) -> None:
        """Like emit, but collected, so one wakeup of the event loop carries a whole step."""
        if self.loop is not None and self.events is not None:
            outbox.append((self.loop, self.events, (kind, self.index, value)))


class Engine:
    """The base model, its tokenizer and the named adapters on it."""

    def __init__(self, model: str, trust_remote_code: bool = False):
        self.model_name = model
        self.base_path = models.resolve_model(model)
        self.trust = trust_remote_code
        self.tokenizer, self.model = models.load_checkpoint(model,
                                                            trust_remote_code=trust_remote_code)
        from .chat import stop_token_ids
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.generation_config)
        self.adapters: dict[str, str] = {}
        self.lock = threading.Lock()      # generation and adapter changes take turns

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model takes (prompt plus reply), when its config says."""
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def base_id(self) -> str:
        """The base model's id in the API: 'demo', a hub id, or its folder's name."""
        return self.model_name if not Path(self.model_name).is_dir() else \
            Path(self.model_name).resolve().name

    def model_ids(self) -> list[str]:
        return [self.base_id, *self.adapters]

    def add_adapter(self, name: str, path: str | Path, confine: bool = False) -> None:
        """Serve the LoRA adapter at `path` as model id `name`. BadInput when the name is
        taken or unusable, the folder is not an adapter, or it was trained on another base.
        `confine`: the path must lie under the allowed folders (adapters added at run time)."""
        if not ADAPTER_NAME.match(name or ""):
            raise BadInput("an adapter name is 1-64 letters, digits, '.', '_' or '-', starting "
                           f"with a letter or digit; got {name!r}", field="name")
        if name in self.model_ids() or name == BASE_ROW:
            raise BadInput(f"model id '{name}' is already served", field="name")
        folder = (paths.confine(str(path), "path") if confine else
                  paths.guard(str(path), "adapter")).resolve()
        if models.checkpoint_kind(folder) != "adapter":
            raise BadInput("not a LoRA adapter folder (no adapter_config.json); a whole-model "
                           "checkpoint is served with --model instead", file=str(folder))
        config = models.load_config(self.base_path, self.trust)
        models.check_adapter_fits(self.base_path, config, folder, self.trust, head="causal")
        with self.lock:
            self._load_adapter(name, folder)
            self.adapters[name] = str(folder)

    def _load_adapter(self, name: str, folder: Path) -> None:
        from peft import PeftModel
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(folder), adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name)
        self.model.eval()

    def remove_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise BadInput(f"no adapter '{name}' is served", field="name")
        with self.lock:
            if len(self.adapters) == 1:  # the last one: back to the plain base model
                self.model = self.model.unload()
            else:
                self.model.delete_adapter(name)
            del self.adapters[name]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        from .templates import render_prompt
        return self.tokenizer(render_prompt(messages, self.tokenizer),
                              add_special_tokens=False)["input_ids"]

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


class Scheduler(threading.Thread):
    """The one thread that runs the model: batches of rows that sample alike."""

    def __init__(self, engine: Engine, max_batch: int = 8, max_queue: int = 64,
                 gather_s: float = 0.005, chunk: int = 16):
        super().__init__(daemon=True, name="tunebench-serve")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.gather_s, self.chunk = gather_s, chunk
        self.waiting: list[Row] = []
        self.running = 0
        self.cond = threading.Condition()
        self.batches, self.busy_s, self.rows_done = 0, 0.0, 0   # what /health reports

    def submit(self, rows: list[Row]) -> None:
        """Queue a request's rows, or raise Busy when that would pass `max_queue`."""
        with self.cond:
            if len(self.waiting) + self.running + len(rows) > self.max_queue:
                raise Busy()
            self.waiting.extend(rows)
            self.cond.notify()

    def load(self) -> int:
        with self.cond:
            return len(self.waiting) + self.running

    def run(self) -> None:
        while True:
            batch = self._next_batch()
            started = time.monotonic()
            try:
                self._generate(batch)
            except Exception as err:  # one bad batch must not stop the server
                for row in batch:
                    if row.finish is None:
                        row.finish = "error"
                        row.emit("error", f"{type(err).__name__}: {err}")
            finally:
                self.busy_s += time.monotonic() - started
                self.rows_done += sum(r.finish is not None for r in batch)
                with self.cond:
                    self.running = 0
                    # Rows not done yet go back to the head of the line, ahead of new ones:
                    # between chunks, rows that ended make room for waiting requests.
                    self.waiting[:0] = [r for r in batch
                                        if r.finish is None and not r.cancelled.is_set()]

    def _next_batch(self) -> list[Row]:
        """The oldest waiting row and the others that sample alike (oldest first)."""
        with self.cond:
            while not self.waiting:
                self.cond.wait()
            fresh = not self.waiting[0].tokens
        if fresh:
            time.sleep(self.gather_s)  # let rows sent at the same moment join this batch
        with self.cond:
            self.waiting = [r for r in self.waiting if not r.cancelled.is_set()]
            if not self.waiting:
                return []
            key = self.waiting[0].sampling
            batch = [r for r in self.waiting if r.sampling == key][:self.max_batch]
            chosen = {id(r) for r in batch}
            self.waiting = [r for r in self.waiting if id(r) not in chosen]
            self.running = len(batch)
        return batch

    def _generate(self, batch: list[Row]) -> None:
        gone = [r for r in batch if r.adapter != BASE_ROW and r.adapter not in self.engine.adapters]
        for row in gone:  # its adapter was removed while the row waited
            row.finish = "error"
            row.emit("error", f"adapter '{row.adapter}' was removed before the reply started")
        batch = [r for r in batch if r.finish is None]
        if not batch:
            return
        import torch
        from transformers import set_seed

        engine, tok = self.engine, self.engine.tokenizer
        # A row continues from its prompt and what it has written so far (a chunk earlier).
        contexts = [r.prompt_ids + r.tokens for r in batch]
        width = max(len(c) for c in contexts)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in contexts])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts])
        streamer, done = RowStreamer(batch, engine), RowsDone(batch)
        with engine.lock:
            model = engine.model
            kwargs = {}
            if engine.adapters:  # each row with its own adapter (or none) in one batch
                kwargs["adapter_names"] = [r.adapter for r in batch]
            if batch[0].sampling.seed is not None and not any(r.tokens for r in batch):
                set_seed(batch[0].sampling.seed)
            with torch.inference_mode():
                model.generate(input_ids=ids.to(model.device),
                               attention_mask=mask.to(model.device),
                               generation_config=self._config(model, batch),
                               streamer=streamer, stopping_criteria=[done], **kwargs)
        self.batches += 1
        for row in batch:  # an ending the streamer did not see (a cancelled row's)
            if row.finish is not None and not row.announced:
                row.announced = True
                streamer.flush(row)
                row.emit("done", row.finish)

    def _config(self, model, batch: list[Row]):
        import copy
        s = batch[0].sampling
        config = copy.deepcopy(model.generation_config)
        sample = s.temperature > 0
        left = max(r.max_tokens - len(r.tokens) for r in batch)
        config.update(max_new_tokens=min(self.chunk, left), do_sample=sample,
                      temperature=s.temperature if sample else 1.0,
                      top_p=s.top_p if sample else 1.0,
                      top_k=(s.top_k or None) if sample else 50,
                      repetition_penalty=s.repetition_penalty,
                      eos_token_id=self.engine.stop_ids,
                      pad_token_id=self.engine.tokenizer.pad_token_id)
        return config


class RowStreamer:
    """transformers' streamer protocol for a batch: each step's new token per row, decoded
    into that row's text, cut at its stop strings and its own token budget."""

    def __init__(self, batch: list[Row], engine: Engine):
        self.batch, self.engine = batch, engine
        self.prompt_seen = False
        self.outbox: list | None = None   # a step's events, delivered together
        self.stop_ids = set(engine.stop_ids)

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.outbox: list = []
        for row, token in zip(self.batch, value.reshape(len(self.batch), -1)[:, -1].tolist()):
            if row.finish is None:
                self._advance(row, int(token))
                if row.finish is not None:  # its client hears at once, not when the batch ends
                    row.announced = True
                    row.post("done", row.finish, self.outbox)
        _deliver(self.outbox)
        self.outbox = None

    def _advance(self, row: Row, token: int) -> None:
        if row.first_token_at is None:
            row.first_token_at = time.monotonic()
        if row.cancelled.is_set():
            row.finish = "cancelled"
            return
        if token in self.stop_ids:
            row.finish = "stop"
            return
        row.tokens.append(token)
        row.text = self.engine.tokenizer.decode(row.tokens, skip_special_tokens=True)
        cut = min((row.text.find(s) for s in row.stops if s and s in row.text), default=-1)
        if cut >= 0:
            row.text, row.finish = row.text[:cut], "stop"
        elif len(row.tokens) >= row.max_tokens:
            row.finish = "length"
        self.flush(row, final=row.finish is not None)

    def flush(self, row: Row, final: bool = True) -> None:
        """Hand the client the text it has not seen. A stop string may still be forming at
        the end, and a multi-byte character may be half decoded: hold those back until the
        row ends."""
        safe = len(row.text)
        if not final:
            if row.text.endswith("\ufffd"):
                safe = len(row.text.rstrip("\ufffd"))
            for stop in row.stops:
                for k in range(min(len(stop) - 1, safe), 0, -1):
                    if row.text[:safe].endswith(stop[:k]):
                        safe -= k
                        break
        if safe > row.sent:
            if self.outbox is not None:
                row.post("delta", row.text[row.sent:safe], self.outbox)
            else:
                row.emit("delta", row.text[row.sent:safe])
            row.sent = safe

    def end(self) -> None:
        pass


def _deliver(outbox: list) -> None:
    """Hand a step's events to their event loops: one wakeup per loop, not one per row."""
    by_loop: dict = {}
    for loop, queue, event in outbox:
        by_loop.setdefault(loop, []).append((queue, event))
    for loop, items in by_loop.items():
        loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list) -> None:
    for queue, event in items:
        queue.put_nowait(event)


class RowsDone:
    """Per-row stopping: a row is done once it ended (stop token, stop string, its own
    max_tokens) or its client went away; the batch ends when every row is."""

    def __init__(self, batch: list[Row]):
        self.batch = batch

    def __call__(self, input_ids, scores, **kwargs):
        import torch
        return torch.tensor([r.finish is not None or r.cancelled.is_set() for r in self.batch],
                            dtype=torch.bool, device=input_ids.device)
