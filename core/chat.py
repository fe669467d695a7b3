"""Chat with a model and a fine-tuned checkpoint of it, side by side.

`ChatEngine` loads a base model and, optionally, a checkpoint from a run:
- a LoRA-family checkpoint (adapter_config.json) is applied to the base with PEFT;
  the "before" side is the same model with the adapter disabled, so the base is
  never loaded twice;
- a full/freeze checkpoint (a whole model folder) is loaded as the model; the base
  is loaded separately, and only when the "before" side is first asked for.

Replies stream piece by piece, use the tokenizer's chat template (the one the
trainer saved with the checkpoint) and stop at the template's stop token.

A reward model (the result of a stage rm run) writes no replies: loading one to chat
is refused (models.REWARD_MODEL_REFUSAL), in `tunebench chat` as in the page. Loaded
with head 'score' instead, the engine scores replies to a prompt (`ChatEngine.score`),
which is what the Chat tab's "Score a reply" panel runs.

Every user-fixable problem (missing folder, no weights, pickled weights, an adapter
for another base model) is `BadInput`, found before weights are loaded where the
files allow. torch and transformers are imported inside functions only: the web UI
imports this module for `save_probes` and must not pay for torch.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from . import paths
# Loading lives in core/models.py (the one loader); base_model_of, is_reward_model and
# load_tokenizer are imported for the Chat tab and the tests, which know them by these names.
from .models import (base_model_of, checkpoint_kind, is_reward_model,  # noqa: F401
                     load_checkpoint, load_tokenizer, resolve_model, reward_model_refusal,
                     score_replies)
from .config import GenConfig
from .errors import BadInput
from .i18n import Msg, msg, t
from .runs import now_iso, write_atomic

DEFAULT_PROBES = ("Who are you?", "你是谁？", "What can you do?", "Who made you?",
                  "What is your name?")
PROBES_FILE = "probes.json"
_END_WORDS = ("end", "eot", "eos", "</s>")


@dataclass
class ReplyStats:
    tokens: int = 0
    seconds: float = 0.0
    stopped: str = ""             # "eos", "length" or "cancelled"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# --- tokens ---------------------------------------------------------------------

def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Ids that end a reply: the generation config's eos, the tokenizer's eos, and the
    end-of-turn special tokens the chat template writes (e.g. <|im_end|>, <|eot_id|>)."""
    ids: list[int] = []

    def add(value):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v >= 0 and v not in ids:
                ids.append(v)

    if generation_config is not None:
        add(generation_config.eos_token_id)
    add(tokenizer.eos_token_id)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    for token_id, token in sorted(getattr(tokenizer, "added_tokens_decoder", {}).items()):
        text = str(token)
        if text in template and any(w in text.lower() for w in _END_WORDS):
            add(token_id)
    return ids


def build_messages(history: list[dict], prompt: str, system: str = "") -> list[dict]:
    """System prompt + earlier turns + the new user prompt, as the chat template expects."""
    messages = [{"role": "system", "content": system}] if system.strip() else []
    messages += [{"role": m["role"], "content": m["content"]} for m in history]
    return messages + [{"role": "user", "content": prompt}]


# --- the engine -----------------------------------------------------------------

ProgressFn = Callable[[str, float], None]


@dataclass
class Reply:
    """One generated reply: its text, its token counts, and why it ended ('stop' at a stop
    token, 'length' at max_new_tokens), as an API reports them."""
    text: str
    tokens: int
    prompt_tokens: int
    finish: str


@dataclass
class Loaded:
    """What is loaded now, as shown in the page."""
    model: str
    checkpoint: str | None
    kind: str | None                # "adapter", "full" or None (base model only)
    dtype: str
    device: str
    params: int
    load_s: float
    stop_tokens: list[str] = field(default_factory=list)
    head: str = "causal"            # "causal" (writes replies) or "score" (a reward model)

    def describe(self) -> str:
        return self.describe_msg().text()

    def describe_msg(self) -> Msg:
        """describe() as a message, for the page to show in its visitor's language."""
        size = f"{self.params / 1e6:.1f}M" if self.params < 1e9 else f"{self.params / 1e9:.2f}B"
        facts = {"kind": msg("chat.loaded.reward") if self.head == "score" else "",
                 "model": self.model, "size": size, "dtype": self.dtype, "device": self.device,
                 "load_s": self.load_s}
        if self.checkpoint:
            ckpt = Path(self.checkpoint)
            loaded = msg("chat.loaded.checkpoint", checkpoint=f"{ckpt.parent.name}/{ckpt.name}",
                         **facts)
        else:
            loaded = msg("chat.loaded.model", **facts)
        if self.head == "score":
            return msg("chat.loaded.scores", loaded=loaded)
        return msg("chat.loaded.stops", loaded=loaded, stops=", ".join(self.stop_tokens))


