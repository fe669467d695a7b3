"""The training stages, one row each, sharing one path: core/train.py reads a dataset,
encodes each record with its stage's `encode`, and fits the stage's TRL trainer
(wrapped by core/trainer.py, so every stage gets the run folder, checkpoints and
live metrics alike).

Every stage tokenizes through core/templates.py, so the template is applied once, in
one way, and prompt tokens are never trained; the TRL trainers receive token ids and
skip their own tokenization (see the `_prepare_dataset`/`tokenize_row` overrides in
core/trainer.py). GRPO is the exception that proves the rule: it samples replies
itself, so it gets the prompt as messages and renders it with the tokenizer's chat
template, which is the same template (templates.apply_template sets it).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable

from . import templates
from .config import REFERENCE_FREE_LOSSES, TrainConfig


@dataclass(frozen=True)
class Stage:
    trainer: str            # "module:Class" of the TRL trainer
    args: str               # "module:Class" of its config
    encode: Callable        # (record, tokenizer, cutoff_len) -> row | None (nothing to train)
    signals: tuple[str, ...] = ()   # the live metrics it adds (names in metrics.jsonl)
    what: str = ""          # one line for the log


# --- records -> rows ------------------------------------------------------------

def encode_chat(record: dict, tokenizer, cutoff_len: int) -> dict | None:
    row = templates.encode_example(record, tokenizer, cutoff_len)
    return row if any(label != templates.IGNORE for label in row["labels"]) else None


def _pair_ids(record: dict, tokenizer, cutoff_len: int) -> tuple[list, list, list] | None:
    """(prompt, chosen, rejected) ids; the prompt is cut to what both replies leave room
    for (each is a suffix of the whole prompt, so the shorter is a suffix of the longer)."""
    p1, chosen = templates.encode_reply(record["prompt"], record["chosen"], tokenizer, cutoff_len)
    p2, rejected = templates.encode_reply(record["prompt"], record["rejected"], tokenizer,
                                          cutoff_len)
    if not chosen or not rejected:
        return None
    return (p1 if len(p1) <= len(p2) else p2), chosen, rejected


def encode_pair(record: dict, tokenizer, cutoff_len: int) -> dict | None:
    ids = _pair_ids(record, tokenizer, cutoff_len)
    if ids is None:
        return None
    prompt, chosen, rejected = ids
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


def encode_ranked_pair(record: dict, tokenizer, cutoff_len: int) -> dict | None:
    """The reward model reads whole sequences (prompt + reply) and scores the last token."""
    ids = _pair_ids(record, tokenizer, cutoff_len)
    if ids is None:
        return None
    prompt, chosen, rejected = ids
    return {"chosen_ids": prompt + chosen, "rejected_ids": prompt + rejected}


def encode_labelled(record: dict, tokenizer, cutoff_len: int) -> dict | None:
    prompt, reply = templates.encode_reply(record["prompt"], record["completion"], tokenizer,
                                           cutoff_len)
    if not reply:
        return None
    return {"prompt_ids": prompt, "completion_ids": reply, "label": bool(record["label"])}


def encode_prompt(record: dict, tokenizer, cutoff_len: int) -> dict | None:
    """GRPO's rows: the prompt as messages (the trainer renders and samples it) and the
    answer the rule rewards compare against ("" when there is none)."""
    length = len(tokenizer(templates.render_prompt(record["prompt"], tokenizer),
                           add_special_tokens=False)["input_ids"])
    if length >= cutoff_len:
        return None
    return {"prompt": record["prompt"], "answer": record.get("answer") or ""}


# The metrics each stage adds to metrics.jsonl, from TRL's log keys. Evaluation lines
# carry the same names prefixed with "eval_"; GRPO's per-function rewards
# ("rewards/<name>/mean") become reward_<name>.
PREFERENCE_SIGNALS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")
_TRL_KEYS = {
    "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
    "rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy",
    "accuracy": "accuracy", "margin": "reward_margin", "kl": "kl",
    "reward": "reward", "reward_std": "reward_std",
    "completions/mean_length": "completion_length",
}
_PER_FUNCTION = re.compile(r"rewards/(\w+)/mean")

STAGES: dict[str, Stage] = {
    "sft": Stage("trl:SFTTrainer", "trl:SFTConfig", encode_chat,
                 what="supervised fine-tuning on the assistant's replies"),
    "pt": Stage("trl:SFTTrainer", "trl:SFTConfig", encode_chat,
                what="pre-training on every token of plain text"),
    "rm": Stage("trl:RewardTrainer", "trl:RewardConfig", encode_ranked_pair,
                ("accuracy", "reward_margin"),
                "a reward model: one score per reply, chosen above rejected"),
    "dpo": Stage("trl:DPOTrainer", "trl:DPOConfig", encode_pair, PREFERENCE_SIGNALS,
                 "direct preference optimisation on chosen/rejected pairs"),
    "kto": Stage("trl:KTOTrainer", "trl:KTOConfig", encode_labelled,
                 PREFERENCE_SIGNALS[:3] + ("kl",),
                 "KTO on single replies labelled good or bad"),
    "grpo": Stage("trl:GRPOTrainer", "trl:GRPOConfig", encode_prompt,
                  ("reward", "reward_std", "kl", "completion_length"),
                  "GRPO: sample replies, score them, reinforce the better ones"),
}
# The reference-free preference losses live in TRL's experimental trainers.
PREFERENCE_LOSS_TRAINERS = {
    "orpo": ("trl.experimental.orpo:ORPOTrainer", "trl.experimental.orpo:ORPOConfig"),
    "simpo": ("trl.experimental.cpo:CPOTrainer", "trl.experimental.cpo:CPOConfig"),
}


def signal_name(key: str) -> str | None:
    """metrics.jsonl's name for one of TRL's log keys (None: not a stage signal)."""
    prefix = "eval_" if key.startswith("eval_") else ""
    key = key[len(prefix):]
    if key in _TRL_KEYS:
        return prefix + _TRL_KEYS[key]
    found = _PER_FUNCTION.fullmatch(key)
    return f"{prefix}reward_{found.group(1)}" if found else None


def _load(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def trainer_classes(config: TrainConfig) -> tuple[type, type]:
    """(TRL trainer class, its config class) for the config's stage and loss."""
    stage = STAGES[config.stage]
    refs = PREFERENCE_LOSS_TRAINERS.get(config.pref_loss) if config.stage == "dpo" else None
    trainer, args = refs or (stage.trainer, stage.args)
    return _load(trainer), _load(args)


