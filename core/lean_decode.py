"""A lean decode step for llama-family models (llama, qwen2, mistral): one token per row.

Why by hand: on a small model a decode step is mostly per-op overhead, not arithmetic.
transformers' forward builds a 4D mask, calls ~10 modules per layer and runs each LoRA
layer as its own three ops; on the demo model that is 5.2 ms for 8 rows, of which the
matmuls are under half. Here each layer is one fused q|k|v projection and one fused
gate|up projection (the fused weights replace the originals, so memory does not grow),
the served adapters' stacked A and B are fused the same way (one x@A, one mask, one @B
per projection), and the mask is the batch's own padding mask. Prefill (many tokens,
compute-bound) stays on transformers' forward; the KV cache is the same object for both.

Anything this does not know (sliding windows, other attention kernels, norms on q/k,
activation other than silu, DoRA) makes `build` return None and the engine keeps
transformers' forward. tests/test_lean_decode.py pins the logits to transformers'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FAMILIES = ("llama", "qwen2", "mistral")


class LeanDecoder:
    """One forward for a whole scheduler step, built once per set of served adapters
    (`stack`: multi_lora's StackedLora or None).

    A step feeds the running rows' next tokens and, in the same pass, the prompts of rows
    that join (vLLM's chunked prefill, whole prompts here): all tokens go through each
    projection as one flat [1, tokens, hidden] matrix, so joining rows cost no separate
    forward. Attention is the only part split: running rows attend to their KV cache
    rows, each new prompt to itself (a block-causal mask)."""

    def __init__(self, model, fused: list, stack=None):
        inner = _inner(model)
        config = model.config
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.head = _base(_head(model)).weight
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.stack = stack
        self.layers = [_Layer(layer, weights, self, stack)
                       for layer, weights in zip(inner.layers, fused)]

    def forward(self, ids: list[int], positions: list[int], running: int, mask, cache,
                lengths: list[int]):
        """Logits [running + len(lengths), vocab]: one per running row, then one per new
        prompt (its last token's), and the prompts' keys and values per layer
        ([1, kv_heads, sum(lengths), head_dim] each; [] without prompts).

        `ids`, `positions`: the running rows' tokens, then the prompts end to end;
        `mask`: [running, length] with 1 for the running rows' real tokens, this step's
        included; `cache`: their KV cache, which gets this step's keys and values."""
        ids_t = torch.tensor([ids], device=self.embed.device)
        x = F.embedding(ids_t, self.embed)
        cos, sin = self.rotary(x, torch.tensor([positions], device=x.device))
        step = _Step(running, mask, cache, lengths, x.device)
        mask = self.stack.mask if self.stack is not None else None
        lora = {k: mask.repeat(1, 1, k) for k in (1, 2, 3)} if mask is not None else None
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, step, i, lora)
        ends = torch.tensor(lengths, dtype=torch.long, device=x.device).cumsum(0) - 1 + running
        picks = torch.cat([torch.arange(running, device=x.device), ends])
        return F.linear(self.norm(x[0, picks]), self.head), step.prompt_kv


class _Step:
    """What every layer of one forward needs to split attention."""

    def __init__(self, running: int, mask, cache, lengths: list[int], device):
        self.running, self.cache, self.lengths = running, cache, lengths
        self.allowed = mask.bool()[:, None, None, :] if running else None
        self.block = _block_causal(lengths, device) if lengths else None
        self.prompt_kv: list[tuple] = []


def _block_causal(lengths: list[int], device):
    """[1, 1, T, T]: each prompt's tokens see that prompt's earlier tokens only."""
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                      torch.tensor(lengths, device=device))
    total = int(segment.numel())
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    return (causal & (segment[:, None] == segment[None, :]))[None, None]


class _Layer:
    """One decoder layer's weights, fused, and its forward."""

    def __init__(self, layer, weights: dict, lean: LeanDecoder, stack):
        attn, mlp = layer.self_attn, layer.mlp
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.lean = lean
        self.qkv, self.qkv_bias = weights["qkv"]
        self.splits = [_base(p).out_features for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        self.gate_up, self.gate_up_bias = weights["gate_up"]
        self.o, self.down = _base(attn.o_proj), _base(mlp.down_proj)
        self.scaling = attn.scaling
        lora = (lambda *mods: stack.fused(mods)) if stack is not None else (lambda *m: None)
        self.qkv_lora = lora(attn.q_proj, attn.k_proj, attn.v_proj)
        self.gate_up_lora = lora(mlp.gate_proj, mlp.up_proj)
        self.o_lora, self.down_lora = lora(attn.o_proj), lora(mlp.down_proj)

    def __call__(self, x, cos, sin, step: _Step, index: int, lora_mask):
        d = self.lean.head_dim
        h = self.norm1(x)
        qkv = _project(h, self.qkv, self.qkv_bias, self.qkv_lora, lora_mask)
        q, k, v = (t.view(1, t.shape[1], -1, d).transpose(1, 2)   # [1, heads, tokens, d]
                   for t in qkv.split(self.splits, dim=-1))
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        out = self._attend(q, k, v, step, index)
        x = x + _project(out, self.o.weight, self.o.bias, self.o_lora, lora_mask)
        h = self.norm2(x)
        gate, up = _project(h, self.gate_up, self.gate_up_bias, self.gate_up_lora,
                            lora_mask).chunk(2, dim=-1)
        return x + _project(F.silu(gate) * up, self.down.weight, self.down.bias,
                            self.down_lora, lora_mask)

    def _attend(self, q, k, v, step: _Step, index: int):
        """[1, tokens, heads * d]: running rows against their cache, prompts alone."""
        gqa, n, parts = self.lean.kv_heads != self.lean.heads, step.running, []
        if n:  # token i of the flat pass is running row i: [rows, heads, 1, d]
            rows = [t[0, :, :n].transpose(0, 1)[:, :, None] for t in (q, k, v)]
            keys, values = step.cache.layers[index].update(rows[1], rows[2])
            out = F.scaled_dot_product_attention(rows[0], keys, values, attn_mask=step.allowed,
                                                 scale=self.scaling, enable_gqa=gqa)
            parts.append(out[:, :, 0].reshape(1, n, -1))
        if step.lengths:
            kp, vp = k[:, :, n:], v[:, :, n:]
            step.prompt_kv.append((kp, vp))
            out = F.scaled_dot_product_attention(q[:, :, n:], kp, vp, attn_mask=step.block,
                                                 scale=self.scaling, enable_gqa=gqa)
            parts.append(out.transpose(1, 2).reshape(1, out.shape[2], -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _project(x, weight, bias, lora, lora_mask: dict | None):
    """x @ W (+ bias), plus each token's own adapter: `lora` is (A, B, k) for k fused
    projections, `lora_mask[k]` the per-token 0/1 columns repeated k times."""
    out = F.linear(x, weight, bias)
    if lora is None or lora_mask is None:
        return out
    a, b, k = lora
    return out.add_(((x @ a) * lora_mask[k]) @ b)


def _rope(t, cos, sin):
    cos, sin = cos[:, None], sin[:, None]
    half = t.shape[-1] // 2
    rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return t * cos + rotated * sin


def fuse_base(model) -> list[dict]:
    """Each layer's q|k|v and gate|up weights as one tensor each, done once when the base
    loads (adapters come and go on top; the base never changes)."""
    fused = []
    for layer in _inner(model).layers:
        attn, mlp = layer.self_attn, layer.mlp
        fused.append({"qkv": _fuse([_base(attn.q_proj), _base(attn.k_proj),
                                    _base(attn.v_proj)]),
                      "gate_up": _fuse([_base(mlp.gate_proj), _base(mlp.up_proj)])})
    return fused


def _fuse(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight for several projections of the same input. The modules' own weights
    become views into it, so the model keeps working and holds no second copy."""
    weight = torch.cat([m.weight.detach() for m in linears])
    start = 0
    for m in linears:
        m.weight.data = weight[start:start + m.out_features]
        start += m.out_features
    biases = [m.bias for m in linears]
    if all(b is None for b in biases):
        return weight, None
    bias = torch.cat([b.detach() if b is not None else weight.new_zeros(m.out_features)
                      for b, m in zip(biases, linears)])
    start = 0
    for m in linears:
        if m.bias is not None:
            m.bias.data = bias[start:start + m.out_features]
        start += m.out_features
    return weight, bias


def _base(module):
    """The plain nn.Linear under a PEFT LoRA layer (or the module itself)."""
    return getattr(module, "base_layer", module)


def _inner(model):
    """The decoder stack (embeddings, layers, norm, rotary) under any PEFT wrapping."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def _head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.lm_head


def supported(model) -> bool:
    """Whether `LeanDecoder` computes what transformers' forward computes for this model."""
    config = model.config
    if getattr(config, "model_type", None) not in FAMILIES:
        return False
    if getattr(config, "hidden_act", None) != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return False
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    try:
        inner = _inner(model)
        layer = inner.layers[0]
        parts = (inner.embed_tokens, inner.norm, inner.rotary_emb, layer.self_attn.q_proj,
                 layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                 layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
    except AttributeError:
        return False
    return all(isinstance(_base(p), torch.nn.Linear) for p in parts[3:]) and \
        isinstance(inner.embed_tokens, torch.nn.Embedding)
