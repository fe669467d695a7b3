"""Padding-free SDPA (core/attention.py) must give the same loss AND the same gradients as
an ordinary padded batch: the examples share one row but never attend to each other."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core import attention

TEXTS = ("Hello there, how are you today?", "Short one.", "A third example, of middle length.")


def _loss_and_grad_norm(path, impl: str, padding_free: bool):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager" if impl ==
                                                 "eager" else "sdpa", dtype=torch.float32)
    if impl == attention.VARLEN:
        attention.register()
        model.set_attn_implementation(attention.VARLEN)
    tok = AutoTokenizer.from_pretrained(path)
    seqs = [tok(t)["input_ids"] for t in TEXTS]
    if padding_free:
        ids = torch.tensor([sum(seqs, [])])
        pos = torch.tensor([[i for s in seqs for i in range(len(s))]])
        labels = ids.clone()
        labels[pos == 0] = -100  # a first token has nothing before it to predict it from
        logits = model(input_ids=ids, position_ids=pos).logits[0]
        shifted, targets = logits[:-1], labels[0, 1:]
    else:
        width = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        labels = ids.masked_fill(mask == 0, -100)
        logits = model(input_ids=ids, attention_mask=mask).logits
        shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
        targets = labels[:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(shifted, targets, ignore_index=-100, reduction="sum")
    loss.backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None))
    return loss.item(), norm.item()


def test_padding_free_sdpa_matches_padded_loss_and_gradients(demo_model_path):
    padded = _loss_and_grad_norm(demo_model_path, "eager", padding_free=False)
    free = _loss_and_grad_norm(demo_model_path, attention.VARLEN, padding_free=True)
    assert free[0] == pytest.approx(padded[0], rel=1e-5)
    assert free[1] == pytest.approx(padded[1], rel=1e-4)