# The reference policy is frozen, so its log-probabilities of each reply are computed in
# one pass before training instead of again in every epoch: an 8-epoch DPO run of the
# demo model on 24 pairs trained in 6.4 s instead of 8.8 s (measured while building this).
_REFERENCE_ONCE = {"precompute_ref_log_probs": True}
# The pair trainers pad each batch to its longest row (TRL 1.16 has no padding-free DPO):
# batches of similar length waste less (see RunFolderMixin's sampler).
_SIMILAR_LENGTHS = {"train_sampling_strategy": "group_by_length"}


def stage_args(config: TrainConfig) -> dict[str, Any]:
    """The stage's own arguments for its TRL config class. Rows arrive cut to
    cutoff_len (templates.truncate/encode_reply), so TRL's length limits stay off."""
    if config.stage == "rm":
        return {"max_length": None, **_SIMILAR_LENGTHS}
    if config.stage == "dpo":
        if config.pref_loss == "orpo":
            return {"beta": config.pref_beta, "max_length": config.cutoff_len,
                    "max_completion_length": None}
        if config.pref_loss == "simpo":
            return {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": config.pref_beta,
                    "max_length": config.cutoff_len, "max_completion_length": None}
        losses = [config.pref_loss] + (["sft"] if config.pref_ftx else [])
        return {"beta": config.pref_beta, "loss_type": losses, "max_length": None,
                "loss_weights": [1.0, config.pref_ftx] if config.pref_ftx else None,
                **_REFERENCE_ONCE, **_SIMILAR_LENGTHS}
    if config.stage == "kto":
        # No length grouping: KTO pairs each reply with its batch neighbour's for the KL
        # estimate, which needs TRL's fixed (sequential) order.
        return {"beta": config.pref_beta, "max_length": None, **_REFERENCE_ONCE,
                "desirable_weight": config.kto_desirable_weight,
                "undesirable_weight": config.kto_undesirable_weight}
    if config.stage == "grpo":
        return {"beta": config.pref_beta, "num_generations": config.num_generations,
                "max_completion_length": config.max_completion_length,
                "log_completions": False, "remove_unused_columns": False}
    return {}


def padded_lengths(columns: dict) -> list[int] | None:
    """Each row's padded length in a batch of the pair and KTO stages (prompt plus its
    longer reply), from the dataset's columns; None for other stages' rows."""
    if "chosen_ids" in columns:
        prompts = columns.get("prompt_ids") or [[]] * len(columns["chosen_ids"])
        return [len(p) + max(len(c), len(r)) for p, c, r in
                zip(prompts, columns["chosen_ids"], columns["rejected_ids"])]
    if "completion_ids" in columns:
        return [len(p) + len(c) for p, c in zip(columns["prompt_ids"], columns["completion_ids"])]
    return None


def uses_reference(config: TrainConfig) -> bool:
    """Whether the stage compares against a frozen reference policy."""
    if config.stage == "dpo":
        return config.pref_loss not in REFERENCE_FREE_LOSSES
    if config.stage == "grpo":
        return config.pref_beta > 0
    return config.stage == "kto"


def rows_per_record(config: TrainConfig) -> int:
    """Sequences one record puts through an optimizer step's batch (GRPO: each prompt
    yields num_generations replies, and batch_size counts replies)."""
    return config.num_generations if config.stage == "grpo" else 1

