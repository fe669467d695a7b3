"""Chat templates, and turning a conversation into tokens and labels.

Named templates are data: each is a Jinja chat template (the format
`tokenizer.apply_chat_template` understands) plus its stop string. Choosing one
sets it on the tokenizer, and the tokenizer is saved with every checkpoint, so
chat and export use exactly the template that training used.

Label masking is done here rather than with TRL's `assistant_only_loss`, which
only works with templates carrying `{% generation %}` markers (almost none do).
We render the conversation prefix by prefix and map the assistant character
spans onto tokens through the fast tokenizer's offsets. This works with any
template that renders incrementally, which is every common one.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BadInput
from .i18n import msg

IGNORE = -100


@dataclass(frozen=True)
class Template:
    jinja: str
    stop: str  # text that ends an assistant turn; generation stops on it


# ChatML, the one copy: the named "chatml" template, the template baked into the demo
# model's tokenizer (core/demo_model.py; its build fingerprint hashes this text, so any
# change rebuilds the cached demo model), and what chat falls back to for a tokenizer
# without a template. Text is written through {{- '...' -}} so that the newline after
# each <|im_end|> survives Jinja's whitespace control. The {% generation %} markers let
# transformers (and TRL's assistant_only_loss) tell which tokens the assistant wrote.
CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen's variant of ChatML adds a default system prompt when none is given.
_QWEN = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}" + CHATML
)

# The templates below, like CHATML, write every piece of text through {{- '...' -}}: text
# left between tags would lose its newlines and spaces to the tags' whitespace control.
_ALPACA = (
    "{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\n\n' -}}"
    "{%- else -%}{{- 'Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n' -}}{%- endif -%}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if m['role'] == 'user' -%}{{- '### Instruction:\n' + m['content'] + '\n\n' -}}"
    "{%- else -%}{{- '### Response:\n' + m['content'] -}}{{- eos_token -}}{{- '\n\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Response:\n' -}}{%- endif -%}"
)

_LLAMA2 = (
    "{%- set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' -%}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if m['role'] == 'user' -%}{{- bos_token -}}{{- '[INST] ' -}}"
    "{%- if loop.first and system -%}{{- '<<SYS>>\n' + system + '\n<</SYS>>\n\n' -}}"
    "{%- endif -%}{{- m['content'] + ' [/INST]' -}}"
    "{%- else -%}{{- ' ' + m['content'] + ' ' -}}{{- eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)

_LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] "
    "+ '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
)

_MISTRAL = (
    "{{- bos_token -}}"
    "{%- set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' -%}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if m['role'] == 'user' -%}{{- '[INST] ' -}}"
    "{%- if loop.first and system -%}{{- system + '\n\n' -}}{%- endif -%}"
    "{{- m['content'] + ' [/INST]' -}}"
    "{%- else -%}{{- m['content'] -}}{{- eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)

TEMPLATES: dict[str, Template] = {
    "chatml": Template(CHATML, "<|im_end|>"),
    "qwen": Template(_QWEN, "<|im_end|>"),
    "alpaca": Template(_ALPACA, "{eos}"),
    "llama2": Template(_LLAMA2, "{eos}"),
    "llama3": Template(_LLAMA3, "<|eot_id|>"),
    "mistral": Template(_MISTRAL, "{eos}"),
}


def apply_template(tokenizer, name: str, model: str = "") -> None:
    """Put the chosen chat template on the tokenizer ('auto' keeps its own)."""
    if name == "auto":
        if not tokenizer.chat_template:
            raise BadInput(msg("data.no_chat_template", templates=", ".join(TEMPLATES)),
                           file=model or None, field="template")
        return
    if name not in TEMPLATES:
        raise BadInput(msg("data.unknown_template", name=name, templates=", ".join(TEMPLATES)),
                       field="template")
    tokenizer.chat_template = TEMPLATES[name].jinja


def stop_string(tokenizer, name: str) -> str:
    """The text that ends an assistant turn under template `name`."""
    stop = TEMPLATES[name].stop if name in TEMPLATES else tokenizer.eos_token or ""
    return stop.replace("{eos}", tokenizer.eos_token or "")


# --- conversation -> tokens and labels ------------------------------------------

def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant reply.

    A reply's span starts after the generation prompt and runs to the end of that
    turn, so it includes the end-of-turn marker: the model must learn to stop.
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise BadInput(msg("data.template_not_incremental"), field="template")
        spans.append((len(prompt), len(upto)))
    return full, spans


def _labels_from_offsets(offsets, spans) -> list[bool]:
    trained, s = [], 0
    for start, end in offsets:
        while s < len(spans) and spans[s][1] <= start:
            s += 1
        inside = s < len(spans) and spans[s][0] <= start < spans[s][1] and end > start
        trained.append(inside)
    return trained


def encode_conversation(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 on every prompt token) for a whole conversation."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    trained = _labels_from_offsets(enc["offset_mapping"], spans)
    ids = list(enc["input_ids"])
    return ids, [t if keep else IGNORE for t, keep in zip(ids, trained)]


def truncate(ids: list[int], labels: list[int], cutoff_len: int) -> tuple[list[int], list[int]]:
    """Fit a conversation into `cutoff_len` tokens without dropping the whole response.

    Whole turns are kept from the start while they fit. If even the first
    exchange is too long, its prompt keeps its end (the question and the
    assistant header) and its reply keeps its start, each getting at least half
    the budget when both are long.
    """
    if len(ids) <= cutoff_len:
        return ids, labels
    turns = _turn_ends(labels)
    fitting = [end for end in turns if end <= cutoff_len]
    if fitting:
        return ids[: fitting[-1]], labels[: fitting[-1]]
    first_reply = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    reply_end = turns[0]
    prompt_len, reply_len = first_reply, reply_end - first_reply
    if prompt_len <= cutoff_len // 2:
        keep_prompt = prompt_len
    elif reply_len <= cutoff_len // 2:
        keep_prompt = cutoff_len - reply_len
    else:
        keep_prompt = cutoff_len // 2
    keep_reply = cutoff_len - keep_prompt
    start = first_reply - keep_prompt
    new_ids = ids[start:first_reply] + ids[first_reply: first_reply + keep_reply]
    new_labels = labels[start:first_reply] + labels[first_reply: first_reply + keep_reply]
    return new_ids, new_labels


def _turn_ends(labels: list[int]) -> list[int]:
    """Index just past each trained (assistant) run of tokens."""
    ends = [i + 1 for i in range(len(labels))
            if labels[i] != IGNORE and (i + 1 == len(labels) or labels[i + 1] == IGNORE)]
    return ends


def encode_example(record: dict, tokenizer, cutoff_len: int) -> dict:
    """One normalized record -> {"input_ids", "labels"}.

    Chat records ({"messages": [...]}) train on assistant turns only; text
    records ({"text": ...}, pre-training) train on every token.
    """
    if "text" in record:
        ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        ids = ids[:cutoff_len]
        return {"input_ids": ids, "labels": list(ids)}
    ids, labels = encode_conversation(record["messages"], tokenizer)
    ids, labels = truncate(ids, labels, cutoff_len)
    return {"input_ids": ids, "labels": labels}


def trained_segments(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The decoded text split into runs of (text, trained?) for previews."""
    segments: list[tuple[list[int], bool]] = []
    for tok, lab in zip(input_ids, labels):
        trained = lab != IGNORE
        if segments and segments[-1][1] == trained:
            segments[-1][0].append(tok)
        else:
            segments.append(([tok], trained))
    return [(tokenizer.decode(toks, skip_special_tokens=False), trained)
            for toks, trained in segments]


