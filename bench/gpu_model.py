"""The GPU benchmark's model: a ~270M-parameter Qwen2 built from a config, and MFU inputs.

Random weights are fine for throughput: speed depends on the shapes, not the
values. It borrows the demo model's tokenizer so both tools read the same tokens.
"""

from __future__ import annotations

import shutil
from pathlib import Path

SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
             num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
             tie_word_embeddings=True)
# Dense bf16 tensor-core peak, FLOP/s, from the vendors' data sheets (SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10": 125e12, "RTX 4090": 165e12, "V100": 125e12}


def build_gpu_model(folder: Path, shape: dict | None = None) -> Path:
    """Random Qwen2 weights of `shape` (default SHAPE) and the demo tokenizer in `folder`."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from core.models import resolve_model

    if (folder / "config.json").exists():
        return folder
    demo = Path(resolve_model("demo"))
    tokenizer = AutoTokenizer.from_pretrained(demo)
    config = Qwen2Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         **(shape or SHAPE))
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for extra in ("chat_template.jinja",):
        if (demo / extra).exists() and not (folder / extra).exists():
            shutil.copy(demo / extra, folder / extra)
    return folder


def gpu_facts(model: str) -> dict:
    """Model FLOPs per trained token by method, and this GPU's peak, for MFU.

    Per token: 6N for full tuning (forward 2N, backward 4N), 4N for LoRA (the
    frozen weights need no weight gradients), with N the weights used in matrix
    products (decoder linears plus the LM head). Attention scores are left out:
    at these sequence lengths they are a few percent and depend on each batch.
    """
    import json

    import torch

    from core import memory

    info = json.loads((Path(model) / "config.json").read_text())
    shape = memory.shape_of(info)
    _, linear = memory.count_params(shape)
    n = linear + shape.vocab * shape.hidden
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return {"gpu": name, "peak_flops": peak, "matmul_params": n,
            "flops_per_token": {"full": 6 * n, "lora": 4 * n}}
