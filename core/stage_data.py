"""Preference, KTO and RL records: the data behind stages rm, dpo, kto and grpo.

core/data.py reads a file and settles its format; this module turns each row of a
stage format into a record, words the message for data a stage cannot use, turns
one kind of record into another where a stage accepts both (data.STAGE_KINDS), and
previews the first example for `tunebench data check`. The records:

    rm, dpo  {"prompt": [...], "chosen": str, "rejected": str}
    kto      {"prompt": [...], "completion": str, "label": bool}
    grpo     {"prompt": [...], "answer": str | None}

Each prompt is a conversation (an optional system message, then user and assistant
turns alternating) that ends with the user's message: the reply comes after it.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from typing import Any

from .data import (_absent, _alpaca_prompt, _chat_messages, _check_text, _kind, _ordered,
                   _Source, _text, _turn, _with_system)
from .i18n import Msg, msg, t

# How a kind of data is named in messages, and what each stage trains on (messages in
# the catalogues, rendered in the reader's language).
HOLDS = {kind: msg(f"data.holds.{kind}") for kind in ("chat", "text", "pairs", "kto", "prompts")}
NEEDS = {stage: msg(f"data.needs.{stage}") for stage in ("sft", "pt", "rm", "dpo", "kto", "grpo")}
# What `data check` and the Train tab say a stage reads.
STAGE_DATA = {stage: msg(f"data.stage_data.{stage}")
              for stage in ("sft", "pt", "rm", "dpo", "kto", "grpo")}
_BOOL_TEXT = {"true": True, "false": False}


def trains_on(stage: str) -> Msg:
    """"Stage dpo trains on chosen/rejected pairs": the Train tab's note on a stage."""
    return msg("data.stage_trains_on", stage=stage,
               what=STAGE_DATA.get(stage, msg("data.stage_data.other")))


def mismatch(kind: str, stage: str) -> Msg:
    """Why `stage` cannot train on data of `kind`, and what it needs instead."""
    return msg("data.mismatch", holds=HOLDS[kind], stage=stage, needs=NEEDS[stage])


def build_record(row: dict, idx: int, src: _Source) -> dict:
    """One row of a pairs, kto or prompts file -> its record (BadInput when malformed)."""
    return _BUILDERS[src.fmt](row, idx, src)


def convert(records: list[dict], kind: str, stage: str) -> list[dict]:
    """Records of `kind` as `stage` reads them (the stage accepts the kind)."""
    if stage == "pt" and kind == "chat":  # the turns' texts, one paragraph each
        return [{"text": "\n\n".join(m["content"] for m in r["messages"])} for r in records]
    if stage == "kto" and kind == "pairs":  # the better reply is good, the other bad
        return [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                for r in records for side in ("chosen", "rejected")]
    if stage == "grpo" and kind == "chat":  # the last reply is what a good answer looks like
        return [{"prompt": r["messages"][:-1], "answer": r["messages"][-1]["content"]}
                for r in records]
    return records


# --- pairs ----------------------------------------------------------------------------

def _trl_pair(row: dict, idx: int, src: _Source) -> dict:
    """TRL's layout: prompt, chosen, rejected; or, without a prompt, chosen and rejected as
    whole conversations that share the prompt (TRL's implicit prompt)."""
    chosen = _cell_messages(row.get(src.col("chosen")), src)
    if row.get(src.col("prompt")) is None and _is_conversation(chosen):
        return _implicit_pair(row, idx, src)
    return _pair(_prompt(row, idx, src, _pair_hint(src)), row, idx, src)


def _alpaca_pair(row: dict, idx: int, src: _Source) -> dict:
    return _pair(_alpaca_prompt(row, idx, src), row, idx, src)


def _sharegpt_pair(row: dict, idx: int, src: _Source) -> dict:
    prompt = _chat_messages(row, idx, src, "conversations", _pair_hint(src))
    return _pair(prompt, row, idx, src)


def _pair_hint(src: _Source) -> Msg:
    return msg("data.hint_pair", chosen=src.col("chosen"), rejected=src.col("rejected"))


def _pair(prompt: list[dict], row: dict, idx: int, src: _Source) -> dict:
    chosen = _reply(row, "chosen", idx, src)
    rejected = _reply(row, "rejected", idx, src)
    _check_different(chosen, rejected, idx, src)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _check_different(chosen: str, rejected: str, idx: int, src: _Source) -> None:
    if chosen.strip() == rejected.strip():
        raise _same_replies(idx, src)


def _same_replies(idx: int, src: _Source):
    return src.bad(msg("data.same_replies", chosen=src.col("chosen")), idx, src.col("rejected"))


