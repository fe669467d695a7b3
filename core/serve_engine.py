"""The model side of `tunebench serve`: one base model, many LoRA adapters, batched.

`Engine` holds the base once and the adapters as named PEFT adapters on it; adapters are
added and removed while it serves. `Scheduler` is the one thread that runs the model, a
decoding loop with continuous batching: every step feeds one token for each running row,
rows that end leave at once, and waiting rows join between steps (their prompts are run
alone, then their KV cache is left-padded to the batch's length and stacked onto it). So
a long reply never holds short ones, or new requests, until it ends. A batch mixes
adapters and the base: core/multi_lora.py applies each row's adapter to its own row in
one pass, and rows sample with their own settings.

Why by hand: transformers' `generate` runs a fixed batch to its end, and its streamers
serve one sequence. A row here has its own stop strings, token budget, sampling settings,
seed and cancellation (a client that goes away frees its row at the next step), and the
steps run without generate's per-call setup, which on a small model costs more than the
step itself. Rows reach the HTTP side through asyncio queues.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import models, paths
from .errors import BadInput
from .serve_worker import BASE_ROW, Sampling

JOIN_TOGETHER = 2     # waiting rows that are worth a prefill between steps at once
JOIN_WAIT_S = 0.02    # ... or how long the oldest may wait for company (a few steps)
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(eq=False)  # rows are compared by identity
class Row:
    """One sequence to generate (a request with n > 1 is n rows)."""
    prompt_ids: list[int]
    adapter: str                          # an adapter name, or BASE_ROW
    sampling: Sampling
    max_tokens: int
    stops: tuple[str, ...] = ()
    index: int = 0                        # the choice index within its request
    id: int = 0                           # how the server names it in events
    tokens: list[int] = field(default_factory=list)
    text: str = ""                        # the reply so far (cut at a stop string)
    sent: int = 0                         # characters already handed to the client
    finish: str | None = None             # "stop", "length", "cancelled" or "error"
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = 0.0
    generator: object = None              # a seeded request's own random stream

    def post(self, kind: str, value, outbox: list) -> None:
        """An event for the row's client, collected so a whole step goes out at once."""
        outbox.append((self.id, kind, value))

    def end(self, finish: str, outbox: list, message: str = "") -> None:
        """The row ended: its client hears how, with its final text and token count."""
        self.finish = finish
        self.post("done", (finish, self.text, len(self.tokens), message), outbox)


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
        self.full_attention = _full_attention(self.model.config)
        self.adapters: dict[str, str] = {}
        self.stack = None                 # multi_lora.StackedLora, when the adapters allow
        self.lean = None                  # lean_decode.LeanDecoder, when the model allows
        self.fused = None                 # its fused base weights, made once
        self.version = 0                  # counts adapter changes (running rows recheck)
        self.lock = threading.Lock()      # generation and adapter changes take turns
        self._build_lean()

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
            self._unstack()
            try:
                self._load_adapter(name, folder)
                self.adapters[name] = str(folder)
            finally:
                self._restack()

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
            self._unstack()
            if len(self.adapters) == 1:  # the last one: back to the plain base model
                self.model = self.model.unload()
            else:
                self.model.delete_adapter(name)
            del self.adapters[name]
            self._restack()

    def _unstack(self) -> None:
        self.lean = None
        if self.stack is not None:
            self.stack.remove()
            self.stack = None

    def _restack(self) -> None:
        """Stack the adapters for one-pass mixed batches, or leave PEFT's path in charge."""
        from .multi_lora import StackedLora, stackable
        self.version += 1
        names = list(self.adapters)
        if names and stackable(self.model, names):
            self.stack = StackedLora(self.model, names)
        self._build_lean()

    def _build_lean(self) -> None:
        """The lean decode step (core/lean_decode.py) when it covers this model and these
        adapters; otherwise steps run through transformers' forward."""
        from . import lean_decode
        self.lean = None
        if not lean_decode.supported(self.model):
            return
        if self.fused is None:
            self.fused = lean_decode.fuse_base(self.model)
        if not self.adapters or self.stack is not None:
            self.lean = lean_decode.LeanDecoder(self.model, self.fused, self.stack)

    @property
    def packs(self) -> bool:
        """Whether new prompts can be run packed end to end in one row (each row's adapter
        is then set per token, which PEFT's own mixed-batch path cannot do)."""
        return self.full_attention and (not self.adapters or self.stack is not None)

    def forward_for(self, rows: list[str], lengths: list[int] | None = None):
        """The module to call for a batch whose rows use these adapters (BASE_ROW for none),
        and the keyword arguments it needs; `lengths` for a packed row (see `packs`)."""
        if not self.adapters:
            return self.model, {}
        if self.stack is not None:
            self.stack.select(rows, lengths)
            return self.model.base_model.model, {}  # PEFT's wrapper adds nothing here
        return self.model, {"adapter_names": rows}

    def encode_chat(self, messages: list[dict]) -> list[int]:
        from .templates import render_prompt
        return self.tokenizer(render_prompt(messages, self.tokenizer),
                              add_special_tokens=False)["input_ids"]

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def _full_attention(config) -> bool:
    """Whether every layer attends to the whole sequence through a mask it is handed (sdpa
    or eager): then prompts can be packed with a block mask. Sliding windows, and kernels
    that take no mask (flash-attention), run padded instead."""
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window",
                                                                  True)
    return (types == {"full_attention"} and not sliding
            and getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager"))


class Batch:
    """The rows decoded together and their one KV cache. Rows are aligned to one length by
    left padding (mask 0), so a step feeds one token per row at one cache position."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.rows: list[Row] = []
        self.cache = None
        self.mask = None                  # [rows, length]: 1 for real tokens
        self.next: list[int] = []         # each row's token to feed at the next step
        self.joinable = True              # whether rows can join while others run
        self.version = -1                 # the engine's adapter version the rows were checked at

    def join(self, rows: list[Row], cache, mask, tokens: list[int]) -> None:
        """Add freshly prefilled rows: both sides padded on the left to one length."""
        import torch
        if not self.rows:
            self.joinable = _plain_layers(cache)
            if self.joinable:
                cache.layers = [growing_layer().of(layer) for layer in cache.layers]
            self.rows, self.cache, self.mask, self.next = list(rows), cache, mask, list(tokens)
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            # both read before either is set: a GrowingLayer's length follows its keys
            mine.keys, mine.values = (
                torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)]),
                torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)]))
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
        self.rows += rows
        self.next += tokens

    def keep(self, keep: list[int]) -> None:
        """Keep only these rows, and cut the padding no remaining row needs."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.reset()
            return
        import torch
        index = torch.tensor(keep, device=self.mask.device)
        self.mask = self.mask[index]
        start = int((self.mask.sum(0) > 0).nonzero()[0])
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            if isinstance(layer, growing_layer()):
                layer.keep(index, start)
            else:
                layer.keys = layer.keys[index, :, start:]
                layer.values = layer.values[index, :, start:]
        self.rows = [self.rows[i] for i in keep]
        self.next = [self.next[i] for i in keep]


def _unpack(packed, lengths: list[int], width: int):
    """[1, heads, total, dim] of prompts end to end -> [prompts, heads, width, dim], each
    prompt left-padded with zeros."""
    import torch
    return torch.stack([_pad_left(p, width) for p in packed[0].split(lengths, dim=1)])


def _plain_layers(cache) -> bool:
    """Only full-attention layers can be padded and stacked (not sliding windows, not
    recurrent state); other models decode a batch to its end before new rows join."""
    from transformers.cache_utils import DynamicLayer
    return all(type(layer) in (DynamicLayer, growing_layer())
               for layer in getattr(cache, "layers", [None]))


@functools.cache
def growing_layer():
    """The GrowingLayer class, built on first use: only the model process imports
    transformers, never the HTTP side or the page, which import this module."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A full-attention cache layer that appends in place. transformers' DynamicLayer
        concatenates the whole cache with each new token, which for a decoding batch is
        the step's largest cost (46% of a step of 8 rows on the demo model); this one
        keeps spare room after the tokens, writes each step's keys into it, and grows by
        doubling. `keys` and `values` are views of the filled part."""

        @classmethod
        def of(cls, layer) -> "GrowingLayer":
            grown = cls()
            grown.keys, grown.values = layer.keys, layer.values
            grown.is_initialized, grown.device = True, layer.keys.device
            return grown

        @property
        def keys(self):
            return None if self._k is None else self._k[:, :, :self.length]

        @keys.setter
        def keys(self, value):  # a whole new cache (stacked rows): no spare room yet
            self._k = value
            self.length = 0 if value is None or value.dim() < 3 else value.shape[-2]

        @property
        def values(self):
            return None if self._v is None else self._v[:, :, :self.length]

        @values.setter
        def values(self, value):
            self._v = value

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized or self._k is None or self._k.dim() < 3:
                self.lazy_initialization(key_states, value_states)
                self._k, self._v, self.length = key_states, value_states, key_states.shape[-2]
                return self.keys, self.values
            end = self.length + key_states.shape[-2]
            if end > self._k.shape[-2]:
                self._k, self._v = self._grown(self._k, end), self._grown(self._v, end)
            self._k[:, :, self.length:end] = key_states
            self._v[:, :, self.length:end] = value_states
            self.length = end
            return self.keys, self.values

        def _grown(self, buffer, end: int):
            shape = list(buffer.shape)
            shape[-2] = max(2 * end, end + 32)
            bigger = buffer.new_empty(shape)
            bigger[:, :, :self.length] = buffer[:, :, :self.length]
            return bigger

        def keep(self, index, start: int) -> None:
            """Keep these rows and drop `start` columns of padding, spare room included."""
            self._k = self._k[index, :, start:]
            self._v = self._v[index, :, start:]
            self.length -= start

    return GrowingLayer



def _pad_left(t, width: int):
    """Pad the sequence axis (-2 for keys and values, -1 for a mask) on the left."""
    import torch
    axis = -1 if t.dim() == 2 else -2
    missing = width - t.shape[axis]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([t.new_zeros(shape), t], dim=axis)


class Scheduler(threading.Thread):
    """The one thread that runs the model: a decoding loop over a continuous batch. Rows'
    events go to `sink`, a list of (row id, kind, value) per step."""

    def __init__(self, engine: Engine, sink, max_batch: int = 8, gather_s: float = 0.005):
        super().__init__(daemon=True, name="tunebench-serve")
        self.engine, self.sink, self.max_batch, self.gather_s = engine, sink, max_batch, gather_s
        self.waiting: list[Row] = []
        self.cond = threading.Condition()
        self.steps, self.prefills, self.busy_s, self.rows_done = 0, 0, 0.0, 0  # for /health
        self.stop_ids = set(engine.stop_ids)

    def submit(self, rows: list[Row]) -> None:
        now = time.monotonic()
        for row in rows:
            row.queued_at = now
        with self.cond:
            self.waiting.extend(rows)
            self.cond.notify()

    def stats(self) -> dict:
        return {"steps": self.steps, "prefills": self.prefills, "rows_done": self.rows_done,
                "busy_s": round(self.busy_s, 3)}

    def run(self) -> None:
        batch = Batch()
        while True:
            fresh = self._admit(batch)
            started, outbox = time.monotonic(), []
            try:
                with self.engine.lock:
                    self._drop_orphans(batch, fresh, outbox)
                    joining = [r for r in fresh if r.finish is None]
                    if self.engine.lean is not None and (batch.joinable or not batch.rows):
                        self._lean_step(batch, joining, outbox)
                    else:
                        if joining:
                            self._prefill(batch, joining, outbox)
                        if batch.rows:
                            self._step(batch, outbox)
            except Exception as err:  # one bad step must not stop the server
                for row in batch.rows + fresh:
                    if row.finish is None:
                        row.end("error", outbox, f"{type(err).__name__}: {err}")
            finally:
                self.busy_s += time.monotonic() - started
                self._retire(batch, outbox)
                if outbox:
                    self.sink(outbox)

    def _admit(self, batch: Batch) -> list[Row]:
        """Waiting rows that fit in the batch, oldest first. Blocks while nothing runs and
        nothing waits; a batch that starts from empty waits `gather_s` for rows sent at the
        same moment, so they share one prefill. Rows cancelled while waiting end here."""
        with self.cond:
            while not self.waiting and not batch.rows:
                self.cond.wait()
            idle = not batch.rows
        if idle:
            time.sleep(self.gather_s)
        with self.cond:
            gone = [r for r in self.waiting if r.cancelled.is_set()]
            self.waiting = [r for r in self.waiting if not r.cancelled.is_set()]
            room = self.max_batch - len(batch.rows) if (idle or batch.joinable) else 0
            if not idle and self.engine.lean is None and not self._worth_a_prefill(batch):
                room = 0
            fresh, self.waiting = self.waiting[:room], self.waiting[room:]
        if gone:
            outbox: list = []
            for row in gone:
                row.end("cancelled", outbox)
            self.rows_done += len(gone)
            self.sink(outbox)
        return fresh

    def _worth_a_prefill(self, batch: Batch) -> bool:
        """Whether to run the waiting rows' prompts now, between two steps of a running
        batch. A prefill costs about as much as a step whatever it holds, so rows that trickle
        in one at a time are taken a few together: when two or more wait, when the batch is
        half empty, or when the oldest has waited `join_wait_s`."""
        if not self.waiting:
            return False
        return (len(self.waiting) >= JOIN_TOGETHER or len(batch.rows) <= self.max_batch // 2
                or time.monotonic() - self.waiting[0].queued_at >= JOIN_WAIT_S)

    def _drop_orphans(self, batch: Batch, fresh: list[Row], outbox: list) -> None:
        """Rows whose adapter was removed while they waited or ran end with an error."""
        rows = fresh if batch.version == self.engine.version else batch.rows + fresh
        batch.version = self.engine.version
        for row in rows:
            if row.adapter != BASE_ROW and row.adapter not in self.engine.adapters:
                row.end("error", outbox, f"adapter '{row.adapter}' was removed while its reply "
                                         "was being written")

    def _lean_step(self, batch: Batch, joining: list[Row], outbox: list) -> None:
        """One forward for the running rows' next tokens and the joining rows' prompts
        (core/lean_decode.py); the joining rows, with their first token, then join."""
        import torch
        from transformers.cache_utils import DynamicCache
        running = len(batch.rows)
        if not running and not joining:
            return
        _seed(joining)
        lengths = [len(r.prompt_ids) for r in joining]
        positions = batch.mask.sum(1).tolist() if running else []
        if running:
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones(running, 1)], dim=1)
        self.engine.forward_for([r.adapter for r in batch.rows + joining],
                                [1] * running + lengths)
        with torch.inference_mode():
            logits, prompt_kv = self.engine.lean.forward(
                batch.next + [t for r in joining for t in r.prompt_ids],
                positions + [p for n in lengths for p in range(n)],
                running, batch.mask, batch.cache, lengths)
        if running:
            batch.next = self._deliver(batch.rows, logits[:running], outbox)
            self.steps += 1
        if joining:
            tokens = self._deliver(joining, logits[running:], outbox)
            width = max(lengths)
            cache = DynamicCache()
            cache.layers = [growing_layer().of(_KV(_unpack(k, lengths, width),
                                                   _unpack(v, lengths, width)))
                            for k, v in prompt_kv]
            mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths],
                                device=logits.device)
            batch.join(joining, cache, mask, tokens)
            self.prefills += 1

    def _prefill(self, batch: Batch, rows: list[Row], outbox: list) -> None:
        """Run the new rows' prompts, take each row's first token, and stack the rows onto
        the running batch."""
        import torch
        if not rows:
            return
        _seed(rows)
        lengths = [len(r.prompt_ids) for r in rows]
        mask = torch.tensor([[0] * (max(lengths) - n) + [1] * n for n in lengths])
        if self.engine.packs:
            logits, cache = self._run_packed(rows, lengths)
        else:
            out = self._run_padded(rows, mask)
            logits, cache = out.logits[:, -1], out.cache
        tokens = self._deliver(rows, logits, outbox)
        batch.join(rows, cache, mask.to(logits.device), tokens)
        self.prefills += 1

    def _run_packed(self, rows: list[Row], lengths: list[int]):
        """The prompts end to end in one row, each attending to itself only: no compute on
        padding, which in a batch of mixed lengths is most of it. The row's cache is then
        cut into one left-padded cache row per prompt."""
        import torch

        from .lean_decode import block_causal
        width = max(lengths)
        ids = torch.tensor([[t for r in rows for t in r.prompt_ids]])
        attend = block_causal(lengths)
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        ends = torch.tensor(lengths).cumsum(0) - 1
        out = self._forward(ids, attend, positions, None, rows, lengths, keep=ends)
        for layer in out.cache.layers:
            layer.keys = _unpack(layer.keys, lengths, width)
            layer.values = _unpack(layer.values, lengths, width)
        return out.logits[0], out.cache

    def _run_padded(self, rows: list[Row], mask):
        import torch
        tok = self.engine.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = mask.shape[1]
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows])
        return self._forward(ids, mask, (mask.cumsum(1) - 1).clamp(min=0), None, rows)

    def _step(self, batch: Batch, outbox: list) -> None:
        """One token for every running row."""
        import torch
        mask = batch.mask
        ids = torch.tensor(batch.next, device=mask.device)[:, None]
        positions = mask.sum(1, keepdim=True)     # the real tokens before this one
        batch.mask = torch.cat([mask, mask.new_ones(len(batch.rows), 1)], dim=1)
        out = self._forward(ids, batch.mask, positions, batch.cache, batch.rows)
        batch.next = self._deliver(batch.rows, out.logits[:, -1], outbox)
        self.steps += 1

    def _forward(self, ids, mask, positions, cache, rows: list[Row],
                 lengths: list[int] | None = None, keep=1):
        import torch
        model, kwargs = self.engine.forward_for([r.adapter for r in rows], lengths)
        device = self.engine.model.device
        with torch.inference_mode():
            return model(input_ids=ids.to(device), attention_mask=mask.to(device),
                         position_ids=positions.to(device), cache=cache, use_cache=True,
                         logits_to_keep=keep.to(device) if torch.is_tensor(keep) else keep,
                         **kwargs)

    def _deliver(self, rows: list[Row], logits, outbox: list) -> list[int]:
        """Pick each row's next token and queue the new text for its client."""
        tokens = pick_tokens(logits, rows)
        for row, token in zip(rows, tokens):
            if row.finish is None:
                advance(row, token, self.stop_ids, self.engine.tokenizer, outbox)
        return tokens

    def _retire(self, batch: Batch, outbox: list) -> None:
        """Rows that ended or lost their client leave the batch."""
        for row in batch.rows:
            if row.finish is None and row.cancelled.is_set():
                row.end("cancelled", outbox)
        keep = [i for i, r in enumerate(batch.rows) if r.finish is None]
        self.rows_done += len(batch.rows) - len(keep)
        batch.keep(keep)