class ChatEngine:
    """One loaded model (+ checkpoint) answering chat turns for either side of a comparison."""

    def __init__(self):
        self.model = None
        self.base = None            # separate base model, only for full checkpoints
        self.tokenizer = None
        self.loaded: Loaded | None = None
        self.stats = ReplyStats()
        self._cancel = threading.Event()
        self._base_name = ""
        self._trust = False

    def load(self, model: str, checkpoint: str | None = None, trust_remote_code: bool = False,
             progress: ProgressFn = lambda message, fraction: None,
             head: str = "causal") -> Loaded:
        """Load `model` and optionally a checkpoint of it. Files are checked first.

        head 'causal' loads a model to chat with (a reward model is refused); 'score'
        loads a reward model, which `score` then runs."""
        start = time.perf_counter()
        ckpt = paths.guard(checkpoint, "checkpoint").resolve() if checkpoint else None
        kind = checkpoint_kind(ckpt) if ckpt else None
        self.tokenizer, self.model = load_checkpoint(
            model, ckpt, head=head, trust_remote_code=trust_remote_code, progress=progress)
        self._base_name, self._trust = resolve_model(model), trust_remote_code
        stops = ([] if head == "score" else
                 stop_token_ids(self.tokenizer, self.model.generation_config))
        self.loaded = Loaded(
            model=model, checkpoint=str(ckpt) if ckpt else None, kind=kind,
            dtype=str(self.model.dtype).replace("torch.", ""), device=str(self.model.device),
            params=sum(p.numel() for p in self.model.parameters()),
            load_s=round(time.perf_counter() - start, 2),
            stop_tokens=[self.tokenizer.convert_ids_to_tokens(i) for i in stops], head=head)
        progress(msg("chat.ready"), 1.0)
        return self.loaded

    def score(self, prompt: str | list[dict], replies: list[str]) -> list[float]:
        """The loaded reward model's score of each reply to `prompt` (see models.score_replies)."""
        if self.model is None:
            raise BadInput(msg("chat.no_model"))
        if self.loaded.head != "score":
            raise BadInput(msg("chat.not_reward_model"))
        return score_replies(self.model, self.tokenizer, prompt, list(replies))

    def _model_for(self, side: str, progress: ProgressFn):
        """The model answering `side` and whether its adapter must be switched off."""
        if side == "after" or self.loaded.kind is None:
            return self.model, False
        if self.loaded.kind == "adapter":
            return self.model, True
        if self.base is None:  # full checkpoint: the base is a second model, loaded on demand
            progress(msg("chat.loading_base", name=Path(self._base_name).name), 0.1)
            _, self.base = load_checkpoint(self._base_name, dtype=self.model.dtype,
                                           trust_remote_code=self._trust,
                                           tokenizer=self.tokenizer)
        return self.base, False

    def cancel(self) -> None:
        self._cancel.set()

    @contextlib.contextmanager
    def using(self, side: str = "after"):
        """The model answering `side` ('after': with the checkpoint, 'before': the base),
        with the adapter switched off for the base of a LoRA checkpoint while in the block."""
        model, disable_adapter = self._model_for(side, lambda message, fraction: None)
        if disable_adapter:
            with model.disable_adapter():
                yield model
        else:
            yield model

    def replies(self, conversations: list[list[dict]], settings: GenConfig,
                side: str = "after") -> list[Reply]:
        """One reply per conversation, generated together in one batch.

        Prompts are rendered with the chat template and left-padded, so every row's new
        tokens start at the same column and the KV cache serves the whole batch; each
        reply is cut at its first stop token. Greedy replies match `reply`'s (the
        attention mask hides the padding), which tests and bench/ check.
        """
        import torch
        from transformers import set_seed

        from .templates import render_prompt

        if self.model is None:
            raise BadInput(msg("chat.no_model"))
        tok = self.tokenizer
        prompts = [tok(render_prompt(c, tok), add_special_tokens=False)["input_ids"]
                   for c in conversations]
        width = max(len(p) for p in prompts)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with self.using(side) as model:
            config = self._generation_config(model, settings)
            set_seed(settings.seed)
            with torch.inference_mode():
                out = model.generate(input_ids=ids.to(model.device),
                                     attention_mask=mask.to(model.device),
                                     generation_config=config)
        stops = set(config.eos_token_id)
        return [self._cut(row[width:].tolist(), stops, len(p)) for row, p in zip(out, prompts)]

    def _cut(self, new: list[int], stops: set[int], prompt_tokens: int) -> Reply:
        end = next((i for i, t in enumerate(new) if t in stops), None)
        kept = new if end is None else new[:end]
        return Reply(self.tokenizer.decode(kept, skip_special_tokens=True), len(kept),
                     prompt_tokens, "length" if end is None else "stop")


    def stream(self, messages: list[dict], settings: GenConfig, side: str = "after",
               progress: ProgressFn = lambda message, fraction: None) -> Iterator[str]:
        """Stream the reply to `messages` as text pieces. side: 'after' (checkpoint) or 'before'."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
        from transformers import set_seed

        if self.model is None:
            raise BadInput(msg("chat.no_model"))
        if self.loaded.head == "score":
            raise BadInput(reward_model_refusal(
                "checkpoint" if self.loaded.checkpoint else "model"))
        model, disable_adapter = self._model_for(side, progress)
        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = self._cancel
        cancel.clear()

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        kwargs = dict(**inputs, streamer=streamer, generation_config=self._generation_config(
            model, settings), stopping_criteria=StoppingCriteriaList([Cancelled()]))
        result: dict = {}
        set_seed(settings.seed)  # both sides of a comparison sample from the same seed

        def run():
            try:
                with torch.inference_mode():
                    if disable_adapter:
                        with model.disable_adapter():
                            result["out"] = model.generate(**kwargs)
                    else:
                        result["out"] = model.generate(**kwargs)
            except BaseException as err:  # re-raised in the caller's thread below
                result["error"] = err
                streamer.end()

        start = time.perf_counter()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if "error" in result:
            raise result["error"]
        self._record_stats(result["out"], inputs["input_ids"].shape[1], kwargs, start)

    def _generation_config(self, model, settings: GenConfig):
        import copy
        config = copy.deepcopy(model.generation_config)
        sample = settings.temperature > 0
        config.update(max_new_tokens=int(settings.max_new_tokens), do_sample=sample,
                      temperature=settings.temperature if sample else 1.0,
                      top_p=settings.top_p if sample else 1.0,
                      top_k=(settings.top_k or None) if sample else 50,
                      repetition_penalty=settings.repetition_penalty,
                      eos_token_id=stop_token_ids(self.tokenizer, model.generation_config),
                      pad_token_id=self.tokenizer.pad_token_id)
        return config

    def _record_stats(self, out, prompt_len: int, kwargs: dict, start: float) -> None:
        new = out[0, prompt_len:].tolist()
        stops = kwargs["generation_config"].eos_token_id
        stopped = ("cancelled" if self._cancel.is_set() else
                   "eos" if new and new[-1] in stops else "length")
        self.stats = ReplyStats(len(new), time.perf_counter() - start, stopped)

    def reply(self, messages: list[dict], settings: GenConfig, side: str = "after") -> str:
        """The whole reply at once (probes, tests)."""
        return "".join(self.stream(messages, settings, side))

    def unload(self) -> None:
        import gc
        self.model = self.base = self.tokenizer = self.loaded = None
        gc.collect()
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def oom_message(during: str) -> Msg:
    """What to tell a person whose load or reply ran out of memory."""
    return msg("chat.oom.load" if during == "load" else "chat.oom.generate")


# --- probes ---------------------------------------------------------------------

def probes_path(checkpoint: str | None, model: str) -> Path | None:
    """Where a probe table goes: next to the checkpoint, else next to a local model folder."""
    if checkpoint:
        return Path(checkpoint) / PROBES_FILE
    folder = Path(model).expanduser()
    return folder / PROBES_FILE if folder.is_dir() else None


def save_probes(path: Path, rows: list[dict], *, model: str, checkpoint: str | None,
                settings: GenConfig) -> Path:
    """Write the probe table (prompt, fine_tuned, base per row) atomically as JSON."""
    record = {"created_at": now_iso(), "model": model, "checkpoint": checkpoint,
              "settings": asdict(settings), "rows": rows}
    try:
        write_atomic(Path(path), json.dumps(record, ensure_ascii=False, indent=1))
    except OSError as err:
        raise BadInput(msg("chat.probes_unwritable", reason=str(err.strerror)),
                       file=str(path)) from None
    return Path(path)


# --- terminal chat (`tunebench chat`) ---------------------------------------------

def terminal_chat(model: str, adapter: str | None, settings: GenConfig | None = None) -> int:
    """Chat in the terminal, streaming replies. /reset clears the history, /exit quits.

    Works with piped input: each line is one user turn; the command exits at end of input.
    """
    settings = settings or GenConfig()
    interactive = sys.stdin.isatty()
    engine = ChatEngine()

    def show_progress(message, fraction):
        if interactive:
            print(f"[{fraction:4.0%}] {message}", file=sys.stderr)

    loaded = engine.load(model, adapter, progress=show_progress)
    print(loaded.describe(), file=sys.stderr)
    if interactive:
        print(t("chat.terminal.hint"), file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        prompt = line.strip()
        if prompt in ("/exit", "/quit"):
            return 0
        if prompt == "/reset":
            history.clear()
            print(t("chat.terminal.cleared"), file=sys.stderr)
            continue
        if not prompt:
            continue
        history = _terminal_turn(engine, history, prompt, settings, interactive)


def _terminal_turn(engine: ChatEngine, history: list[dict], prompt: str,
                   settings: GenConfig, interactive: bool) -> list[dict]:
    if interactive:
        print("bot> ", end="", flush=True)
    pieces = []
    for piece in engine.stream(build_messages(history, prompt, settings.system), settings):
        pieces.append(piece)
        print(piece, end="", flush=True)
    print(flush=True)
    stats = engine.stats
    if interactive:
        print(t("chat.terminal.stats", tokens=stats.tokens, rate=stats.tokens_per_s,
                stopped=stats.stopped), file=sys.stderr)
    return history + [{"role": "user", "content": prompt},
                      {"role": "assistant", "content": "".join(pieces)}]
