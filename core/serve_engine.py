"""The model side of `tunebench serve`: one base model, many LoRA adapters, batched.

`Engine` holds the base once and the adapters as named PEFT adapters on it; adapters are
added and removed while it serves. `Scheduler` is the one thread that runs the model, a
decoding loop with continuous batching: every step feeds one token for each running row,
rows that end leave at once, and waiting rows join between steps (for llama-family models
their prompts run in the same forward as the running rows' tokens, core/lean_decode.py;
their keys and values then go into free slots of the batch's cache, `slot_layer`). So a
long reply never holds short ones, or new requests, until it ends. A batch mixes
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

    def __init__(self, model: str, trust_remote_code: bool = False,
                 prefix_cache_mb: float = 0):
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
        self.prefix = self._prefix_cache(prefix_cache_mb)  # used by the lean step

    def _prefix_cache(self, megabytes: float):
        """The prefix cache (core/prefix_cache.py), None when turned off. Only the lean
        step uses it: prompts through transformers' forward are computed whole."""
        from .prefix_cache import PrefixCache
        if megabytes <= 0:
            return None
        config = self.model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or \
            config.hidden_size // config.num_attention_heads
        per_token = 2 * config.num_hidden_layers * heads * head_dim * \
            next(self.model.parameters()).element_size()
        return PrefixCache(int(megabytes * 2**20), per_token)

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
        if getattr(self, "prefix", None) is not None:  # keys and values of the old adapters
            self.prefix.clear()
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

    def join(self, rows: list[Row], tokens: list[int], lengths: list[int], cache=None,
             packed: list | None = None) -> None:
        """Add freshly prefilled rows (prompts of `lengths` tokens), right-aligned with the
        running ones. Their keys and values come as transformers' `cache` (one left-padded
        row per prompt), or from the lean step as `packed` (each layer's (keys, values),
        the prompts end to end in one row)."""
        import torch
        with torch.inference_mode():  # the cache was made in a forward's inference mode
            self._join(rows, tokens, lengths, cache, packed)

    def _join(self, rows, tokens, lengths, cache, packed) -> None:
        import torch
        from transformers.cache_utils import DynamicCache
        if not self.rows:
            self.joinable = packed is not None or _plain_layers(cache)
            if not self.joinable:  # a cache of another kind: kept whole, as transformers built it
                self.rows, self.cache, self.next = list(rows), cache, list(tokens)
                self.mask = _left_mask(lengths, max(lengths), cache.layers[0].keys.device)
                return
            self.cache = DynamicCache()
            self.cache.layers = [slot_layer()() for _ in (packed or cache.layers)]
        for i, layer in enumerate(self.cache.layers):
            if packed is not None:
                layer.add_packed(*packed[i], lengths)
            else:
                layer.add_padded(cache.layers[i].keys, cache.layers[i].values)
        width = layer.end - layer.start
        fresh = _left_mask(lengths, width, layer.device)
        self.mask = fresh if self.mask is None else torch.cat([_pad_left(self.mask, width), fresh])
        self.rows += rows
        self.next += tokens

    def keep(self, keep: list[int]) -> None:
        """Keep only these rows, and drop the padding no remaining row needs. In the slot
        cache, rows past the new count move into the places of rows that left: one row's
        keys and values are copied per leaver, not the whole cache."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.reset()
            return
        import torch
        with torch.inference_mode():  # the cache was made in a forward's inference mode
            self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        order = _refill(keep, len(self.rows))
        self.mask = self.mask[order]
        cut = int((self.mask.sum(0) > 0).nonzero()[0])
        self.mask = self.mask[:, cut:]
        moves = [(place, row) for place, row in enumerate(order) if place != row]
        for layer in self.cache.layers:
            if isinstance(layer, slot_layer()):
                layer.keep(len(keep), moves, cut)
            else:
                layer.keys = layer.keys[order, :, cut:]
                layer.values = layer.values[order, :, cut:]
        self.rows = [self.rows[i] for i in order]
        self.next = [self.next[i] for i in order]


def _refill(keep: list[int], count: int) -> list[int]:
    """The kept rows' new order: rows already in the first len(keep) places stay, and the
    kept rows beyond them fill the places of rows that left."""
    kept = set(keep)
    movers = iter(i for i in keep if i >= len(keep))
    return [i if i in kept else next(movers) for i in range(len(keep))]


def _left_mask(lengths: list[int], width: int, device=None):
    """[prompts, width]: 1 on each prompt's last `length` columns."""
    import torch
    return torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=device)


