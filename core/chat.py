"""Chat with a model and a fine-tuned checkpoint of it, side by side.

`ChatEngine` loads a base model and, optionally, a checkpoint from a run:
- a LoRA-family checkpoint (adapter_config.json) is applied to the base with PEFT;
  the "before" side is the same model with the adapter disabled, so the base is
  never loaded twice;
- a full/freeze checkpoint (a whole model folder) is loaded as the model; the base
  is loaded separately, and only when the "before" side is first asked for.

Replies stream piece by piece, use the tokenizer's chat template (the one the
trainer saved with the checkpoint) and stop at the template's stop token.

Every user-fixable problem (missing folder, no weights, pickled weights, an adapter
for another base model) is `BadInput`, found before weights are loaded where the
files allow. torch and transformers are imported inside functions only: the web UI
imports this module for `save_probes` and must not pay for torch.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import yaml

from . import paths
from .errors import BadInput
from .runs import now_iso, write_atomic

DEFAULT_PROBES = ("Who are you?", "你是谁？", "What can you do?", "Who made you?",
                  "What is your name?")
PROBES_FILE = "probes.json"
# Used only when a tokenizer has no chat template at all (a plain language model).
FALLBACK_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                     "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                     "{% endif %}")
_END_WORDS = ("end", "eot", "eos", "</s>")


@dataclass
class GenSettings:
    """Sampling settings shared by both sides of a comparison."""
    system: str = ""
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 42


@dataclass
class ReplyStats:
    tokens: int = 0
    seconds: float = 0.0
    stopped: str = ""             # "eos", "length" or "cancelled"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# --- files: what a folder is, checked before anything is loaded ------------------

def resolve_model(model: str) -> str:
    """'demo', a local folder or a hub id -> what from_pretrained takes. BadInput if unusable."""
    from .models import check_model_source

    name = (model or "").strip()
    if not name:
        raise BadInput("no model given: enter a model folder, a hub id or 'demo'", field="model")
    local = Path(name).expanduser()
    if (local / "adapter_config.json").is_file() and not (local / "config.json").is_file():
        raise BadInput("this folder is an adapter, not a whole model: choose it as the checkpoint "
                       "and its base model as the model", file=name, field="model")
    source = check_model_source(name)
    return str(Path(source).resolve()) if Path(source).is_dir() else source


def checkpoint_kind(folder: Path) -> str:
    """'adapter' (PEFT folder) or 'full' (whole model folder). BadInput otherwise."""
    folder = paths.guard(folder, "checkpoint")
    if not folder.is_dir():
        raise BadInput("checkpoint folder not found", file=str(folder))
    if (folder / "adapter_config.json").is_file():
        if not (folder / "adapter_model.safetensors").is_file():
            what = ("only adapter_model.bin, which is pickled and never loaded"
                    if (folder / "adapter_model.bin").exists() else "no adapter_model.safetensors")
            raise BadInput(f"adapter folder has {what}", file=str(folder))
        return "adapter"
    if not (folder / "config.json").is_file():
        inside = sorted(p.name for p in folder.iterdir() if p.name == "final" or
                        p.name.startswith("checkpoint-"))
        hint = f"; this looks like a run folder, pick {inside[0]}/ inside it" if inside else ""
        raise BadInput("not a checkpoint: expected adapter_config.json (LoRA family) or "
                       f"config.json with *.safetensors (full model){hint}", file=str(folder))
    from .models import check_model_source
    check_model_source(str(folder))
    return "full"


def run_config(checkpoint: Path) -> dict:
    """The training config of the run a checkpoint belongs to ({} if not inside a run dir)."""
    try:
        path = paths.guard(checkpoint, "checkpoint").parent / "config.yaml"
    except BadInput:
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def base_model_of(checkpoint: Path) -> str | None:
    """The base model a checkpoint was trained from: the run's config, else the adapter's."""
    model = run_config(checkpoint).get("model")
    if model:
        return str(model)
    try:
        folder = paths.guard(checkpoint, "checkpoint")
        config = json.loads((folder / "adapter_config.json").read_text("utf-8"))
        return config.get("base_model_name_or_path") or None
    except (OSError, json.JSONDecodeError, BadInput):
        return None


def adapter_problems(base_config, adapter_dir: Path, trust_remote_code: bool = False) -> list[str]:
    """Why an adapter does not fit a base model ([] = it fits).

    Compares each adapter tensor's shape with the layer it patches, using a model
    built on the meta device from the base config, so nothing is loaded yet.
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(base_config,
                                                    trust_remote_code=trust_remote_code)
    modules = dict(skeleton.named_modules())
    problems = []
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), framework="pt") as fh:
        for key in fh.keys():
            problem = _shape_problem(key, fh.get_slice(key).get_shape(), modules)
            if problem:
                problems.append(problem)
            if len(problems) >= 3:
                break
    return problems


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+?)\.(lora_A|lora_B|lora_embedding_A|"
                       r"lora_embedding_B)(?:\.weight)?$")


