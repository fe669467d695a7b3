"""How much memory a run will need, estimated before anything heavy is loaded.

The web page shows this before Start, so it must be cheap: it reads the model's
config.json (never the weights) and never imports torch. The parameter count
comes from the architecture (hidden size, layers, heads, MLP width, vocabulary);
memory is then the sum of

    weights      every parameter, at the dtype it is loaded in (4/8-bit for QLoRA)
    gradients    one per trainable parameter
    optimizer    the optimizer's state per trainable parameter (Adam: two moments)
    activations  what the forward pass keeps for the backward pass, for one batch of
                 batch_size x cutoff_len tokens (the worst case: every row full)
    runtime      Python, torch, transformers and TRL themselves (CPU only: on a GPU
                 this lives in host RAM, and the CUDA context is counted instead)

and, by stage (see `_stage_parts`):

    sequences        dpo and rm run chosen AND rejected for every example: twice the
                     activations. kto's KL sequence runs without gradients before the
                     policy's pass (TRL 1.16), so it adds no kept activations.
    reference copy   dpo and kto (and grpo with pref_beta > 0) compare with a frozen
                     reference model: with full/freeze tuning a second copy of the weights
                     (no gradients, no optimizer state), unless its log-probabilities are
                     computed once before training (core/stages.py does so for dpo and
                     kto); with an adapter the reference is the base with the adapter
                     off, no copy; orpo/simpo use none.
    generation cache grpo samples its replies first: the KV cache of batch_size sequences
                     of prompt (cutoff_len / 2, at most GRPO_PROMPT_CAP) + completion
                     tokens, and the sampling step's logits.
    reward model     grpo with reward_model: its weights, at the dtype it runs in.

rm trains a sequence classifier: no language-model head (its logits are one score).

The activation model counts the tensors a Llama/Qwen-style decoder layer saves
for backward, per token; the constants were checked against measured peak RSS
on CPU (tests/test_memory.py) and are meant to be right within about +-50%.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import device as device_mod
from .i18n import Msg, msg, t

GB = 1024**3
CPU_RUNTIME_GB = 0.75       # RSS of a training process before the model: torch, transformers, TRL
CUDA_CONTEXT_GB = 0.6       # the CUDA context and kernels, on the GPU itself
FRAGMENTATION = 1.10        # allocator slack on top of live tensors
# Optimizer state, bytes per trainable parameter (fp32 moments unless noted).
OPTIMIZER_BYTES = {"adamw_torch": 8.0, "adamw_8bit": 2.0, "paged_adamw_8bit": 2.0,
                   "paged_adamw_32bit": 8.0, "adafactor": 0.2, "sgd": 0.0}
LOGIT_CHUNK = 32768         # positions TRL's fused LM head scores per chunk
LORA_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GRPO_PROMPT_CAP = 512       # RL prompts are questions: assumed at most this many tokens


@dataclass(frozen=True)
class Shape:
    """The numbers of a decoder-only transformer that decide its size."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    experts: int = 1
    qkv_bias: bool = False


@dataclass(frozen=True)
class Estimate:
    params: int
    trainable: int
    weights_gb: float
    gradients_gb: float
    optimizer_gb: float
    activations_gb: float
    runtime_gb: float
    total_gb: float
    where: str              # "GPU" or "RAM": the memory it must fit in
    reference_gb: float = 0.0    # a frozen reference copy of the weights
    generation_gb: float = 0.0   # grpo: KV cache and logits while sampling replies
    reward_gb: float = 0.0       # grpo: the reward model's weights
    sequences: int = 1           # sequences per example (dpo, rm: chosen and rejected)
    notes: tuple[Msg, ...] = ()  # what the estimate could not count

    def breakdown(self, lang: str | None = None) -> str:
        """The parts in GB, in `lang` (default: the current language)."""
        activations = ("activations_per", self.activations_gb) if self.sequences > 1 else \
            ("activations", self.activations_gb)
        named = [("weights", self.weights_gb), ("gradients", self.gradients_gb),
                 ("optimizer", self.optimizer_gb), activations, ("runtime", self.runtime_gb)]
        named += [(name, value) for name, value in (("reference", self.reference_gb),
                                                    ("generation", self.generation_gb),
                                                    ("reward", self.reward_gb)) if value > 0]
        parts = [t(f"config.memory.part.{name}", lang, gb=f"{value:.1f}", n=self.sequences)
                 for name, value in named]
        return t("config.memory.sep", lang).join(parts) + "".join(
            t("config.memory.note", lang, note=note) for note in self.notes)


