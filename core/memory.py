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

GB = 1024**3
CPU_RUNTIME_GB = 0.75       # RSS of a training process before the model: torch, transformers, TRL
CUDA_CONTEXT_GB = 0.6       # the CUDA context and kernels, on the GPU itself
FRAGMENTATION = 1.10        # allocator slack on top of live tensors
# Optimizer state, bytes per trainable parameter (fp32 moments unless noted).
OPTIMIZER_BYTES = {"adamw_torch": 8.0, "adamw_8bit": 2.0, "paged_adamw_8bit": 2.0,
                   "paged_adamw_32bit": 8.0, "adafactor": 0.2, "sgd": 0.0}
LOGIT_CHUNK = 32768         # positions TRL's fused LM head scores per chunk
LORA_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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

    def breakdown(self) -> str:
        return (f"weights {self.weights_gb:.1f}, gradients {self.gradients_gb:.1f}, optimizer "
                f"{self.optimizer_gb:.1f}, activations {self.activations_gb:.1f}, runtime "
                f"{self.runtime_gb:.1f}")


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


def trainable_params(s: Shape, config) -> int:
    total, linear = count_params(s)
    if config.method in ("lora", "qlora", "dora"):
        return _lora_params(s, config)
    if config.method == "oft":
        return _oft_params(s, config)
    if config.method == "freeze":
        per_layer = (total - s.vocab * s.hidden * (1 if s.tied else 2)) / s.layers
        return int(per_layer * min(config.freeze_layers, s.layers))
    return total


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


def _activation_bytes(s: Shape, config, precision: str, tokens: int) -> float:
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
    logits = min(tokens, LOGIT_CHUNK) * s.vocab * 4 * 2
    return kept * width * tokens + logits + rotations


def _gradient_and_state_bytes(trainable: int, config, precision: str) -> tuple[float, float]:
    grad = 2.0 if precision == "pure_bf16" else 4.0
    state = OPTIMIZER_BYTES.get(config.optim, 8.0)
    if precision == "pure_bf16" and config.optim in ("adamw_torch", "paged_adamw_32bit"):
        state = 4.0  # moments follow the bf16 parameters
    return trainable * grad, trainable * state


def estimate(config, info: dict | None = None, dev=None) -> Estimate | None:
    """The memory `config` needs on `dev` (default: this machine); None if the shape is unknown."""
    s = shape_of(model_info(config.model) if info is None else info)
    if s is None:
        return None
    dev = dev or device_mod.detect()
    precision = _precision(config, dev)
    total, _ = count_params(s)
    trainable = trainable_params(s, config)
    weights = _weights_bytes(s, config, precision)
    grads, state = _gradient_and_state_bytes(trainable, config, precision)
    tokens = config.batch_size * config.cutoff_len
    acts = _activation_bytes(s, config, precision, tokens)
    runtime = CUDA_CONTEXT_GB if dev.kind == "cuda" else CPU_RUNTIME_GB
    parts = [weights / GB, grads / GB, state / GB, acts * FRAGMENTATION / GB]
    return Estimate(total, trainable, *(round(p, 3) for p in parts), runtime,
                    round(sum(parts) + runtime, 2), "GPU" if dev.kind == "cuda" else "RAM")


def fits(est: Estimate, dev=None) -> str | None:
    """A warning when `est` will not fit in the device's memory; None when it fits."""
    dev = dev or device_mod.detect()
    room = dev.memory_gb
    if est.total_gb <= room * 0.9:
        return None
    what = f"{dev.name} ({room:.0f} GB)" if dev.kind == "cuda" else f"this machine's {room:.0f} GB RAM"
    return (f"needs about {est.total_gb:.1f} GB but {what} is {'too small' if est.total_gb > room else 'nearly full'}"
            ": lower batch_size or cutoff_len, turn on gradient_checkpointing, or use qlora")


def describe(config, dev=None) -> str:
    """One line for the Train tab: the estimate, its largest parts, and whether it fits."""
    dev = dev or device_mod.detect()
    est = estimate(config, dev=dev)
    if est is None:
        return "memory estimate unavailable: the model's config.json is not on this machine"
    text = (f"≈ {est.total_gb:.1f} GB needed ({est.breakdown()}) for "
            f"{est.params / 1e6:,.1f}M parameters, {est.trainable / 1e6:,.2f}M trainable")
    warning = fits(est, dev)
    if warning:
        return f"{text} — warning: {warning}"
    where = f"{dev.memory_gb:.0f} GB GPU memory" if dev.kind == "cuda" else \
        f"{dev.memory_gb:.0f} GB RAM"
    return f"{text} — fits in {where}"


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
        print(f"warning: {variable} is ignored on a GPU machine", flush=True)
        return None
    for module in preload:
        importlib.import_module(module)
    # Start torch's worker threads now: their stacks are address space too, and a thread
    # that cannot start under the cap aborts the process instead of raising an error.
    torch.ones(256, 256) @ torch.ones(256, 256)
    limit = psutil.Process().memory_info().vms + int(megabytes) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    return limit
