"""Loading models and tokenizers, and preparing them for a tuning method.

Each method maps to what the ecosystem already provides: PEFT for LoRA, DoRA,
QLoRA and OFT adapters, bitsandbytes for the quantized base, plain parameter
freezing for full and freeze tuning.

Loading is one function, `load_checkpoint`, for training, chat and export alike: it
resolves the model ('demo', a folder, a hub id), checks a checkpoint (a PEFT adapter
or a whole-model checkpoint) and that an adapter fits its base before any weight is
read, applies one dtype policy (`pick_dtype`), and reads safetensors only.

A model has one of two heads (`HEADS`): "causal", a language model that writes replies
(every stage but rm, and chat and export of them), or "score", a reward model
(`AutoModelForSequenceClassification` with one output) that scores them: what stage rm
trains, what `load_reward_model` loads for grpo and what `score_replies` runs.
`is_reward_model` tells a reward-model checkpoint apart from its files alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Callable

from .config import DEMO_MODEL, LORA_FAMILY, TrainConfig
from . import paths
from .runs import semicolons
from .errors import BadInput
from .i18n import Msg, msg, t
from .templates import CHATML, apply_template

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
ProgressFn = Callable[[str, float], None]


# --- what a name or folder is, checked before anything is loaded ---------------------

def resolve_model(name: str) -> str:
    """'demo', a local model folder or a hub id -> what from_pretrained takes.

    The one check of a model reference, before anything heavy is loaded: the path gate
    for page-started jobs, 'demo' built on first use, a folder must hold config.json and
    safetensors weights (pickled .bin weights are never loaded), an adapter folder given
    as the model is explained, and a hub id needs a network connection. BadInput if unusable.
    """
    name = paths.guard_model(name or "")  # confined jobs: inside the allowed roots
    if not name:
        raise BadInput(msg("job.model.none"), field="model")
    if name == DEMO_MODEL:
        from .demo_model import ensure_demo_model
        return str(ensure_demo_model())
    local = Path(name).expanduser()
    if local.is_dir():
        if (local / "adapter_config.json").is_file() and not (local / "config.json").is_file():
            raise BadInput(msg("job.model.is_adapter"), file=name, field="model")
        if not (local / "config.json").is_file():
            raise BadInput(msg("job.model.no_config"), file=str(local))
        if not any((local / f).is_file() for f in WEIGHT_FILES) and not (
                local / "adapter_config.json").is_file():
            raise BadInput(msg("job.model.no_weights"), file=str(local))
        return str(local.resolve())
    # Hub ids look like "name" or "org/name"; anything else was meant as a folder.
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise BadInput(msg("job.model.not_found"), file=name, field="model")
    return name  # a hub id, e.g. Qwen/Qwen2.5-0.5B-Instruct, for online machines




def checkpoint_kind(folder: Path) -> str:
    """'adapter' (PEFT folder) or 'full' (whole model folder). BadInput otherwise."""
    folder = paths.guard(folder, "checkpoint")
    if not folder.is_dir():
        raise BadInput(msg("job.checkpoint.not_found"), file=str(folder))
    if (folder / "adapter_config.json").is_file():
        if not (folder / "adapter_model.safetensors").is_file():
            what = ("job.checkpoint.only_bin" if (folder / "adapter_model.bin").exists()
                    else "job.checkpoint.no_safetensors")
            raise BadInput(msg(what), file=str(folder))
        return "adapter"
    if not (folder / "config.json").is_file():
        inside = sorted(p.name for p in folder.iterdir() if p.name == "final" or
                        p.name.startswith("checkpoint-"))
        hint = msg("job.checkpoint.run_folder_hint", inside=inside[0]) if inside else ""
        raise BadInput(msg("job.checkpoint.not_one", hint=hint), file=str(folder))
    resolve_model(str(folder))  # config.json and safetensors weights, never pickles
    return "full"


# A reward model: a sequence-classification model with one output (a score per reply).
HEADS = ("causal", "score")
SCORE_ARCHITECTURE = "ForSequenceClassification"
SCORE_TASK = "SEQ_CLS"
# The head modules transformers' sequence-classification models use.
SCORE_HEAD_NAMES = ("score", "classifier")
REWARD_MODEL_REFUSAL = (
    "this {what} is a reward model (stage rm): it scores replies, it does not write them; "
    "use it as the reward_model of a grpo run, or score replies with it in the Chat tab "
    "(choose it there and use 'Score a reply')")


def reward_model_refusal(what: str) -> Msg:
    """REWARD_MODEL_REFUSAL as a message in the reader's language (`what`: checkpoint or model)."""
    return msg("job.reward.refusal", what=msg(f"job.what.{what}"))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _scores(architectures) -> bool:
    return any(str(a).endswith(SCORE_ARCHITECTURE) for a in (architectures or []))