# --- the model's shape ------------------------------------------------------------

def model_info(model: str) -> dict:
    """The model's config.json as a dict, read without loading weights.

    'demo' reads the built demo model, or its recipe when it is not built yet.
    A hub id that is not on disk gives {} (the estimate then says it is unknown).
    """
    from .config import DEMO_MODEL

    if model == DEMO_MODEL:
        from . import demo_model
        path = demo_model.default_path()
        if not (path / "config.json").is_file():
            return {**demo_model.SHAPE, "vocab_size": demo_model.VOCAB_SIZE,
                    "tie_word_embeddings": True, "model_type": "qwen2"}
        model = str(path)
    config = Path(model).expanduser() / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def shape_of(info: dict) -> Shape | None:
    """The Shape of a config.json (multimodal configs: their text part); None if unknown."""
    info = info.get("text_config") or info
    try:
        hidden, layers = int(info["hidden_size"]), int(info["num_hidden_layers"])
        heads = int(info["num_attention_heads"])
        vocab = int(info["vocab_size"])
    except (KeyError, TypeError, ValueError):
        return None
    kv = int(info.get("num_key_value_heads") or heads)
    head_dim = int(info.get("head_dim") or hidden // heads)
    inter = int(info.get("intermediate_size") or 4 * hidden)
    experts = int(info.get("num_local_experts") or info.get("num_experts") or 1)
    # Qwen2 always has q/k/v biases; Llama-style configs say so in attention_bias.
    bias = bool(info.get("attention_bias", info.get("model_type", "").startswith("qwen2")))
    return Shape(hidden, layers, heads, kv, head_dim, inter, vocab,
                 bool(info.get("tie_word_embeddings", False)), experts, bias)


def _linear_shapes(s: Shape) -> list[tuple[str, int, int]]:
    """(name, in, out) of each linear layer of one decoder layer."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    mlp = [("gate_proj", s.hidden, s.intermediate), ("up_proj", s.hidden, s.intermediate),
           ("down_proj", s.intermediate, s.hidden)] * s.experts
    return [("q_proj", s.hidden, q), ("k_proj", s.hidden, kv), ("v_proj", s.hidden, kv),
            ("o_proj", q, s.hidden), *mlp]


def count_params(s: Shape) -> tuple[int, int]:
    """(all parameters, those inside linear layers of the decoder)."""
    linear = s.layers * sum(i * o for _, i, o in _linear_shapes(s))
    embeddings = s.vocab * s.hidden * (1 if s.tied else 2)
    norms = s.layers * 2 * s.hidden + s.hidden
    biases = s.layers * (s.heads + 2 * s.kv_heads) * s.head_dim if s.qkv_bias else 0
    return linear + embeddings + norms + biases, linear


def _lora_params(s: Shape, config) -> int:
    targets = LORA_SUFFIXES if config.lora_target == "all-linear" else tuple(
        t.strip() for t in config.lora_target.split(","))
    per_layer = sum(config.lora_rank * (i + o) + (o if config.method == "dora" else 0)
                    for name, i, o in _linear_shapes(s) if name in targets)
    return s.layers * per_layer


def _oft_inputs(s: Shape) -> int:
    """The summed input widths of one decoder layer's linear layers (OFT rotates each input)."""
    return sum(i for _, i, _ in _linear_shapes(s))


def _oft_params(s: Shape, config) -> int:
    """OFT trains, per linear layer, one skew-symmetric block of size b per b input
    dimensions: in x (b - 1) / 2 parameters (PEFT rounds b to a divisor of the width)."""
    return s.layers * sum(i * (min(config.oft_block_size, i) - 1) // 2
                          for _, i, _ in _linear_shapes(s))


def _reward_model_params(s: Shape) -> int:
    """A sequence classifier of this shape: no language-model head, a one-output score."""
    total, _ = count_params(s)
    return total - (0 if s.tied else s.vocab * s.hidden) + s.hidden


def trainable_params(s: Shape, config) -> int:
    total, linear = count_params(s)
    head = s.hidden if config.stage == "rm" else 0  # rm always trains its score head
    if config.method in ("lora", "qlora", "dora"):
        return _lora_params(s, config) + head
    if config.method == "oft":
        return _oft_params(s, config) + head
    if config.method == "freeze":
        per_layer = (total - s.vocab * s.hidden * (1 if s.tied else 2)) / s.layers
        return int(per_layer * min(config.freeze_layers, s.layers)) + head
    return _reward_model_params(s) if config.stage == "rm" else total


# --- bytes --------------------------------------------------------------------------

def _precision(config, dev) -> str:
    """What core.models.compute_dtype would pick, decided without torch."""
    if config.compute_type != "auto":
        return config.compute_type
    if dev.kind == "cuda":
        return "bf16" if dev.bf16 else "fp16"
    return "fp32"


def _weights_bytes(s: Shape, config, precision: str) -> float:
    total, linear = count_params(s)
    # tunebench keeps fp32 master weights under mixed precision; pure_bf16 loads bf16.
    dense = 2.0 if precision == "pure_bf16" else 4.0
    if config.method == "qlora":
        # nf4 with double quantization: ~0.53 bytes a weight; int8: 1 byte plus scales.
        quant = 0.53 if config.quant_bits == 4 else 1.05
        return linear * quant + (total - linear) * dense
    return total * dense


def _activation_bytes(s: Shape, config, precision: str, tokens: int,
                      vocab: int | None = None) -> float:
    """Tensors kept for backward by one decoder layer, per token, times layers and tokens.

    Per layer: two RMSNorms (input and normalized output, 2h each), q/k/v and the
    rotated q/k, the attention output and the o_proj input, four MLP-wide tensors
    (gate, up, silu(gate), their product). Eager attention also keeps the
    probabilities (heads x sequence per token). LoRA adds its r-wide inner tensors.
    Gradient checkpointing keeps only each layer's input, plus one layer's full set
    while it is recomputed.
    """
    kv = s.kv_heads * s.head_dim
    q = s.heads * s.head_dim
    per_layer = 4 * s.hidden + 2 * q + 2 * kv + 2 * q + 4 * s.intermediate
    if config.booster == "eager":
        per_layer += 2 * s.heads * config.cutoff_len
    if config.method in ("lora", "qlora", "dora"):
        per_layer += 7 * config.lora_rank
    rotations = 0.0
    if config.method == "oft":
        per_layer += _oft_inputs(s)  # each linear layer keeps its rotated input
        # Per step, not per token: each layer's block rotations and the Cayley-Neumann
        # powers that build them (about 5 in x b matrices per linear layer, fp32).
        rotations = s.layers * _oft_inputs(s) * config.oft_block_size * 5 * 4.0
    width = 2.0 if precision in ("bf16", "fp16", "pure_bf16") else 4.0
    if config.gradient_checkpointing:
        kept = s.layers * s.hidden + per_layer
    else:
        kept = s.layers * per_layer
    # The embedding output and final norm, and while backward runs, one layer's gradients.
    kept += 4 * s.hidden + per_layer
    # TRL's LM head scores up to 32,768 positions at a time: fp32 logits plus one
    # temporary of the same size exist at once (large for big vocabularies).
    # (A reward model scores with one output: `vocab` 1.)
    logits = min(tokens, LOGIT_CHUNK) * (s.vocab if vocab is None else vocab) * 4 * 2
    return kept * width * tokens + logits + rotations


def _gradient_and_state_bytes(trainable: int, config, precision: str) -> tuple[float, float]:
    grad = 2.0 if precision == "pure_bf16" else 4.0
    state = OPTIMIZER_BYTES.get(config.optim, 8.0)
    if precision == "pure_bf16" and config.optim in ("adamw_torch", "paged_adamw_32bit"):
        state = 4.0  # moments follow the bf16 parameters
    return trainable * grad, trainable * state


def estimate(config, info: dict | None = None, dev=None,
             reward_info: dict | None = None) -> Estimate | None:
    """The memory `config` needs on `dev` (default: this machine); None if the shape is unknown.
    `reward_info` is grpo's reward model's config.json (default: read from reward_model)."""
    s = shape_of(model_info(config.model) if info is None else info)
    if s is None:
        return None
    dev = dev or device_mod.detect()
    precision = _precision(config, dev)
    total, _ = count_params(s)
    trainable = trainable_params(s, config)
    weights = _weights_bytes(s, config, precision)
    if config.stage == "rm":  # no language-model head to hold
        weights -= (total - _reward_model_params(s)) * (2.0 if precision == "pure_bf16" else 4.0)
        total = _reward_model_params(s)
    grads, state = _gradient_and_state_bytes(trainable, config, precision)
    sequences, length = _sequences(config)
    tokens = config.batch_size * sequences * length
    acts = _activation_bytes(s, config, precision, tokens, 1 if config.stage == "rm" else None)
    runtime = CUDA_CONTEXT_GB if dev.kind == "cuda" else CPU_RUNTIME_GB
    extra = _stage_parts(s, config, precision, dev, reward_info)
    parts = [weights / GB, grads / GB, state / GB, acts * FRAGMENTATION / GB]
    stage = [extra["reference"] / GB, extra["generation"] / GB, extra["reward"] / GB]
    return Estimate(total, trainable, *(round(p, 3) for p in parts), runtime,
                    round(sum(parts) + sum(stage) + runtime, 2),
                    "GPU" if dev.kind == "cuda" else "RAM", *(round(p, 3) for p in stage),
                    sequences, tuple(extra["notes"]))


# --- what each stage adds ------------------------------------------------------------------

def _sequences(config) -> tuple[int, int]:
    """(sequences kept for backward per example, tokens in each) for the stage.

    dpo and rm put chosen and rejected through the model together. kto's KL sequence is
    scored without gradients, before the policy's pass, so only the completion is kept.
    grpo trains on its sampled replies: prompt + completion tokens.
    """
    if config.stage in ("dpo", "rm"):
        return 2, config.cutoff_len
    if config.stage == "grpo":
        return 1, _grpo_prompt(config) + config.max_completion_length
    return 1, config.cutoff_len


def _grpo_prompt(config) -> int:
    return min(config.cutoff_len // 2, GRPO_PROMPT_CAP)


def _reference(config) -> str:
    """How the stage's frozen reference policy is held: 'none' (no reference: sft, pt, rm,
    orpo/simpo, grpo with pref_beta 0), 'adapter off' (an adapter method: the base with
    the adapter switched off), 'precomputed' (its log-probabilities computed once before
    training, as core/stages.py asks TRL for dpo and kto: no copy is kept) or 'copy' (a
    second, frozen copy of the weights: no gradients, no optimizer state)."""
    from . import stages
    from .config import ADAPTER_METHODS

    if not stages.uses_reference(config):
        return "none"
    if config.method in ADAPTER_METHODS:
        return "adapter off"
    if stages.stage_args(config).get("precompute_ref_log_probs"):
        return "precomputed"
    return "copy"


def _stage_parts(s: Shape, config, precision: str, dev, reward_info: dict | None) -> dict:
    """Bytes of the reference copy, grpo's generation cache and its reward model, and notes."""
    out = {"reference": 0.0, "generation": 0.0, "reward": 0.0, "notes": []}
    reference = _reference(config)
    if reference == "copy":  # in the policy's dtype, as TRL builds it
        total, _ = count_params(s)
        out["reference"] = total * (2.0 if precision == "pure_bf16" else 4.0)
    elif reference == "precomputed":
        out["notes"].append(msg("config.memory.note.precomputed"))
    if config.stage != "grpo":
        return out
    width = 2.0 if precision in ("bf16", "fp16", "pure_bf16") else 4.0
    length = _grpo_prompt(config) + config.max_completion_length
    kv = 2 * s.layers * s.kv_heads * s.head_dim * width * config.batch_size * length
    out["generation"] = kv + config.batch_size * s.vocab * 4 * 2  # plus each step's logits
    if config.reward_model:
        size = reward_model_bytes(config.reward_model, dev, reward_info)
        if size is None:
            out["notes"].append(msg("config.memory.note.reward_unknown"))
        else:
            out["reward"] = size
    return out


def reward_model_bytes(reward_model: str, dev, info: dict | None = None) -> float | None:
    """The weights of a reward model at the dtype it scores in (what models.pick_dtype
    'auto' picks: half precision on a GPU, fp32 on a CPU unless stored in bf16). An rm
    adapter folder is sized by its base model (adapter_config.json). None if unknown."""
    if info is None:
        info = model_info(reward_model)
        if not info:
            adapter = Path(reward_model).expanduser() / "adapter_config.json"
            try:
                base = json.loads(adapter.read_text(encoding="utf-8"))["base_model_name_or_path"]
            except (OSError, ValueError, KeyError, TypeError):
                return None
            info = model_info(str(base)) if base else {}
    s = shape_of(info)
    if s is None:
        return None
    stored = str(info.get("dtype") or info.get("torch_dtype") or "")
    width = 2.0 if dev.kind == "cuda" or stored == "bfloat16" else 4.0
    return _reward_model_params(s) * width


def fits(est: Estimate, dev=None) -> str | None:
    """A warning when `est` will not fit in the device's memory; None when it fits."""
    dev = dev or device_mod.detect()
    room = dev.memory_gb
    if est.total_gb <= room * 0.9:
        return None
    what = t("config.memory.gpu_named", name=dev.name, gb=f"{room:.0f}") if dev.kind == "cuda" \
        else t("config.memory.ram_here", gb=f"{room:.0f}")
    return t("config.memory.too_small" if est.total_gb > room else "config.memory.nearly_full",
             total=f"{est.total_gb:.1f}", what=what)


def describe(config, dev=None) -> str:
    """One line for the Train tab: the estimate, its largest parts, and whether it fits."""
    dev = dev or device_mod.detect()
    est = estimate(config, dev=dev)
    if est is None:
        return t("config.memory.unavailable")
    text = t("config.memory.estimate", total=f"{est.total_gb:.1f}", breakdown=est.breakdown(),
             params=f"{est.params / 1e6:,.1f}", trainable=f"{est.trainable / 1e6:,.2f}")
    warning = fits(est, dev)
    if warning:
        return t("config.memory.warning", text=text, warning=warning)
    where = t("config.memory.gpu_memory" if dev.kind == "cuda" else "config.memory.ram",
              gb=f"{dev.memory_gb:.0f}")
    return t("config.memory.fits", text=text, where=where)


# --- running out ------------------------------------------------------------------------

def is_out_of_memory(err: BaseException) -> bool:
    """torch's OutOfMemoryError, a MemoryError, or a RuntimeError in which torch's CPU
    allocator or safetensors' mmap says memory ran out."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        sign in text for sign in ("out of memory", "can't allocate memory",
                                  "cannot allocate memory"))


# --- a hard cap for this process -------------------------------------------------------

def cap_from_env(variable: str, preload: tuple[str, ...]) -> int | None:
    """Cap this process's address space at what it holds now plus $`variable` MB.

    The trainer (TUNEBENCH_TRAIN_MEMORY_MB) and the chat worker (TUNEBENCH_CHAT_MEMORY_MB)
    use it so that a job too big for the machine fails with a clear "out of memory"
    instead of the system's OOM killer picking a victim, perhaps the web server. The
    modules in `preload` are imported first, so that their code is not counted and no
    later import is refused. CPU only: CUDA reserves far more address space than it uses.
    Returns the limit in bytes, or None when there is none.
    """
    megabytes = os.environ.get(variable, "").strip()
    if not megabytes:
        return None
    import importlib
    import resource

    import psutil
    import torch

    if torch.cuda.is_available():
        print(t("config.memory.cap_ignored", variable=variable), flush=True)
        return None
    for module in preload:
        importlib.import_module(module)
    # Start torch's worker threads now: their stacks are address space too, and a thread
    # that cannot start under the cap aborts the process instead of raising an error.
    torch.ones(256, 256) @ torch.ones(256, 256)
    limit = psutil.Process().memory_info().vms + int(megabytes) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    return limit