def _is_conversation(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 1


def _implicit_pair(row: dict, idx: int, src: _Source) -> dict:
    sides = {}
    for canon in ("chosen", "rejected"):
        name, items = src.col(canon), _cell_messages(row.get(src.col(canon)), src)
        if not isinstance(items, (list, tuple)) or not items:
            raise src.bad(msg("data.implicit_not_conversation", chosen=src.col("chosen"),
                              prompt=src.col("prompt"), kind=_kind(items)), idx, name)
        sides[canon] = [_turn(item, pos, idx, name, src) for pos, item in enumerate(items, 1)]
    chosen, rejected = sides["chosen"], sides["rejected"]
    shared = next((k for k, (a, b) in enumerate(zip(chosen, rejected)) if a[:2] != b[:2]),
                  min(len(chosen), len(rejected)))
    name = src.col("rejected")
    if shared == len(chosen) == len(rejected):
        raise _same_replies(idx, src)
    if not (0 < shared == len(chosen) - 1 == len(rejected) - 1
            and chosen[-1][0] == rejected[-1][0] == "assistant"):
        raise src.bad(msg("data.implicit_differ", prompt=src.col("prompt"), pos=shared + 1),
                      idx, name)
    chosen_name = src.col("chosen")
    prompt = _ordered(_with_system(chosen[:shared], row, idx, chosen_name, src), idx,
                      chosen_name, src, msg("data.hint_last_messages"))
    replies = {}
    for canon, turns in sides.items():
        if not turns[-1][1].strip():
            raise src.bad(msg("data.empty_reply_message", pos=turns[-1][2]), idx,
                          src.col(canon))
        replies[canon] = turns[-1][1]
    _check_different(replies["chosen"], replies["rejected"], idx, src)
    return {"prompt": prompt, **replies}


# --- kto and prompts ------------------------------------------------------------------

def _kto_row(row: dict, idx: int, src: _Source) -> dict:
    """A conversation whose last (assistant) message is the labelled reply, or a prompt
    and a completion; and the label."""
    conversation = next((c for c in ("messages", "conversations")
                         if row.get(src.col(c)) not in (None, "")), None)
    if conversation:
        messages = _chat_messages(row, idx, src, conversation)
        prompt, completion = messages[:-1], messages[-1]["content"]
    else:
        hint = msg("data.hint_completion", completion=src.col("completion"))
        prompt = _prompt(row, idx, src, hint)
        completion = _reply(row, "completion", idx, src)
    return {"prompt": prompt, "completion": completion, "label": _label(row, idx, src)}


def _prompt_row(row: dict, idx: int, src: _Source) -> dict:
    hint = msg("data.hint_answer", answer=src.col("answer"))
    return {"prompt": _prompt(row, idx, src, hint), "answer": _answer(row, idx, src)}


_BUILDERS = {"pairs": _trl_pair, "alpaca_pairs": _alpaca_pair, "sharegpt_pairs": _sharegpt_pair,
             "kto": _kto_row, "prompts": _prompt_row}


# --- fields -----------------------------------------------------------------------------

def _prompt(row: dict, idx: int, src: _Source, hint: Msg) -> list[dict]:
    """The prompt field: a text (one user message) or messages ending with the user's."""
    name = src.col("prompt")
    value = _cell_messages(row.get(name), src)
    expected = msg("data.expected_prompt")
    if isinstance(value, str):
        turns = [("user", _text(row, "prompt", idx, src, required=True, nonempty=True), 1)]
    elif isinstance(value, (list, tuple)) and value:
        turns = [_turn(item, pos, idx, name, src) for pos, item in enumerate(value, 1)]
    elif value is None:
        raise src.bad(msg("data.absent", state=_absent(row, name), expected=expected), idx, name)
    else:
        got = msg("data.kind.empty_list") if isinstance(value, (list, tuple)) else _kind(value)
        raise src.bad(msg("data.got", expected=expected, kind=got), idx, name)
    return _ordered(_with_system(turns, row, idx, name, src), idx, name, src, hint)


def _reply(row: dict, canon: str, idx: int, src: _Source) -> str:
    """A reply: a text, or one assistant message (an object, or a list holding one)."""
    name = src.col(canon)
    value = _cell_messages(row.get(name), src)
    if value is None:
        raise src.bad(msg("data.absent_reply", state=_absent(row, name)), idx, name)
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, (list, tuple)):
        value = _reply_message(list(value), idx, name, src)
    if not isinstance(value, str):
        raise src.bad(msg("data.reply_not_text", kind=_kind(value)), idx, name)
    if not value.strip():
        raise src.bad(msg("data.empty_reply"), idx, name)
    return _check_text(value, idx, name, src)


def _cell_messages(value: Any, src: _Source) -> Any:
    """A CSV cell holding a JSON-encoded message or list of messages -> that; any other
    cell stays text (a reply may well start with a bracket)."""
    if not (src.csv and isinstance(value, str) and value.lstrip()[:1] in ("{", "[")):
        return value
    try:
        decoded = json.loads(value)
    except (ValueError, RecursionError):
        return value
    items = decoded if isinstance(decoded, list) else [decoded]
    is_message = all(isinstance(m, dict) and ("role" in m or "from" in m) for m in items)
    return decoded if items and is_message else value


def _reply_message(items: list, idx: int, name: str, src: _Source) -> str:
    if len(items) != 1:
        raise src.bad(msg("data.reply_many_messages", n=len(items)), idx, name)
    role, content, _ = _turn(items[0], 1, idx, name, src)
    if role != "assistant":
        raise src.bad(msg("data.reply_wrong_role", role=role), idx, name)
    return content