def is_reward_model(path: str | Path | None) -> bool:
    """Whether `path` is a reward model (what stage rm writes): an adapter folder whose
    adapter_config.json has task_type SEQ_CLS, or a model folder whose config.json names a
    ...ForSequenceClassification architecture. Reads those JSON files only (the page calls
    it); False for anything else, including hub ids and folders outside the allowed ones."""
    if not str(path or "").strip():
        return False
    try:
        folder = paths.guard(path, "checkpoint")
    except BadInput:
        return False
    if (folder / "adapter_config.json").is_file():
        return _read_json(folder / "adapter_config.json").get("task_type") == SCORE_TASK
    return _scores(_read_json(folder / "config.json").get("architectures"))


def run_config(checkpoint: Path) -> dict:
    """The training config of the run a checkpoint belongs to ({} if not inside a run dir)."""
    import yaml

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


def tokenizer_folder(base: str, checkpoint: Path | None) -> str:
    """The checkpoint's own tokenizer if saved (it carries the template training used)."""
    if checkpoint is not None and any((checkpoint / name).is_file() for name in
                                      ("tokenizer_config.json", "tokenizer.json")):
        return str(checkpoint)
    return base


def adapter_problems(base_config, adapter_dir: Path, trust_remote_code: bool = False,
                     head: str = "causal") -> list[Msg]:
    """Why an adapter does not fit a base model ([] = it fits).

    Compares each adapter tensor's shape with the layer it patches, using a model
    built on the meta device from the base config (with the adapter's `head`), so
    nothing is loaded yet.
    """
    import torch
    from safetensors import safe_open

    with torch.device("meta"):
        skeleton = _auto_class(head).from_config(base_config,
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


def _shape_problem(key: str, shape: list[int], modules: dict) -> Msg | None:
    match = _LORA_KEY.match(key)
    if not match:
        return None
    name, part = match.groups()
    module = modules.get(name)
    if module is None:
        return msg("job.adapter.no_layer", name=name)
    if hasattr(module, "in_features"):
        want = module.in_features if part == "lora_A" else module.out_features
        got = shape[1] if part == "lora_A" else shape[0]
    elif hasattr(module, "num_embeddings"):
        want = module.num_embeddings if part == "lora_embedding_A" else module.embedding_dim
        got = shape[1] if part == "lora_embedding_A" else shape[0]
    else:
        return None
    if want != got:
        return msg("job.adapter.layer_size", name=name, want=want, got=got)
    return None


def check_adapter_fits(base: str, base_config, adapter_dir: Path,
                       trust_remote_code: bool = False, head: str | None = None) -> None:
    """BadInput naming the misfit when the adapter does not fit `base` (head None: the
    adapter's own, a score head for a reward-model adapter)."""
    if head is None:
        head = "score" if is_reward_model(adapter_dir) else "causal"
    problems = adapter_problems(base_config, adapter_dir, trust_remote_code, head)
    if problems:
        trained_on = base_model_of(adapter_dir)
        hint = msg("job.adapter.trained_on", model=trained_on) if trained_on else ""
        raise BadInput(msg("job.adapter.misfit", base=base, problems=semicolons(problems),
                           hint=hint), file=str(adapter_dir))


# --- precision -------------------------------------------------------------------------

def compute_dtype(compute_type: str):
    """The training precision for `compute_type` on this machine: "bf16", "fp16", "fp32" or
    "pure_bf16"."""
    import torch

    on_gpu = torch.cuda.is_available()
    if compute_type == "auto":
        if on_gpu and torch.cuda.is_bf16_supported():
            compute_type = "bf16"
        else:
            compute_type = "fp16" if on_gpu else "fp32"
    return compute_type


def pick_dtype(wanted="auto", model_config=None, device: str | None = "cpu", *,
               train: bool = False):
    """The one dtype policy: the torch dtype a model's weights are loaded in.

    - a torch dtype is taken as it is; 'bf16', 'fp16', 'fp32' name one;
    - 'stored': the dtype the weights are stored in (fp32 when unrecorded), what export keeps;
    - 'auto', to run the model on `device`: on a GPU its stored half precision, else bf16
      where supported, else fp16; on a CPU fp32, or bf16 for a model stored in bf16;
    - training (`train`) takes the compute type instead: mixed precision keeps fp32 master
      weights, pure_bf16 loads bf16 (see compute_dtype).
    """
    import torch

    if isinstance(wanted, torch.dtype):
        return wanted
    if train:
        return torch.bfloat16 if compute_dtype(wanted) == "pure_bf16" else torch.float32
    named = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if wanted in named:
        return named[wanted]
    stored = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if wanted == "stored":
        return stored if stored in named.values() else torch.float32
    if wanted != "auto":
        raise BadInput(msg("job.model.bad_dtype", named=", ".join(named), wanted=wanted),
                       field="dtype")
    if device not in (None, "cpu"):
        if stored in (torch.bfloat16, torch.float16):
            return stored
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if stored == torch.bfloat16 else torch.float32


def pick_attention(booster: str) -> str:
    """The attention implementation for `booster`; config.validate already rejected missing ones.

    The loader may then move SDPA to its padding-free form (core/attention.py apply_booster).
    """
    from .attention import resolve

    return resolve(booster)


def _quantization(bits: int, compute_type: str, head: str = "causal"):
    import torch
    from transformers import BitsAndBytesConfig

    # A reward model's score head is trained whole (PEFT's modules_to_save): keep it out of
    # the quantized layers, whose weights cannot be trained.
    skip = {"llm_int8_skip_modules": list(SCORE_HEAD_NAMES)} if head == "score" else {}
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    compute = torch.bfloat16 if compute_dtype(compute_type) in ("bf16", "pure_bf16") \
        else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute,
                              **skip)