@dataclass
class _KV:
    """A cache layer's keys and values, before they become a GrowingLayer."""
    keys: object
    values: object


def _seed(rows: list[Row]) -> None:
    """Choice k of a seeded request samples from its own stream, seeded seed + k."""
    import torch
    for row in rows:
        if row.sampling.seed is not None:
            row.generator = torch.Generator().manual_seed(row.sampling.seed + row.index)


def pick_tokens(logits, rows: list[Row]) -> list[int]:
    """Each row's next token: greedy for all at once, then sampled rows one by one, each
    with its own settings and random stream (transformers' order: repetition penalty,
    temperature, top-k, top-p)."""
    tokens = logits.argmax(-1).tolist()
    for i, row in enumerate(rows):
        s = row.sampling
        if s.temperature > 0 or s.repetition_penalty != 1.0:
            tokens[i] = _sample(logits[i].float(), row)
    return tokens


def _sample(scores, row: Row) -> int:
    import torch
    s = row.sampling
    if s.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.tokens)), device=scores.device)
        old = scores[seen]
        scores = scores.clone()
        scores[seen] = torch.where(old < 0, old * s.repetition_penalty,
                                   old / s.repetition_penalty)
    if s.temperature <= 0:
        return int(scores.argmax())
    scores = scores / s.temperature
    if s.top_k and s.top_k < scores.numel():
        scores[scores < torch.topk(scores, s.top_k).values[-1]] = -float("inf")
    if s.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        probs = ordered.softmax(-1)
        beyond = probs.cumsum(-1) - probs > s.top_p  # the first token is always kept
        scores[order[beyond]] = -float("inf")
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=row.generator))


def advance(row: Row, token: int, stop_ids: set, tokenizer, outbox: list) -> None:
    """One new token for a row: its text so far, cut at a stop string or its budget; its
    client hears of its end at once."""
    if row.cancelled.is_set():
        row.end("cancelled", outbox)
        return
    finish = None
    if token in stop_ids and not row.sampling.ignore_eos:
        finish = "stop"
    else:
        row.tokens.append(token)
        row.text = tokenizer.decode(row.tokens, skip_special_tokens=True)
        cut = min((row.text.find(s) for s in row.stops if s and s in row.text), default=-1)
        if cut >= 0:
            row.text, finish = row.text[:cut], "stop"
        elif len(row.tokens) >= row.max_tokens:
            finish = "length"
    flush(row, outbox, final=finish is not None)
    if finish is not None:
        row.end(finish, outbox)


def flush(row: Row, outbox: list, final: bool = True) -> None:
    """Queue the text the client has not seen. A stop string may still be forming at the
    end, and a multi-byte character may be half decoded: hold those back until the row
    ends."""
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
        row.post("delta", row.text[row.sent:safe], outbox)
        row.sent = safe