def _label(row: dict, idx: int, src: _Source) -> bool:
    name = src.col("label")
    value = row.get(name)
    if isinstance(value, bool):
        return value
    if src.csv and isinstance(value, str) and value.strip().lower() in _BOOL_TEXT:
        return _BOOL_TEXT[value.strip().lower()]
    expected = msg("data.expected_label")
    if value is None:
        raise src.bad(msg("data.absent", state=_absent(row, name), expected=expected), idx, name)
    shown = json.dumps(value, ensure_ascii=False, default=str)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise src.bad(msg("data.got_value", expected=expected, value=shown), idx, name)


def _answer(row: dict, idx: int, src: _Source) -> str | None:
    """The expected answer as text (a number is written out), or None when absent."""
    name = src.col("answer")
    value = row.get(name)
    if value is None or (src.csv and value == ""):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = _number_text(value, idx, name, src)
    if not isinstance(value, str):
        raise src.bad(msg("data.answer_not_text", kind=_kind(value)), idx, name)
    if not value.strip():
        raise src.bad(msg("data.empty_answer"), idx, name)
    return _check_text(value, idx, name, src)


def _number_text(value: int | float, idx: int, name: str, src: _Source) -> str:
    """12 and 12.0 -> "12"; 2.5 -> "2.5"."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise src.bad(msg("data.not_finite", value=str(value)), idx, name)
        return str(int(value)) if value.is_integer() and abs(value) < 1e16 else repr(value)
    try:
        return str(value)
    except ValueError:  # more digits than Python writes out
        raise src.bad(msg("data.number_too_long"), idx, name) from None


# --- tunebench data check ---------------------------------------------------------------

def print_preview(records: list[dict], stage: str, model: str, template: str) -> None:
    """The first record as `stage` trains on it: the prompt once, then each reply with its
    trained tokens marked (rm, dpo, kto), or the rendered prompt and its answer (grpo)."""
    from . import templates
    from .config import default_value
    from .data import _length_summary, _marker, _scope
    from .models import load_tokenizer
    tokenizer = load_tokenizer(model, template)
    cutoff = default_value("cutoff_len")
    marks = _marker(sys.stdout)
    sample = records[:1000]  # lengths of more records cost more than they tell
    if stage == "grpo":
        _print_prompt_and_answer(records[0], tokenizer)
        lengths = [len(tokenizer(templates.render_prompt(r["prompt"], tokenizer),
                                 add_special_tokens=False)["input_ids"]) for r in sample]
        print(t("data.check.prompt_tokens", scope=_scope(len(sample), len(records)),
                min=min(lengths), median=f"{statistics.median(lengths):g}", max=max(lengths)))
        return
    print("\n" + t("data.check.as_model_sees", cutoff=cutoff, open=marks[0], close=marks[1]))
    counts = _print_replies(records[0], tokenizer, cutoff, marks)
    print("\n" + t("data.check.tokens", counts=", ".join(f"{k} {v}" for k, v in counts.items())))
    lengths = [_example_length(r, tokenizer) for r in sample]
    print(_length_summary(lengths, cutoff, len(sample), len(records)))


def _replies(record: dict) -> list[tuple[str, str]]:
    """(field, text) of each reply a record trains on."""
    if "chosen" in record:
        return [("chosen", record["chosen"]), ("rejected", record["rejected"])]
    return [("completion", record["completion"])]


def _title(field: str, record: dict) -> str:
    """A reply's heading in the preview: its field, and a KTO reply's label."""
    if field != "completion":
        return field
    return t("data.check.completion", verdict=msg("data.check.label_true" if record["label"]
                                                  else "data.check.label_false"))


def _print_replies(record: dict, tokenizer, cutoff: int, marks: tuple[str, str]) -> dict:
    from .data import _marked
    from .templates import encode_reply
    counts = {}
    for n, (field, reply) in enumerate(_replies(record)):
        prompt_ids, reply_ids = encode_reply(record["prompt"], reply, tokenizer, cutoff)
        if n == 0:
            print(t("data.check.prompt_not_trained"))
            print(tokenizer.decode(prompt_ids, skip_special_tokens=False))
            counts["prompt"] = len(prompt_ids)
        print(t("data.check.reply_title", title=_title(field, record)))
        print(_marked([(tokenizer.decode(reply_ids, skip_special_tokens=False), True)], marks))
        counts[field] = len(reply_ids)
    return counts


def _example_length(record: dict, tokenizer) -> int:
    """Tokens of the prompt and its longest reply, untruncated."""
    from .templates import encode_reply
    lengths = [encode_reply(record["prompt"], text, tokenizer, 10**9) for _, text in
               _replies(record)]
    return len(lengths[0][0]) + max(len(reply) for _, reply in lengths)


def _print_prompt_and_answer(record: dict, tokenizer) -> None:
    from .templates import render_prompt
    print("\n" + t("data.check.first_prompt"))
    print(render_prompt(record["prompt"], tokenizer))
    answer = record["answer"]
    print(t("data.check.answer", answer=answer if answer is not None else
            msg("data.check.no_answer")))
