"""Loading models and tokenizers, and preparing them for a tuning method.

Each method maps to what the ecosystem already provides: PEFT for LoRA, DoRA
and QLoRA adapters, bitsandbytes for the quantized base, plain parameter
freezing for full and freeze tuning.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import DEMO_MODEL, LORA_FAMILY, TrainConfig
from . import paths
from .errors import BadInput
from .templates import apply_template

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def resolve_model(name: str) -> str:
    """'demo' -> the embedded demo model's folder (built on first use); else unchanged."""
    if name == DEMO_MODEL:
        from .demo_model import ensure_demo_model
        return str(ensure_demo_model())
    return name


def check_model_source(name: str) -> str:
    """Resolve and check a model reference before anything heavy is loaded."""
    path = resolve_model(paths.guard_model(name))  # confined jobs: inside the allowed roots
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise BadInput("not a model folder: config.json is missing", file=str(local))
        if not any((local / f).is_file() for f in WEIGHT_FILES) and not (
                local / "adapter_config.json").is_file():
            raise BadInput("the model folder has no safetensors weights (model.safetensors or "
                           "model.safetensors.index.json); tunebench never loads pickled .bin "
                           "weights", file=str(local))
        return str(local)
    # Hub ids look like "name" or "org/name"; anything else was meant as a folder.
    looks_like_path = path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_like_path or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise BadInput("model folder not found (and hub ids need a network connection)",
                       file=path, field="model")
    return path  # a hub id, e.g. Qwen/Qwen2.5-0.5B-Instruct, for online machines


def load_tokenizer(model: str, template: str = "auto", trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = check_model_source(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise BadInput(f"cannot load the tokenizer: {err}".splitlines()[0], file=source) from None
    apply_template(tokenizer, template, model=source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def compute_dtype(compute_type: str):
    """The training precision for `compute_type` on this machine, as (dtype, mixed)."""
    import torch

    on_gpu = torch.cuda.is_available()
    if compute_type == "auto":
        if on_gpu and torch.cuda.is_bf16_supported():
            compute_type = "bf16"
        else:
            compute_type = "fp16" if on_gpu else "fp32"
    return compute_type


def pick_attention(booster: str) -> str:
    """The attention implementation for `booster`; config.validate already rejected missing ones.

    load_base_model may then move SDPA to its padding-free form (core/attention.py).
    """
    from .attention import resolve

    return resolve(booster)


def _quantization(config: TrainConfig):
    import torch
    from transformers import BitsAndBytesConfig

    if config.quant_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if compute_dtype(config.compute_type) in ("bf16", "pure_bf16") \
        else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)


def load_base_model(config: TrainConfig, attention: str):
    import torch
    from transformers import AutoModelForCausalLM

    source = check_model_source(config.model)
    kind = compute_dtype(config.compute_type)
    # Mixed precision keeps fp32 master weights; pure_bf16 (and fp16 on GPU for QLoRA) does not.
    dtype = torch.bfloat16 if kind == "pure_bf16" else torch.float32
    kwargs = dict(dtype=dtype, attn_implementation=attention,
                  trust_remote_code=config.trust_remote_code, use_safetensors=True)
    if config.method == "qlora":
        kwargs["quantization_config"] = _quantization(config)
    if config.rope_scaling != "none":
        kwargs["config"] = _rope_scaled_config(source, config)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise BadInput(f"cannot load the model: {str(err).splitlines()[0]}", file=source) from None
    from .attention import apply_booster

    return apply_booster(model, config.booster)


def _rope_scaled_config(source: str, config: TrainConfig):
    """The model's config with RoPE scaling set (transformers 5 reads `rope_parameters`).

    The context grows `rope_factor` times: max_position_embeddings is raised to
    match, and yarn/llama3 remember the original length they scale from.
    """
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(source, trust_remote_code=config.trust_remote_code)
    text = model_config.get_text_config()
    old = dict(getattr(text, "rope_parameters", None) or {})
    if not old or any(isinstance(v, dict) for v in old.values()):
        raise BadInput("rope_scaling: this model has no single RoPE setting to scale (it uses "
                       "none, or one per layer type)", file=source, field="rope_scaling")
    original = int(text.max_position_embeddings)
    params = {"rope_type": config.rope_scaling, "factor": float(config.rope_factor),
              "rope_theta": old.get("rope_theta", getattr(text, "rope_theta", 10000.0))}
    if config.rope_scaling in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = original
    if config.rope_scaling == "llama3":
        params.update(low_freq_factor=1.0, high_freq_factor=4.0)  # Llama 3.1's published values
    if "partial_rotary_factor" in old:
        params["partial_rotary_factor"] = old["partial_rotary_factor"]
    text.rope_parameters = params
    text.max_position_embeddings = int(original * config.rope_factor)
    print(f"RoPE scaling: {config.rope_scaling} x{config.rope_factor:g}, context "
          f"{original} -> {text.max_position_embeddings} positions", flush=True)
    return model_config


def apply_method(model, config: TrainConfig):
    """Make only the parameters of the chosen method trainable."""
    if config.method in LORA_FAMILY:
        return _add_adapter(model, config)
    if config.method == "freeze":
        _train_last_layers(model, config.freeze_layers)
    return model  # full: everything stays trainable


def _add_adapter(model, config: TrainConfig):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing)
    target = "all-linear" if config.lora_target == "all-linear" else [
        t.strip() for t in config.lora_target.split(",")]
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=target,
                      use_dora=config.method == "dora", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as err:
        raise BadInput(str(err).splitlines()[0], field="lora_target") from None


def _decoder_layers(model):
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if layers is not None and hasattr(layers, "__len__") and len(layers) > 0:
            return layers
    raise BadInput("freeze tuning could not find the model's decoder layers", field="method")


def _train_last_layers(model, n: int) -> None:
    layers = _decoder_layers(model)
    if n > len(layers):
        raise BadInput(f"freeze_layers is {n} but the model has only {len(layers)} layers",
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


def pick_cpu_threads(n_params: int) -> None:
    """Train small models on one CPU thread, unless OpenMP threads sleep when idle.

    Measured on a 2-core machine with the 3.5M-parameter demo model: 1 thread ran
    at ~3,500 tokens/s, 2 threads at ~1,100 whenever another process used a core
    (the threads spin waiting for each other). With OMP_WAIT_POLICY=PASSIVE, which
    `tunebench train` sets before torch loads, 2 threads ran at ~5,200 tokens/s on
    free cores and ~2,900 (as fast as one) on a busy machine, so they keep torch's
    default. Bigger models always do. An explicit OMP_NUM_THREADS always wins.
    """
    import torch

    if torch.cuda.is_available() or os.environ.get("OMP_NUM_THREADS"):
        return
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        return
    if n_params < SMALL_MODEL_PARAMS:
        torch.set_num_threads(1)


SMALL_MODEL_PARAMS = 50_000_000