# --- a prompt and one reply (preference, KTO and RL stages) -------------------------

def render_prompt(prompt: list[dict], tokenizer) -> str:
    """The prompt conversation (ending with the user) as the model sees it just before it
    writes: the template's text up to and including the assistant header."""
    return _render(tokenizer, prompt, add_generation_prompt=True)


def encode_reply(prompt: list[dict], reply: str, tokenizer,
                 cutoff_len: int) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) for one reply to `prompt`, through the same template and
    masking as SFT: the reply's tokens are exactly the ones `encode_conversation` trains
    for that turn (its text and the end-of-turn marker), and none of the prompt's are.

    The prompt is tokenized on its own, as it is when the model generates, so prompt ids
    are the same for every reply to it. When both do not fit in `cutoff_len`, the
    prompt keeps its end and the reply its start, as `truncate` does for SFT.
    """
    messages = prompt + [{"role": "assistant", "content": reply}]
    text, spans = assistant_spans(tokenizer, messages)
    start, end = spans[-1]
    prompt_ids = tokenizer(text[:start], add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(text[start:end], add_special_tokens=False)["input_ids"]
    ids, labels = truncate(prompt_ids + reply_ids,
                           [IGNORE] * len(prompt_ids) + list(reply_ids), cutoff_len)
    first = next((i for i, lab in enumerate(labels) if lab != IGNORE), len(ids))
    return list(ids[:first]), list(ids[first:])
