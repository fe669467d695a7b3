"""GRPO's reply scorers: built-in rule rewards, a reward model, and a user's own.

A scorer takes TRL's reward-function arguments (`prompts`, `completions`,
`completion_ids`, and the dataset's other columns such as `answer`) and returns one
float per reply. `reward_functions(config)` builds the list the trainer sums.

Rules are written so that the cheap way to a higher reward is the intended one:
exact_match pays only for the right answer, and the length penalty is zero below
the target, so shortening replies does not pay by itself.
"""

from __future__ import annotations

import importlib.util
import re
import unicodedata
from pathlib import Path
from typing import Callable

from . import paths
from .config import TrainConfig
from .errors import BadInput
from .i18n import msg

Scorer = Callable[..., list[float]]
_TRAILING = ".!?。！？ \t\n"


def reply_text(completion) -> str:
    """A reply as text: GRPO hands conversational prompts' replies over as messages."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def normalize(text: str) -> str:
    """Case, width, inner whitespace and trailing punctuation do not count."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(text.split()).strip(_TRAILING)


def exact_match(completions, answer=None, **_) -> list[float]:
    """1 when the reply equals the row's answer (normalized), else 0. Rows without an
    answer score 0: a reward that cannot be checked pays nothing."""
    answers = answer if answer is not None else [""] * len(completions)
    return [float(bool(a) and normalize(reply_text(c)) == normalize(str(a)))
            for c, a in zip(completions, answers)]


def format_reward(pattern: str) -> Scorer:
    """1 when the whole reply matches `pattern`, else 0."""
    compiled = re.compile(pattern, re.DOTALL)

    def format(completions, **_) -> list[float]:  # noqa: A001 - TRL logs it as rewards/format
        return [float(compiled.fullmatch(reply_text(c).strip()) is not None)
                for c in completions]
    return format


def length_penalty(target: int, most: int) -> Scorer:
    """0 up to `target` tokens, then falling linearly to -1 at `most` (the longest reply)."""
    room = max(most - target, 1)

    def length(completions, completion_ids=None, **_) -> list[float]:
        sizes = [len(ids) for ids in completion_ids] if completion_ids is not None else \
            [len(reply_text(c).split()) for c in completions]
        return [-min(max(n - target, 0) / room, 1.0) for n in sizes]
    return length


def model_reward(reward_model: str, template: str = "auto") -> Scorer:
    """A sequence-classification model's score of each (prompt, reply), rendered with the
    chat template (core/models.score_replies), batched per prompt."""
    from . import models
    scorer, tokenizer = models.load_reward_model(reward_model, template=template)

    def reward_model_score(prompts, completions, **_) -> list[float]:
        scores = []
        for prompt, completion in zip(prompts, completions):
            scores += models.score_replies(scorer, tokenizer, prompt, [reply_text(completion)])
        return scores
    reward_model_score.__name__ = "model"  # logged as rewards/model/mean -> reward_model
    return reward_model_score


def user_scorer(ref: str) -> Scorer:
    """`file.py:function` from a config or the command line. It runs Python code, so it is
    refused inside the page and its jobs, and read only from an allowed folder (data/,
    saves/, --allow-root folders, or the working directory)."""
    file, _, name = ref.rpartition(":")
    if paths.confined():
        raise BadInput(msg("data.reward_code_refused", ref=ref), field="reward_funcs")
    path = paths.confine(file, "reward_funcs", roots=paths.allowed_roots() + [Path.cwd()],
                         must_exist=True)
    spec = importlib.util.spec_from_file_location(f"tunebench_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's code: say where it failed, no traceback
        raise BadInput(msg("data.reward_load_failed", error=f"{type(err).__name__}: {err}"),
                       file=str(path), field="reward_funcs") from None
    func = getattr(module, name, None)
    if not callable(func):
        raise BadInput(msg("data.reward_no_function", name=name), file=str(path),
                       field="reward_funcs")
    return func


def reward_functions(config: TrainConfig) -> list[Scorer]:
    """The scorers GRPO sums for each reply, in the order the config names them."""
    target = config.reward_length_target or config.max_completion_length // 2
    builtin = {"exact_match": lambda: exact_match, "answer_f1": lambda: answer_f1,
               "format": lambda: format_reward(config.reward_format),
               "length": lambda: length_penalty(target, config.max_completion_length)}
    funcs = [builtin[name]() if name in builtin else user_scorer(name)
             for name in config.reward_funcs if name != "none"]
    if config.reward_model:
        funcs.append(model_reward(config.reward_model, config.template))
    return funcs


_WORDS = re.compile(r"[^\W\d_]+|\d+|[\u3400-\u9fff]", re.UNICODE)  # CJK: one character a word


def words(text: str) -> list[str]:
    """Words for overlap scores: Latin words and numbers whole, Chinese by character."""
    return _WORDS.findall(normalize(text))


def answer_f1(completions, answer=None, **_) -> list[float]:
    """Word-overlap F1 between the reply and the answer (SQuAD's partial credit): a dense
    signal where exact_match is too rare for a small model to ever be rewarded."""
    answers = answer if answer is not None else [""] * len(completions)
    return [_f1(words(reply_text(c)), words(str(a))) if a else 0.0
            for c, a in zip(completions, answers)]


def _f1(reply: list[str], answer: list[str]) -> float:
    from collections import Counter
    common = sum((Counter(reply) & Counter(answer)).values())
    if not common:
        return 0.0
    precision, recall = common / len(reply), common / len(answer)
    return 2 * precision * recall / (precision + recall)