def _rope_scaled(model_config, source: str, scaling: str, factor: float):
    """`model_config` with RoPE scaling set (transformers 5 reads `rope_parameters`).

    The context grows `factor` times: max_position_embeddings is raised to match,
    and yarn/llama3 remember the original length they scale from.
    """
    text = model_config.get_text_config()
    old = dict(getattr(text, "rope_parameters", None) or {})
    if not old or any(isinstance(v, dict) for v in old.values()):
        raise BadInput(msg("job.model.no_rope"), file=source, field="rope_scaling")
    original = int(text.max_position_embeddings)
    params = {"rope_type": scaling, "factor": float(factor),
              "rope_theta": old.get("rope_theta", getattr(text, "rope_theta", 10000.0))}
    if scaling in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = original
    if scaling == "llama3":
        params.update(low_freq_factor=1.0, high_freq_factor=4.0)  # Llama 3.1's published values
    if "partial_rotary_factor" in old:
        params["partial_rotary_factor"] = old["partial_rotary_factor"]
    text.rope_parameters = params
    text.max_position_embeddings = int(original * factor)
    print(f"RoPE scaling: {scaling} x{factor:g}, context "
          f"{original} -> {text.max_position_embeddings} positions", flush=True)
    return model_config


# --- the one loader ----------------------------------------------------------------------

