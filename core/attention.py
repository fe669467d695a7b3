"""The `booster` setting: which attention kernel runs, padding-free batches, Liger kernels.

Padding-free batches put a batch's examples end to end in one row, with
position ids restarting at 0 for each example, so no compute goes to padding.
The attention must then keep the examples apart:

- flash_attention_2 has a variable-length kernel that reads the example
  boundaries (TRL's collator passes them as `cu_seq_lens_q/k`).
- SDPA has no such kernel. transformers does notice the restarting position ids
  and builds a block-diagonal mask, which is correct but costs memory and time
  quadratic in the whole row (8 rows of 512 tokens: a 4096 x 4096 mask, and
  attention over all of it). So we register `sdpa_varlen`: the same SDPA call,
  run once per example with a plain causal mask. Each example attends exactly to
  itself, no mask is ever built, and the work is the sum of each example's own
  attention. Anything that is not a padding-free row (a padded batch, a single
  sequence, generation with a cache) goes to transformers' own SDPA path.
- eager has neither; it stays on padded, length-grouped batches.
"""

from __future__ import annotations

import importlib.util

from .errors import BadInput
from .i18n import msg

VARLEN = "sdpa_varlen"
PADDING_FREE = ("flash_attention_2", VARLEN)
_registered = False


def resolve(booster: str) -> str:
    """The attention implementation to load the model with ('auto' picks the fastest available).

    Missing packages were already refused by config.validate, with what to install.
    """
    import torch

    if booster == "auto":
        if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        return "sdpa"
    if booster == "liger":
        return "sdpa"  # Liger replaces the norm, RoPE and MLP kernels; attention stays on SDPA
    return booster


def _segments(query, cu_seq_lens_q, position_ids) -> list[int] | None:
    """Example boundaries of a padding-free row, or None if this is not one."""
    if query.shape[0] != 1 or query.shape[2] < 2:
        return None
    if cu_seq_lens_q is not None:
        return [int(x) for x in cu_seq_lens_q.tolist()]
    if position_ids is None or position_ids.shape[-1] != query.shape[2]:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return None
    return starts + [query.shape[2]]


def sdpa_varlen(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                is_causal=None, cu_seq_lens_q=None, position_ids=None, **kwargs):
    """SDPA, once per example of a padding-free row; transformers' SDPA for everything else."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = None
    if attention_mask is None and key.shape[2] == query.shape[2]:
        bounds = _segments(query, cu_seq_lens_q, position_ids)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    parts = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                    None, dropout=dropout, scaling=scaling, is_causal=True)[0]
             for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return torch.cat(parts, dim=1), None


def _varlen_mask(*args, attention_mask=None, **kwargs):
    """No mask for padding-free rows (sdpa_varlen keeps examples apart); SDPA's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Make `sdpa_varlen` a valid attn_implementation in this process."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, sdpa_varlen)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)
    _registered = True


def varlen_ok(model_config) -> bool:
    """True if every layer is full causal attention that SDPA can run per example.

    Sliding-window layers and logit soft-capping are expressed through masks or
    kernels that a per-example causal SDPA would drop, so those models keep SDPA.
    """
    text = model_config.get_text_config()
    layer_types = getattr(text, "layer_types", None) or ["full_attention"]
    sliding = getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
    return (all(t == "full_attention" for t in layer_types) and not sliding
            and getattr(text, "attn_logit_softcapping", None) is None)


def apply_booster(model, booster: str):
    """After loading: switch SDPA to padding-free SDPA where it is safe, apply Liger kernels."""
    if booster == "liger":
        _apply_liger(model)
    if model.config._attn_implementation == "sdpa" and varlen_ok(model.config) \
            and model._can_set_attn_implementation():
        register()
        model.set_attn_implementation(VARLEN)
    return model


def _apply_liger(model) -> None:
    import torch

    if not torch.cuda.is_available():
        raise BadInput(msg("job.booster.liger_gpu"), field="booster")
    from transformers.integrations.liger import apply_liger_kernel

    # TRL computes the loss with its own chunked LM head, so Liger's fused linear
    # cross-entropy (which replaces the model's forward) stays off.
    apply_liger_kernel(model, {"fused_linear_cross_entropy": False})


def padding_free(model) -> bool:
    """Whether batches for `model` can be padding-free (examples end to end, no padding)."""
    return getattr(model.config, "_attn_implementation", None) in PADDING_FREE


def describe(model) -> str:
    """What the booster ended up as, for train.log and status.json."""
    impl = model.config._attn_implementation
    if impl == VARLEN:
        return "sdpa (padding-free, one call per example)"
    if impl == "flash_attention_2":
        return "flash_attention_2 (padding-free, variable-length kernel)"
    return f"{impl} (padded batches grouped by length)"
