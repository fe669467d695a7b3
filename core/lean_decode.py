"""The serving engine's forward for llama-family models (llama, qwen2, mistral).

Why by hand: on a small model a serving step is mostly per-op overhead and small matmuls,
not arithmetic. transformers' forward builds a 4D mask, calls about ten modules per layer
and runs each LoRA layer as three more ops, and joining rows need a forward of their own.
Here one forward serves a whole scheduler step: the running rows' next tokens and the
joining rows' prompts go through each projection together; each layer is one q|k|v and
one gate|up matmul, with weights stored the way MKL multiplies fastest (they replace the
originals, so memory does not grow); the served adapters' stacked A and B are fused the
same way; and the mask is the batch's own padding mask.

Anything this does not know (sliding windows, other attention kernels, norms on q/k, an
activation other than silu, DoRA) makes `supported` false or leaves the engine without a
stack, and the engine keeps transformers' forward. tests/test_lean_decode.py pins tokens
and logits to transformers'.
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
    projection as one flat [tokens, hidden] matrix, so joining rows cost no separate
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
                lengths: list[int], prefixes: list | None = None):
        """Logits [running + len(lengths), vocab]: one per running row, then one per new
        prompt (its last token's), and the prompts' keys and values per layer
        ([1, kv_heads, tokens, head_dim] each, whole prompts end to end; [] without prompts).

        `ids`, `positions`: the running rows' tokens, then the prompts' tokens to compute,
        end to end (`lengths` of them per prompt); `mask`: [running, length] with 1 for the
        running rows' real tokens, this step's included; `cache`: their KV cache, which
        gets this step's keys and values; `prefixes`: per prompt, None or the keys and
        values of the tokens before the computed ones (core/prefix_cache.py), per layer
        ([kv_heads, tokens, head_dim] each)."""
        x = F.embedding(torch.tensor(ids, device=self.embed.device), self.embed)
        cos, sin = self.rotary(x, torch.tensor([positions], device=x.device))
        step = _Step(running, mask, cache, lengths, x.device, prefixes)
        mask = self.stack.mask if self.stack is not None else None
        lora = {k: mask[0].repeat(1, k) for k in (1, 2, 3)} if mask is not None else None
        for i, layer in enumerate(self.layers):
            x = layer(x, cos[0], sin[0], step, i, lora)
        ends = torch.tensor(lengths, dtype=torch.long, device=x.device).cumsum(0) - 1 + running
        picks = torch.cat([torch.arange(running, device=x.device), ends])
        return F.linear(_rms(x[picks], self.norm), self.head), step.prompt_kv


class _Step:
    """What every layer of one forward needs to split attention."""

    def __init__(self, running: int, mask, cache, lengths: list[int], device,
                 prefixes: list | None = None):
        self.running, self.cache, self.lengths = running, cache, lengths
        self.allowed = mask.bool()[:, None, None, :] if running else None
        self.prefixes = prefixes if prefixes and any(p is not None for p in prefixes) else None
        cached = [0 if p is None else p[0][0].shape[1] for p in self.prefixes or []] or None
        self.block = block_causal(lengths, device, cached) if lengths else None
        self.prompt_kv: list[tuple] = []

    def whole_prompts(self, index: int, keys, values) -> tuple:
        """The computed tokens' keys and values [1, kv_heads, T, d] with each prompt's cached
        prefix put back before its part: whole prompts end to end."""
        parts_k, parts_v = [], []
        for prefix, k, v in zip(self.prefixes, keys[0].split(self.lengths, dim=1),
                                values[0].split(self.lengths, dim=1)):
            if prefix is not None:
                parts_k.append(prefix[index][0])
                parts_v.append(prefix[index][1])
            parts_k.append(k)
            parts_v.append(v)
        return torch.cat(parts_k, dim=1)[None], torch.cat(parts_v, dim=1)[None]


def block_causal(lengths: list[int], device=None, cached: list[int] | None = None):
    """[1, 1, T, T + C]: each prompt's tokens see that prompt's earlier tokens only (prompts
    packed end to end; the serving engine's packed prefill uses it too). With `cached`
    (tokens of each prompt that come from the prefix cache, keys only), a prompt's
    `lengths` computed tokens also see all of its cached ones."""
    cached = cached or [0] * len(lengths)
    whole = [c + n for c, n in zip(cached, lengths)]
    prompts = torch.arange(len(lengths), device=device)
    query_prompt = torch.repeat_interleave(prompts, torch.tensor(lengths, device=device))
    key_prompt = torch.repeat_interleave(prompts, torch.tensor(whole, device=device))
    query_at = torch.cat([torch.arange(c, w, device=device) for c, w in zip(cached, whole)])
    key_at = torch.cat([torch.arange(w, device=device) for w in whole])
    return ((query_prompt[:, None] == key_prompt[None, :])
            & (key_at[None, :] <= query_at[:, None]))[None, None]


class _Layer:
    """One decoder layer's weights, fused, and its forward."""

    def __init__(self, layer, weights: dict, lean: LeanDecoder, stack):
        attn, mlp = layer.self_attn, layer.mlp
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.lean = lean
        self.qkv, self.qkv_bias = weights["qkv"]                 # [in, out]: see fuse_base
        self.splits = [_base(p).out_features for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        self.gate_up, self.gate_up_bias = weights["gate_up"]
        self.o, self.o_bias = weights["o"]
        self.down, self.down_bias = weights["down"]
        self.scaling = attn.scaling
        lora = (lambda *mods: stack.fused(mods)) if stack is not None else (lambda *m: None)
        self.qkv_lora = lora(attn.q_proj, attn.k_proj, attn.v_proj)
        self.gate_up_lora = lora(mlp.gate_proj, mlp.up_proj)
        self.o_lora, self.down_lora = lora(attn.o_proj), lora(mlp.down_proj)

    def __call__(self, x, cos, sin, step: _Step, index: int, lora_mask):
        """x: [tokens, hidden] -> the same after this layer."""
        d = self.lean.head_dim
        h = _rms(x, self.norm1)
        qkv = _project(h, self.qkv, self.qkv_bias, self.qkv_lora, lora_mask)
        tokens, q_heads = qkv.shape[0], self.lean.heads
        # q and k side by side get their rotary embedding as one tensor: half the ops
        qk, v = (t.reshape(tokens, -1, d).transpose(0, 1)       # [heads, tokens, d]
                 for t in qkv.split([self.splits[0] + self.splits[1], self.splits[2]], dim=-1))
        qk = _rope(qk, cos, sin)
        q, k = qk[:q_heads], qk[q_heads:]
        out = self._attend(q, k, v, step, index)
        x = x + _project(out, self.o, self.o_bias, self.o_lora, lora_mask)
        h = _rms(x, self.norm2)
        gate, up = _project(h, self.gate_up, self.gate_up_bias, self.gate_up_lora,
                            lora_mask).chunk(2, dim=-1)
        return x + _project(F.silu(gate) * up, self.down, self.down_bias, self.down_lora,
                            lora_mask)

    def _attend(self, q, k, v, step: _Step, index: int):
        """[tokens, heads * d]: running rows against their cache, prompts alone."""
        gqa, n, parts = self.lean.kv_heads != self.lean.heads, step.running, []
        if n:  # token i of the flat pass is running row i: [rows, heads, 1, d]
            rows = [t[:, :n].transpose(0, 1)[:, :, None] for t in (q, k, v)]
            keys, values = step.cache.layers[index].update(rows[1], rows[2])
            out = F.scaled_dot_product_attention(rows[0], keys, values, attn_mask=step.allowed,
                                                 scale=self.scaling, enable_gqa=gqa)
            parts.append(out[:, :, 0].reshape(n, -1))
        if step.lengths:
            kp, vp = k[None, :, n:], v[None, :, n:]                 # [1, heads, T, d]
            if step.prefixes is not None:
                kp, vp = step.whole_prompts(index, kp, vp)
            step.prompt_kv.append((kp, vp))
            out = F.scaled_dot_product_attention(q[None, :, n:], kp, vp, attn_mask=step.block,
                                                 scale=self.scaling, enable_gqa=gqa)
            parts.append(out[0].transpose(0, 1).reshape(out.shape[2], -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _project(x, weight_t, bias, lora, lora_mask: dict | None):
    """x @ W (+ bias) with W stored [in, out], plus each token's own adapter: `lora` is
    (A, blocks, k) for k fused projections (multi_lora.StackedLora.fused), `lora_mask[k]`
    the per-token 0/1 columns repeated k times."""
    out = torch.addmm(bias, x, weight_t) if bias is not None else x @ weight_t
    if lora is None or lora_mask is None:
        return out
    a, blocks, k = lora
    h = (x @ a).mul_(lora_mask[k])
    for columns, outputs, b in blocks:
        out[:, outputs].addmm_(h[:, columns], b)
    return out


def _rms(x, norm):
    """The model's RMSNorm as one op: its module runs seven (the same numbers; pinned by
    tests/test_lean_decode.py against transformers' forward)."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _rope(t, cos, sin):
    """Rotary embedding of t [heads, tokens, d] with cos, sin [tokens, d]."""
    half = t.shape[-1] // 2
    rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return t * cos + rotated * sin


def fuse_base(model) -> list[dict]:
    """Each layer's weights as the lean step wants them, done once when the base loads
    (adapters come and go on top; the base never changes): q|k|v as one matrix, gate|up as
    one, and every matrix stored [in, out]. MKL multiplies a few rows by an [in, out]
    matrix about a third faster than by the [out, in] one nn.Linear keeps (measured here:
    1.0 ms against 1.55 ms for the demo model's 16 matrices at 8 rows). The modules' own
    weights become views of these, so the model keeps working and holds no second copy."""
    fused = []
    for layer in _inner(model).layers:
        attn, mlp = layer.self_attn, layer.mlp
        fused.append({"qkv": _fuse([_base(attn.q_proj), _base(attn.k_proj),
                                    _base(attn.v_proj)]),
                      "gate_up": _fuse([_base(mlp.gate_proj), _base(mlp.up_proj)]),
                      "o": _fuse([_base(attn.o_proj)]),
                      "down": _fuse([_base(mlp.down_proj)])})
    _own_the_rest(model, fused)
    return fused


def _own_the_rest(model, fused: list[dict]) -> None:
    """Copy the weights that were not fused (embeddings, norms) out of the checkpoint file.

    transformers maps safetensors files into memory and its tensors read from the mapping.
    Fusing reads every projection once, which makes those file pages resident, and the
    mapping stays (with them) while any tensor still points into it. On a 25M-parameter
    model that was 90 MB counted twice in the server's RSS; once nothing points into the
    file it is unmapped."""
    own = {t.untyped_storage().data_ptr() for layer in fused for pair in layer.values()
           for t in pair if t is not None}
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.untyped_storage().data_ptr() not in own:
            tensor.data = tensor.data.clone()


def _fuse(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One [in, sum of outs] weight for projections of the same input, and their bias;
    each module's weight becomes the [out, in] view of its columns."""
    weight = torch.cat([m.weight.detach().t() for m in linears], dim=1).contiguous()
    start = 0
    for m in linears:
        m.weight.data = weight[:, start:start + m.out_features].t()
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
    norms = (inner.norm, layer.input_layernorm, layer.post_attention_layernorm)
    # exactly nn.Linear: quantized layers (bitsandbytes) subclass it and keep their own weights
    return all(type(_base(p)) is torch.nn.Linear for p in parts[3:]) and \
        isinstance(inner.embed_tokens, torch.nn.Embedding) and \
        all(type(n).__name__.endswith("RMSNorm") and hasattr(n, "variance_epsilon")
            for n in norms)