def _shape_problem(key: str, shape: list[int], modules: dict) -> str | None:
    match = _LORA_KEY.match(key)
    if not match:
        return None
    name, part = match.groups()
    module = modules.get(name)
    if module is None:
        return f"the base model has no layer '{name}'"
    if hasattr(module, "in_features"):
        want = module.in_features if part == "lora_A" else module.out_features
        got = shape[1] if part == "lora_A" else shape[0]
    elif hasattr(module, "num_embeddings"):
        want = module.num_embeddings if part == "lora_embedding_A" else module.embedding_dim
        got = shape[1] if part == "lora_embedding_A" else shape[0]
    else:
        return None
    if want != got:
        return f"layer '{name}' has size {want} in the base model but {got} in the adapter"
    return None


def check_adapter_fits(base: str, base_config, adapter_dir: Path,
                       trust_remote_code: bool = False) -> None:
    problems = adapter_problems(base_config, adapter_dir, trust_remote_code)
    if problems:
        trained_on = base_model_of(adapter_dir)
        hint = f" It was trained on '{trained_on}'." if trained_on else ""
        raise BadInput(f"this adapter does not fit the base model '{base}': "
                       f"{'; '.join(problems)}.{hint} Use the base model it was trained on.",
                       file=str(adapter_dir))


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


def tokenizer_folder(base: str, checkpoint: Path | None) -> str:
    """The checkpoint's own tokenizer if saved (it carries the template training used)."""
    if checkpoint is not None and any((checkpoint / name).is_file() for name in
                                      ("tokenizer_config.json", "tokenizer.json")):
        return str(checkpoint)
    return base


def load_tokenizer(folder: str, template: str = "auto", trust_remote_code: bool = False):
    """The tokenizer with the chat template training used: its own, or the run's named one."""
    from transformers import AutoTokenizer

    from .templates import apply_template
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise load_error(folder, err) from None
    if template != "auto":
        apply_template(tokenizer, template, model=folder)
    if not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_TEMPLATE
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_error(name: str, err: Exception) -> BadInput:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if not Path(name).exists():
        return BadInput(f"'{name}' is not a local folder and could not be fetched from the hub "
                        f"(offline, or no such model): {text}", field="model")
    return BadInput(f"cannot load: {text}", file=name)


def inference_dtype(config, wanted: str = "auto"):
    """auto: the model's own dtype on GPU; fp32 on CPU unless the model is stored in bf16."""
    import torch
    named = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if wanted != "auto":
        return named[wanted]
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if torch.cuda.is_available():
        if stored in (torch.bfloat16, torch.float16):
            return stored
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if stored == torch.bfloat16 else torch.float32


def load_causal_lm(folder: str, dtype, trust_remote_code: bool = False):
    """A causal LM from safetensors only (never unpickles), on the GPU when there is one."""
    import torch
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
            device_map="cuda" if torch.cuda.is_available() else None)
    except (OSError, ValueError) as err:
        raise load_error(folder, err) from None
    model.eval()
    return model


def load_config(folder: str, trust_remote_code: bool = False):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise load_error(folder, err) from None


def apply_adapter(model, adapter_dir: Path, base: str, trust_remote_code: bool = False):
    """Wrap `model` with the PEFT adapter, after checking it fits; size errors become BadInput."""
    from peft import PeftModel
    check_adapter_fits(base, model.config, adapter_dir, trust_remote_code)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as err:
        # A shape mismatch the pre-check missed (e.g. a modules_to_save layer).
        raise BadInput(f"this adapter does not fit the base model '{base}': "
                       f"{str(err).splitlines()[0][:300]}", file=str(adapter_dir)) from None
    peft_model.eval()
    return peft_model