def load_error(name: str, err: Exception, what: str = "model") -> BadInput:
    """A failed from_pretrained, for people: a name that is neither a folder nor on the hub,
    or the library's first line about a folder it could not load."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if not Path(name).exists():
        return BadInput(msg("job.model.not_fetched", name=name, text=text), field="model")
    return BadInput(msg("job.model.cannot_load", what=msg(f"job.model.part.{what}"), text=text),
                    file=name)


def load_config(folder: str, trust_remote_code: bool = False):
    """The model config (config.json) of a resolved model: no weights are read."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise load_error(folder, err, "config") from None


def _tokenizer(folder: str, template: str, trust_remote_code: bool, fallback: str | None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise load_error(folder, err, "tokenizer") from None
    if template == "auto" and not tokenizer.chat_template and fallback:
        tokenizer.chat_template = fallback
    apply_template(tokenizer, template, model=folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(model: str, template: str = "auto", trust_remote_code: bool = False):
    """The tokenizer of `model` (see resolve_model) with chat template `template`: its own
    ('auto'; a tokenizer without one is refused, so no run trains on a guessed template)
    or a named one from core/templates.py."""
    return _tokenizer(resolve_model(model), template, trust_remote_code, fallback=None)


def load_checkpoint(model: str | None, adapter: str | Path | None = None, *,
                    purpose: str = "infer", head: str = "causal", template: str | None = None,
                    dtype="auto", device: str | None = None, trust_remote_code: bool = False,
                    tokenizer=None, attention: str | None = None, booster: str | None = None,
                    quant_bits: int | None = None, rope_scaling: str = "none",
                    rope_factor: float = 1.0, progress: ProgressFn | None = None):
    """(tokenizer, model): the one loader, for training, chat, scoring and export.

    `model` is 'demo', a local folder or a hub id (see resolve_model); without one, an
    adapter's base is read from its run's config.yaml or its adapter_config.json.
    `adapter` is an optional checkpoint: a PEFT adapter folder (applied to the base, after
    checking that it fits, before the weights load) or a whole-model checkpoint of a
    full/freeze run (loaded instead of the base). Weights are safetensors only.

    `head` 'causal' loads a language model (AutoModelForCausalLM); a reward model is then
    refused (REWARD_MODEL_REFUSAL), whatever the purpose. 'score' loads a reward model
    (AutoModelForSequenceClassification, one output, config.pad_token_id set from the
    tokenizer so the score is read at the last real token): for inference the checkpoint
    (or model) must be one; for training a causal base gets a fresh one-output head.
    purpose 'infer' (chat, scoring, export) returns the model in eval mode on `device`
    (None: the GPU when there is one), and a tokenizer without a chat template gets
    ChatML; purpose 'train' leaves the model where the Trainer places it and takes `dtype`
    as the compute type. The dtype policy is pick_dtype's. `template` None means the one
    the checkpoint was trained with (its saved tokenizer, else its run's template, else the
    model's own). `tokenizer` reuses one already loaded. Training's extras: `attention`
    (the attention implementation), `booster` (core/attention.py apply_booster),
    `quant_bits` (QLoRA's quantized base) and `rope_scaling`/`rope_factor`.
    `progress(message, fraction)` hears each step.
    """
    import torch

    train = purpose == "train"
    if head not in HEADS:
        raise BadInput(msg("job.model.bad_head", a=HEADS[0], b=HEADS[1], head=head),
                       field="head")
    progress = progress or (lambda message, fraction: None)
    progress(t("job.load.checking"), 0.02)
    ckpt = paths.guard(adapter, "checkpoint").resolve() if adapter else None
    kind = checkpoint_kind(ckpt) if ckpt else None
    if not model and ckpt is not None:
        model = base_model_of(ckpt) or (str(ckpt) if kind == "full" else None)
    base = resolve_model(model)
    source = str(ckpt) if kind == "full" else base
    model_config = load_config(source, trust_remote_code)
    _check_head(head, model_config, ckpt if ckpt else base, kind, train)
    if kind == "adapter":  # before the long load
        check_adapter_fits(base, model_config, ckpt, trust_remote_code, head)
    if device is None and not train:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = pick_dtype(dtype, model_config, device, train=train)
    if tokenizer is None:
        progress(t("job.load.tokenizer"), 0.08)
        folder = tokenizer_folder(base, ckpt)
        if template is None:  # a checkpoint's saved tokenizer already carries its template
            template = run_config(ckpt).get("template", "auto") if ckpt and folder == base \
                else "auto"
        tokenizer = _tokenizer(folder, str(template), trust_remote_code,
                               fallback=None if train else CHATML)
    what = (msg("job.load.checkpoint", name=ckpt.name) if kind == "full"
            else msg("job.load.base", name=Path(base).name))
    scored = msg("job.load.scored") if head == "score" else ""
    progress(t("job.load.model", what=what, dtype=str(torch_dtype).replace("torch.", ""),
               scored=scored), 0.15)
    kwargs = dict(dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    if device not in (None, "cpu"):
        kwargs["device_map"] = device
    if attention:
        kwargs["attn_implementation"] = attention
    if quant_bits:
        kwargs["quantization_config"] = _quantization(quant_bits, str(dtype), head)
    if rope_scaling != "none":
        kwargs["config"] = _rope_scaled(model_config, source, rope_scaling, rope_factor)
    if head == "score":
        kwargs["config"] = _score_config(model_config, tokenizer)
    try:
        with _quiet_fresh_head(head == "score" and kind == "adapter"):
            loaded = _auto_class(head).from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise load_error(source, err) from None
    if booster:
        from .attention import apply_booster
        loaded = apply_booster(loaded, booster)
    if kind == "adapter":
        progress(t("job.load.adapter", name=f"{ckpt.parent.name}/{ckpt.name}"), 0.85)
        loaded = _apply_adapter(loaded, ckpt, base, trainable=train)
    if not train:
        loaded.eval()
    return tokenizer, loaded


def _auto_class(head: str):
    """The transformers auto class for a head: a language model, or a reward model."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM


@contextlib.contextmanager
def quiet_logger(name: str, level: int | None = None):
    """Raise one library logger's level for a block (ERROR unless given), then put it back:
    for messages that are expected in that block and would only bury the real output."""
    import logging
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(logging.ERROR if level is None else level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _quiet_fresh_head(quiet: bool):
    """Without transformers' report of a freshly initialised score head: a reward-model
    adapter brings the trained head (PEFT's modules_to_save) right after."""
    return quiet_logger("transformers.modeling_utils") if quiet else contextlib.nullcontext()


def _check_head(head: str, model_config, where: Path | str, kind: str | None,
                train: bool) -> None:
    """A reward model is not loaded as a language model, and (except to train one) a
    language model is not loaded as a reward model: its score head would be random."""
    if kind == "adapter":
        task = _read_json(Path(where) / "adapter_config.json").get("task_type")
        reward = task == SCORE_TASK
    else:
        reward = _scores(getattr(model_config, "architectures", None))
    what = "checkpoint" if kind else "model"
    if head == "causal" and reward:
        raise BadInput(reward_model_refusal(what), file=str(where), field=what)
    if head == "score" and not reward and not train:
        raise BadInput(msg("job.reward.not_one", what=msg(f"job.what.{what}"),
                           architecture=SCORE_ARCHITECTURE), file=str(where), field=what)
    labels = getattr(model_config, "num_labels", 1)
    if head == "score" and reward and kind != "adapter" and labels != 1:
        raise BadInput(msg("job.reward.labels", labels=labels), file=str(where), field=what)


def _score_config(model_config, tokenizer):
    """The config a reward model loads with: one output (a fresh head on a language model)
    and the tokenizer's pad id, which sequence classification needs to find each row's
    last real token. Saved with the model, so it loads the same without tunebench."""
    if not _scores(getattr(model_config, "architectures", None)):
        model_config.num_labels = 1
    pad = tokenizer.pad_token_id
    model_config.pad_token_id = pad
    text = model_config.get_text_config()
    if text is not model_config:
        text.pad_token_id = pad
    return model_config


def _apply_adapter(model, adapter_dir: Path, base: str, trainable: bool = False):
    """Wrap `model` with the PEFT adapter (checked to fit already); size errors become BadInput."""
    from peft import PeftModel
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as err:
        # A shape mismatch the pre-check missed (e.g. a modules_to_save layer).
        raise BadInput(msg("job.adapter.misfit_load", base=base,
                           text=str(err).splitlines()[0][:300]), file=str(adapter_dir)) from None


# --- reward models: scoring replies ------------------------------------------------------

def load_reward_model(path_or_model: str | Path, adapter: str | Path | None = None, *,
                      template: str | None = None, device: str | None = None, dtype="auto",
                      trust_remote_code: bool = False, progress: ProgressFn | None = None):
    """(model, tokenizer) of a reward model, in eval mode, ready for `score_replies`.

    Goes through the one loader (`load_checkpoint` with head 'score'). `path_or_model` is
    the final/ (or a checkpoint-N/) of a stage rm run: an adapter folder, whose base is
    read from its run's config.yaml or adapter_config.json and resolved like any adapter's,
    or a whole model folder; or any sequence-classification model with one output (a
    folder, or a hub id when online). With `adapter`, `path_or_model` is its base model.
    A language model (no score head) is BadInput: its scores would be random. `template`
    as load_checkpoint's (None: the one the reward model was trained with). The model
    can also be handed to TRL as a reward function: its logits[:, 0] is the score.
    """
    model: str | None = str(path_or_model)
    if adapter is None and (paths.expand_user(model) / "adapter_config.json").is_file():
        model, adapter = None, path_or_model  # gated by the loader, as every checkpoint is
    tokenizer, loaded = load_checkpoint(model, adapter, head="score", template=template,
                                        dtype=dtype, device=device,
                                        trust_remote_code=trust_remote_code, progress=progress)
    return loaded, tokenizer


def score_replies(model, tokenizer, prompt_messages: list[dict] | str, replies: list, *,
                  cutoff_len: int | None = None, batch_size: int = 8) -> list[float]:
    """The reward model's score of each reply to `prompt_messages` (a conversation ending
    with the user's turn, or one user message as a string), in the order given. A reply is
    a string, or an assistant message (or a list of them) as in TRL's layout.

    Each reply is encoded as training encodes it (templates.encode_reply: the chat template
    up to the assistant header, then the reply and the template's end of turn), so a score
    here is the score the rm run trained. Rows are right-padded in batches; the model reads
    its score at each row's last real token. `cutoff_len` truncates as training does (None:
    no limit below the model's context).
    """
    import torch

    from .templates import encode_reply

    prompt = ([{"role": "user", "content": prompt_messages}] if isinstance(prompt_messages, str)
              else [dict(m) for m in prompt_messages])
    limit = cutoff_len or getattr(model.config.get_text_config(), "max_position_embeddings",
                                  None) or 10**9
    rows = []
    for reply in replies:
        prompt_ids, reply_ids = encode_reply(prompt, _reply_text(reply), tokenizer, int(limit))
        rows.append(prompt_ids + reply_ids)
    device = next(model.parameters()).device
    # The id the model skips when it looks for each row's last real token.
    pad = next(p for p in (model.config.pad_token_id, tokenizer.pad_token_id, 0) if p is not None)
    scores: list[float] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(len(r) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        scores += logits[:, 0].float().tolist()
    return scores


def _reply_text(reply) -> str:
    """A reply as text: a string, an assistant message, or a list of them (TRL's
    conversational layout gives chosen/rejected as [{"role": "assistant", ...}])."""
    if isinstance(reply, dict):
        return str(reply.get("content", ""))
    if isinstance(reply, (list, tuple)):
        return "".join(_reply_text(part) for part in reply)
    return str(reply)


def load_base_model(config: TrainConfig, attention: str, tokenizer=None):
    """The model `config` trains: the one loader with training's extras (QLoRA's quantized
    base, the attention booster, RoPE scaling), in the precision of its compute type.
    Stage rm trains a reward model: the base with a fresh one-output score head
    (AutoModelForSequenceClassification); every other stage a causal language model."""
    _, model = load_checkpoint(
        config.model, purpose="train", head=head_of(config), template=config.template,
        dtype=config.compute_type, trust_remote_code=config.trust_remote_code,
        tokenizer=tokenizer, attention=attention, booster=config.booster,
        quant_bits=config.quant_bits if config.method == "qlora" else None,
        rope_scaling=config.rope_scaling, rope_factor=config.rope_factor)
    return model


def head_of(config: TrainConfig) -> str:
    """The head a stage trains: 'score' (a reward model) for rm, else 'causal'."""
    return "score" if config.stage == "rm" else "causal"


def apply_method(model, config: TrainConfig):
    """Make only the parameters of the chosen method trainable. A reward model's score head
    is always trained: PEFT task type SEQ_CLS trains and saves it whole (modules_to_save)
    beside the adapter; freeze trains it with the last layers; full trains everything."""
    if config.method in LORA_FAMILY:
        return _add_adapter(model, config)
    if config.method == "oft":
        return _add_oft(model, config)
    if config.method == "freeze":
        _train_last_layers(model, config.freeze_layers)
        if head_of(config) == "score":
            for param in score_head(model).parameters():
                param.requires_grad = True
    return model  # full: everything stays trainable


def _task_type(config: TrainConfig) -> str:
    return "SEQ_CLS" if head_of(config) == "score" else "CAUSAL_LM"


def score_head(model):
    """The score head of a reward model (transformers names it score or classifier)."""
    for name in SCORE_HEAD_NAMES:
        head = getattr(model, name, None)
        if head is not None:
            return head
    raise BadInput(msg("job.reward.no_head", a=SCORE_HEAD_NAMES[0], b=SCORE_HEAD_NAMES[1]),
                   field="model")


# PEFT's fast-SVD PiSSA: 16 subspace iterations initialise a 7B model in seconds and train
# about as well as the exact SVD, which takes minutes (PEFT's LoraConfig documentation).
PISSA_INIT = "pissa_niter_16"


def _add_adapter(model, config: TrainConfig):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing)
    target = "all-linear" if config.lora_target == "all-linear" else [
        t.strip() for t in config.lora_target.split(",")]
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=target,
                      use_dora=config.method == "dora", use_rslora=config.use_rslora,
                      init_lora_weights=PISSA_INIT if config.lora_init == "pissa" else True,
                      task_type=_task_type(config))
    try:
        return get_peft_model(model, lora)
    except ValueError as err:
        raise BadInput(str(err).splitlines()[0], field="lora_target") from None


def _add_oft(model, config: TrainConfig):
    """An OFT adapter on every linear layer of the decoder.

    Only the block size is given: PEFT derives the number of blocks per layer (its `r`)
    from each layer's width and refuses both at once.
    """
    from peft import OFTConfig, get_peft_model

    oft = OFTConfig(r=0, oft_block_size=config.oft_block_size, target_modules="all-linear",
                    task_type=_task_type(config))
    try:
        return get_peft_model(model, oft)
    except ValueError as err:
        raise BadInput(str(err).splitlines()[0], field="oft_block_size") from None


def changes_base_weights(model) -> bool:
    """Whether the adapter's initialisation changed the base weights (PiSSA keeps the
    residual W - BA in the base), so it must be converted to plain LoRA when saved."""
    config = getattr(model, "peft_config", {}).get("default")
    return str(getattr(config, "init_lora_weights", "")).startswith("pissa")


def save_initial_adapter(model, folder: Path) -> None:
    """The adapter as initialised, before any training: what PEFT subtracts when it converts
    a PiSSA adapter to one that loads on the original base."""
    config = model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True  # PEFT's conversion requires it, so loading does not re-run SVD
    try:
        model.save_pretrained(str(folder))
    finally:
        config.init_lora_weights = init


def save_converted_adapter(model, folder: Path, initial: Path) -> None:
    """Save a PiSSA adapter as plain LoRA for the original base: PEFT writes
    [A | A0] and [B | -B0] (twice the rank), whose product is the trained change AB - A0B0."""
    model.save_pretrained(str(folder), path_initial_model_for_weight_conversion=str(initial))
    _keep_whole_tensors(model, Path(folder))


def _keep_whole_tensors(model, folder: Path) -> None:
    """Add back what PEFT's PiSSA conversion leaves out of the converted file (PEFT 0.21
    writes only the LoRA tensors): modules trained whole (modules_to_save), such as a
    reward model's score head, which the adapter needs to load as trained."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    saved = load_file(str(path))
    whole = {key: value.detach().cpu().contiguous()
             for key, value in get_peft_model_state_dict(model).items()
             if ".lora_" not in key and key not in saved}
    if whole:
        save_file({**saved, **whole}, str(path), metadata={"format": "pt"})


def load_converted_adapter(model, folder: Path) -> None:
    """Resume a PiSSA run from a checkpoint saved by `save_converted_adapter`.

    The model was just initialised exactly as the run was (same seed, same residual
    weights); the trained A and B are the first `r` rows of the saved lora_A and the
    first `r` columns of the saved lora_B, the layout the conversion writes.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(Path(folder) / "adapter_model.safetensors"))
    current = get_peft_model_state_dict(model)
    state = {key: _trained_part(key, value, current.get(key)) for key, value in saved.items()}
    misfits = [key for key, value in state.items() if value is None] + sorted(
        set(current) - set(saved))
    if misfits:
        raise BadInput(msg("job.pissa.misfit", key=misfits[0]), file=str(folder),
                       field="resume")
    set_peft_model_state_dict(model, state)


def _trained_part(key: str, saved, current):
    """The trained half of one converted tensor: lora_A's first rows, lora_B's first
    columns. None when it is not a converted form of `current` (twice its rank). A
    tensor saved whole (a reward model's score head, PEFT's modules_to_save) is as it is."""
    if current is None:
        return None
    if ".lora_" not in key and saved.shape == current.shape:
        return saved
    if ".lora_A." in key and saved.shape == (2 * current.shape[0], current.shape[1]):
        return saved[:current.shape[0]]
    if ".lora_B." in key and saved.shape == (current.shape[0], 2 * current.shape[1]):
        return saved[:, :current.shape[1]]
    return None


def _decoder_layers(model):
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if layers is not None and hasattr(layers, "__len__") and len(layers) > 0:
            return layers
    raise BadInput(msg("job.freeze.no_layers"), field="method")


def _train_last_layers(model, n: int) -> None:
    layers = _decoder_layers(model)
    if n > len(layers):
        raise BadInput(msg("job.freeze.too_many", n=n, layers=len(layers)),
                       field="freeze_layers")
    for param in model.parameters():
        param.requires_grad = False
    for layer in layers[-n:]:
        for param in layer.parameters():
            param.requires_grad = True


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def pick_cpu_threads(n_params: int, generates: bool = False) -> None:
    """Train small models on one CPU thread, unless OpenMP threads sleep when idle.

    Measured on a 2-core machine with the 3.5M-parameter demo model: 1 thread ran
    at ~3,500 tokens/s, 2 threads at ~1,100 whenever another process used a core
    (the threads spin waiting for each other). With OMP_WAIT_POLICY=PASSIVE, which
    `tunebench train` sets before torch loads, 2 threads ran at ~5,200 tokens/s on
    free cores and ~2,900 (as fast as one) on a busy machine, so they keep torch's
    default. Bigger models always do. An explicit OMP_NUM_THREADS always wins.

    `generates` (GRPO samples its replies one token at a time): each step is too small to
    share, and waking a second thread costs more than it saves: GRPO on the demo model
    trained in 5.2 s on one thread and 7.6 s on two sleeping ones (bench/RESULTS.md).
    """
    import torch

    if torch.cuda.is_available() or os.environ.get("OMP_NUM_THREADS"):
        return
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" and not generates:
        return
    if n_params < SMALL_MODEL_PARAMS:
        torch.set_num_threads(1)


SMALL_MODEL_PARAMS = 50_000_000