def _unpack(packed, lengths: list[int], width: int):
    """[1, heads, total, dim] of prompts end to end -> [prompts, heads, width, dim], each
    prompt left-padded with zeros."""
    import torch
    return torch.stack([_pad_left(p, width) for p in packed[0].split(lengths, dim=1)])


def _plain_layers(cache) -> bool:
    """Only full-attention layers can be padded and stacked (not sliding windows, not
    recurrent state); other models decode a batch to its end before new rows join."""
    from transformers.cache_utils import DynamicLayer
    return all(type(layer) in (DynamicLayer, slot_layer())
               for layer in getattr(cache, "layers", [None]))


SLOT_MARGIN = 64   # columns before the first token of a new buffer, for longer prompts to join


@functools.cache
def slot_layer():
    """The SlotLayer class, built on first use: only the model process imports
    transformers, never the HTTP side or the page, which import this module."""
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        """One full-attention layer's cache for a continuous batch, written in place.

        Why by hand: transformers' DynamicLayer concatenates the whole cache with each new
        token, and stacking joining rows onto a running batch (or dropping rows that
        ended) copied it all again: 30% of the time of steps where prompts joined a batch
        of long rows on the demo model, by torch's profiler. Here the rows live in the first `rows` slots
        of one buffer [slots, heads, columns, dim], their tokens right-aligned in columns
        [start, end). A step writes its keys at `end`; a joining prompt is written into a
        free slot, ending at `end`; a row that leaves is replaced by the last one; padding
        no row needs is dropped by moving `start`. The buffer is copied only when it must
        grow (doubling). Columns a row does not use hold zeros or a former row's finite
        values, always masked out. `keys` and `values` are views of the live part."""

        def __init__(self):
            super().__init__()
            self._k = self._v = None
            self.rows = self.start = self.end = 0
            self.is_initialized, self.device = True, None

        @property
        def keys(self):
            return None if self._k is None else self._k[:self.rows, :, self.start:self.end]

        @keys.setter
        def keys(self, value):
            if value is not None:  # only CacheLayerMixin.__init__ sets it, to None
                raise AttributeError("a SlotLayer is changed through its own methods")

        @property
        def values(self):
            return None if self._v is None else self._v[:self.rows, :, self.start:self.end]

        @values.setter
        def values(self, value):
            if value is not None:
                raise AttributeError("a SlotLayer is changed through its own methods")

        def update(self, key_states, value_states, *args, **kwargs):
            """This step's keys and values of every row, at column `end`."""
            new = key_states.shape[-2]
            self._fit(key_states, self.rows, 0, new)
            self._k[:self.rows, :, self.end:self.end + new] = key_states
            self._v[:self.rows, :, self.end:self.end + new] = value_states
            self.end += new
            return self.keys, self.values

        def add_padded(self, keys, values) -> None:
            """New rows from [rows, heads, width, dim], left-padded."""
            count, width = keys.shape[0], keys.shape[-2]
            self._fit(keys, self.rows + count, width, 1)
            self._k[self.rows:self.rows + count, :, self.end - width:self.end] = keys
            self._v[self.rows:self.rows + count, :, self.end - width:self.end] = values
            self._added(count, width)

        def add_packed(self, keys, values, lengths: list[int]) -> None:
            """New rows from [1, heads, sum(lengths), dim], the prompts end to end."""
            width = max(lengths)
            self._fit(keys, self.rows + len(lengths), width, 1)
            for i, (k, v) in enumerate(zip(keys[0].split(lengths, dim=1),
                                           values[0].split(lengths, dim=1))):
                self._k[self.rows + i, :, self.end - k.shape[1]:self.end] = k
                self._v[self.rows + i, :, self.end - k.shape[1]:self.end] = v
            self._added(len(lengths), width)

        def _added(self, count: int, width: int) -> None:
            self.rows += count
            self.start = min(self.start, self.end - width)

        def keep(self, count: int, moves: list[tuple[int, int]], cut: int) -> None:
            """Keep the first `count` rows after moving row `row` to slot `place` for each
            (place, row) in `moves`, and drop `cut` columns of padding."""
            for place, row in moves:
                self._k[place, :, self.start:self.end] = self._k[row, :, self.start:self.end]
                self._v[place, :, self.start:self.end] = self._v[row, :, self.start:self.end]
            self.rows, self.start = count, self.start + cut

        def _fit(self, like, rows: int, before: int, after: int) -> None:
            """Room for `rows` rows, a prompt of `before` tokens ending at `end`, and `after`
            more columns past it; otherwise a new buffer, twice what is needed."""
            if self._k is not None and rows <= self._k.shape[0] and self.end >= before \
                    and self.end + after <= self._k.shape[2]:
                return
            width = self.end - self.start
            end = max(width, before, SLOT_MARGIN)
            have = 0 if self._k is None else self._k.shape[0]
            slots = have if rows <= have else max(rows, 2 * have)
            shape = (slots, like.shape[1], 2 * (end + after), like.shape[-1])
            keys, values = like.new_zeros(shape), like.new_zeros(shape)
            if self.rows:
                keys[:self.rows, :, end - width:end] = self.keys
                values[:self.rows, :, end - width:end] = self.values
            self._k, self._v, self.start, self.end = keys, values, end - width, end
            self.device = like.device

    return SlotLayer


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
        cache = self.engine.prefix
        return {"steps": self.steps, "prefills": self.prefills, "rows_done": self.rows_done,
                "busy_s": round(self.busy_s, 3), **(cache.stats() if cache else {})}

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
                self._retire(batch, outbox)
            except Exception as err:  # one bad step must not stop the server
                self._fail(batch, fresh, err, outbox)
            finally:
                self.busy_s += time.monotonic() - started
                if outbox:
                    self.sink(outbox)

    def _fail(self, batch: Batch, fresh: list[Row], err: Exception, outbox: list) -> None:
        """A step went wrong: its rows end with the error, and the batch starts afresh (its
        cache may be half updated)."""
        rows = batch.rows + [r for r in fresh if r not in batch.rows]
        for row in rows:
            if row.finish is None:
                row.end("error", outbox, f"{type(err).__name__}: {err}")
        self.rows_done += len(rows)
        batch.reset()

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
        (core/lean_decode.py); the joining rows, with their first token, then join. A
        prompt's start found in the prefix cache is not computed again."""
        import torch
        running = len(batch.rows)
        if not running and not joining:
            return
        _seed(joining)
        cached, prefixes = self._cached_prefixes(joining)
        lengths = [len(r.prompt_ids) - c for r, c in zip(joining, cached)]
        positions = batch.mask.sum(1).tolist() if running else []
        if running:
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones(running, 1)], dim=1)
        self.engine.forward_for([r.adapter for r in batch.rows + joining],
                                [1] * running + lengths)
        with torch.inference_mode():
            logits, prompt_kv = self.engine.lean.forward(
                batch.next + [t for r, c in zip(joining, cached) for t in r.prompt_ids[c:]],
                positions + [p for r, c in zip(joining, cached)
                             for p in range(c, len(r.prompt_ids))],
                running, batch.mask, batch.cache, lengths, prefixes)
        if running:
            batch.next = self._deliver(batch.rows, logits[:running], outbox)
            self.steps += 1
        if joining:
            tokens = self._deliver(joining, logits[running:], outbox)
            whole = [len(r.prompt_ids) for r in joining]
            batch.join(joining, tokens, whole, packed=prompt_kv)
            self._remember(joining, whole, prompt_kv)
            self.prefills += 1

    def _cached_prefixes(self, rows: list[Row]) -> tuple[list[int], list | None]:
        """How many tokens of each prompt the prefix cache holds, and their keys and values
        per prompt (None for a prompt it has nothing of; None for all when it has nothing)."""
        from .prefix_cache import BLOCK, joined
        cache = self.engine.prefix
        if cache is None or not rows:
            return [0] * len(rows), None
        found = [cache.lookup(r.adapter, r.prompt_ids) for r in rows]
        if not any(found):
            return [0] * len(rows), None
        return [BLOCK * len(f) for f in found], [joined(f) for f in found]

    def _remember(self, rows: list[Row], whole: list[int], prompt_kv: list) -> None:
        """Put the new prompts' full blocks in the prefix cache."""
        cache = self.engine.prefix
        if cache is None:
            return
        start = 0
        for row, n in zip(rows, whole):
            cache.store(row.adapter, row.prompt_ids,
                        [(k[0, :, start:start + n], v[0, :, start:start + n])
                         for k, v in prompt_kv])
            start += n

    def _prefill(self, batch: Batch, rows: list[Row], outbox: list) -> None:
        """Run the new rows' prompts, take each row's first token, and stack the rows onto
        the running batch."""
        if not rows:
            return
        _seed(rows)
        lengths = [len(r.prompt_ids) for r in rows]
        mask = _left_mask(lengths, max(lengths))
        if self.engine.packs:
            logits, cache = self._run_packed(rows, lengths)
        else:
            out = self._run_padded(rows, mask)
            logits, cache = out.logits[:, -1], out.cache
        tokens = self._deliver(rows, logits, outbox)
        batch.join(rows, tokens, lengths, cache=cache)
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
        leaving = len(batch.rows) - len(keep)
        batch.keep(keep)
        self.rows_done += leaving  # after keep: a failing keep's rows are counted by _fail


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