# --- the engine -----------------------------------------------------------------

ProgressFn = Callable[[str, float], None]


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

    def describe(self) -> str:
        what = f"{Path(self.checkpoint).parent.name}/{Path(self.checkpoint).name} on " \
            if self.checkpoint else ""
        size = f"{self.params / 1e6:.1f}M" if self.params < 1e9 else f"{self.params / 1e9:.2f}B"
        return (f"Loaded {what}{self.model} ({size} params, {self.dtype}, {self.device}) in "
                f"{self.load_s:.1f} s; replies stop at {', '.join(self.stop_tokens)}")


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
        self._dtype = None
        self._trust = False

    def load(self, model: str, checkpoint: str | None = None, trust_remote_code: bool = False,
             progress: ProgressFn = lambda message, fraction: None) -> Loaded:
        """Load `model` and optionally a checkpoint of it. Files are checked first."""
        start = time.perf_counter()
        progress("Checking files", 0.02)
        ckpt = Path(checkpoint).expanduser().resolve() if checkpoint else None
        kind = checkpoint_kind(ckpt) if ckpt else None
        base = resolve_model(model)
        config = load_config(base, trust_remote_code)
        if kind == "adapter":
            check_adapter_fits(base, config, ckpt, trust_remote_code)  # before the long load
        self._base_name, self._trust = base, trust_remote_code
        self._dtype = inference_dtype(config)
        progress("Loading tokenizer", 0.08)
        folder = tokenizer_folder(base, ckpt)
        # A checkpoint's saved tokenizer already carries the template; only a bare base needs it.
        template = run_config(ckpt).get("template", "auto") if ckpt and folder == base else "auto"
        self.tokenizer = load_tokenizer(folder, str(template), trust_remote_code)
        if kind == "full":
            progress(f"Loading checkpoint {ckpt.name}", 0.15)
            self.model = load_causal_lm(str(ckpt), self._dtype, trust_remote_code)
        else:
            progress(f"Loading base model {Path(base).name}", 0.15)
            self.model = load_causal_lm(base, self._dtype, trust_remote_code)
        if kind == "adapter":
            progress(f"Applying adapter {ckpt.parent.name}/{ckpt.name}", 0.85)
            self.model = apply_adapter(self.model, ckpt, base, trust_remote_code)
        stops = stop_token_ids(self.tokenizer, self.model.generation_config)
        self.loaded = Loaded(
            model=model, checkpoint=str(ckpt) if ckpt else None, kind=kind,
            dtype=str(self._dtype).replace("torch.", ""), device=str(self.model.device),
            params=sum(p.numel() for p in self.model.parameters()),
            load_s=round(time.perf_counter() - start, 2),
            stop_tokens=[self.tokenizer.convert_ids_to_tokens(i) for i in stops])
        progress("Ready", 1.0)
        return self.loaded

    def _model_for(self, side: str, progress: ProgressFn):
        """The model answering `side` and whether its adapter must be switched off."""
        if side == "after" or self.loaded.kind is None:
            return self.model, False
        if self.loaded.kind == "adapter":
            return self.model, True
        if self.base is None:  # full checkpoint: the base is a second model, loaded on demand
            progress(f"Loading base model {Path(self._base_name).name} for comparison", 0.1)
            self.base = load_causal_lm(self._base_name, self._dtype, self._trust)
        return self.base, False

    def cancel(self) -> None:
        self._cancel.set()

    def stream(self, messages: list[dict], settings: GenSettings, side: str = "after",
               progress: ProgressFn = lambda message, fraction: None) -> Iterator[str]:
        """Stream the reply to `messages` as text pieces. side: 'after' (checkpoint) or 'before'."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
        from transformers import set_seed

        if self.model is None:
            raise BadInput("no model loaded: press Load first")
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

    def _generation_config(self, model, settings: GenSettings):
        import copy
        config = copy.deepcopy(model.generation_config)
        sample = settings.temperature > 0
        config.update(max_new_tokens=int(settings.max_new_tokens), do_sample=sample,
                      temperature=settings.temperature if sample else 1.0,
                      top_p=settings.top_p if sample else 1.0, top_k=None if sample else 50,
                      eos_token_id=stop_token_ids(self.tokenizer, model.generation_config),
                      pad_token_id=self.tokenizer.pad_token_id)
        return config

    def _record_stats(self, out, prompt_len: int, kwargs: dict, start: float) -> None:
        new = out[0, prompt_len:].tolist()
        stops = kwargs["generation_config"].eos_token_id
        stopped = ("cancelled" if self._cancel.is_set() else
                   "eos" if new and new[-1] in stops else "length")
        self.stats = ReplyStats(len(new), time.perf_counter() - start, stopped)

    def reply(self, messages: list[dict], settings: GenSettings, side: str = "after") -> str:
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


def oom_message(during: str) -> str:
    """What to tell a person whose load or reply ran out of memory."""
    if during == "load":
        return ("Out of memory while loading the model. Use a smaller model (or a bf16 one on a "
                "GPU), or free memory: unload other models, stop a training run.")
    return ("Out of memory while generating. Lower max new tokens or clear the conversation "
            "(shorter history), or free memory: stop a training run.")


# --- probes ---------------------------------------------------------------------

def probes_path(checkpoint: str | None, model: str) -> Path | None:
    """Where a probe table goes: next to the checkpoint, else next to a local model folder."""
    if checkpoint:
        return Path(checkpoint) / PROBES_FILE
    folder = Path(model).expanduser()
    return folder / PROBES_FILE if folder.is_dir() else None


def save_probes(path: Path, rows: list[dict], *, model: str, checkpoint: str | None,
                settings: GenSettings) -> Path:
    """Write the probe table (prompt, fine_tuned, base per row) atomically as JSON."""
    record = {"created_at": now_iso(), "model": model, "checkpoint": checkpoint,
              "settings": asdict(settings), "rows": rows}
    try:
        write_atomic(Path(path), json.dumps(record, ensure_ascii=False, indent=1))
    except OSError as err:
        raise BadInput(f"cannot save the probe table: {err.strerror}", file=str(path)) from None
    return Path(path)


# --- terminal chat (`tunebench chat`) ---------------------------------------------

def terminal_chat(model: str, adapter: str | None, system: str | None = None,
                  max_new_tokens: int = 256, temperature: float = 0.0) -> int:
    """Chat in the terminal, streaming replies. /reset clears the history, /exit quits.

    Works with piped input: each line is one user turn; the command exits at end of input.
    """
    if max_new_tokens < 1:
        raise BadInput("--max-new-tokens must be at least 1")
    if temperature < 0:
        raise BadInput("--temperature must be 0 (greedy) or more")
    interactive = sys.stdin.isatty()
    engine = ChatEngine()

    def show_progress(message, fraction):
        if interactive:
            print(f"[{fraction:4.0%}] {message}", file=sys.stderr)

    loaded = engine.load(model, adapter, progress=show_progress)
    print(loaded.describe(), file=sys.stderr)
    if interactive:
        print("Type a message; /reset clears the history, /exit quits.", file=sys.stderr)
    settings = GenSettings(system=system or "", temperature=temperature,
                           max_new_tokens=max_new_tokens)
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
            print("(history cleared)", file=sys.stderr)
            continue
        if not prompt:
            continue
        history = _terminal_turn(engine, history, prompt, settings, interactive)


def _terminal_turn(engine: ChatEngine, history: list[dict], prompt: str,
                   settings: GenSettings, interactive: bool) -> list[dict]:
    if interactive:
        print("bot> ", end="", flush=True)
    pieces = []
    for piece in engine.stream(build_messages(history, prompt, settings.system), settings):
        pieces.append(piece)
        print(piece, end="", flush=True)
    print(flush=True)
    stats = engine.stats
    if interactive:
        print(f"({stats.tokens} tokens, {stats.tokens_per_s:.1f} tokens/s, stopped: "
              f"{stats.stopped})", file=sys.stderr)
    return history + [{"role": "user", "content": prompt},
                      {"role": "assistant", "content": "".join(pieces)}]
