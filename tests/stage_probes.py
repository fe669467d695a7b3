"""Measures of what a training stage changed, on rows the training never saw.

Used by tests/test_stages.py and bench/recommend.py. Each loads checkpoints with
tunebench's one loader and scores through core/templates, as training does.
"""

from __future__ import annotations

import torch

from core import models, rewards, templates


def reply_logprob(model, tokenizer, prompt: list[dict], reply: str) -> float:
    """Sum of log-probabilities of the reply's tokens (its end-of-turn included)."""
    prompt_ids, reply_ids = templates.encode_reply(prompt, reply, tokenizer, 10**6)
    ids = torch.tensor([prompt_ids + reply_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, -1)
    targets = ids[0, 1:]
    picked = logprobs.gather(-1, targets[:, None])[:, 0]
    return float(picked[len(prompt_ids) - 1:].sum())


def pair_margin(model, tokenizer, pairs: list[dict]) -> float:
    """Mean log-likelihood margin of chosen over rejected: what DPO and KTO should raise."""
    margins = [reply_logprob(model, tokenizer, p["prompt"], p["chosen"])
               - reply_logprob(model, tokenizer, p["prompt"], p["rejected"]) for p in pairs]
    return sum(margins) / len(margins)


def ranking_accuracy(reward_model: str, pairs: list[dict]) -> float:
    """Share of pairs a reward model scores chosen above rejected."""
    model, tokenizer = models.load_reward_model(reward_model)
    right = 0
    for p in pairs:
        chosen, rejected = models.score_replies(model, tokenizer, p["prompt"],
                                                [p["chosen"], p["rejected"]])
        right += chosen > rejected
    return right / len(pairs)


def greedy_reply(model, tokenizer, prompt: list[dict], max_new_tokens: int = 32) -> str:
    ids = tokenizer(templates.render_prompt(prompt, tokenizer), add_special_tokens=False,
                    return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def mean_exact_match(model, tokenizer, rows: list[dict]) -> float:
    """Mean exact_match reward of greedy replies: what GRPO with that reward should raise."""
    replies = [greedy_reply(model, tokenizer, r["prompt"]) for r in rows]
    scores = rewards.exact_match(replies, [r["answer"] for r in rows])
    return sum(scores) / len(scores)


def load_policy(model: str, adapter: str | None = None):
    """(model, tokenizer) for scoring, base or fine-tuned, in eval mode."""
    tokenizer, loaded = models.load_checkpoint(model, adapter, purpose="infer")
    loaded.eval()
    return loaded, tokenizer


def sampled_replies(model, tokenizer, prompt: list[dict], n: int, max_new_tokens: int = 32,
                    temperature: float = 1.0) -> list[str]:
    ids = tokenizer(templates.render_prompt(prompt, tokenizer), add_special_tokens=False,
                    return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=temperature, num_return_sequences=n,
                             pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(o[ids["input_ids"].shape[1]:], skip_special_tokens=True)
            for o in out]


def mean_sampled_reward(model, tokenizer, rows: list[dict], scorer, n: int = 8,
                        seed: int = 0) -> float:
    """Mean reward of `n` sampled replies per prompt, as GRPO samples them in training:
    the expected reward it optimises, estimated on rows it never saw. `scorer` is called
    as GRPO calls a reward function: replies, answers, and the prompt by keyword."""
    torch.manual_seed(seed)
    scores = []
    for row in rows:
        replies = sampled_replies(model, tokenizer, row["prompt"], n)
        scores += scorer(replies, [row.get("answer")] * n, prompt=row["prompt"])
    return sum(scores) / len(scores)
