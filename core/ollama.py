"""An Ollama Modelfile for an exported GGUF: its chat template in Go syntax, stops, defaults.

Ollama does not read the Jinja chat template inside a GGUF; it renders its own Go
`text/template` (the Modelfile's TEMPLATE). Writing that by hand per model is how
templates drift, so `go_template` derives it from the model's own Jinja template by
rendering a probe conversation with a marker in place of each message's content:
each message must render as prefix[role] + content + suffix[role] (every ChatML-style
template does), plus a generation prompt, plus optionally a default system prompt used
when the conversation has none (Qwen's), which becomes the Modelfile's SYSTEM line.
A template outside that shape is refused rather than approximated.

`render_go` is a Python renderer of the Go template subset `go_template` emits, so a
test (and `write_modelfile` itself) can prove the TEMPLATE renders a multi-turn
conversation exactly as the Jinja template does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import BadInput
from .i18n import Msg, msg

Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text
ROLES = ("system", "user", "assistant")
_MARK = "\ue000{}\ue001"  # private-use characters: no template writes them itself
# The conversation every derived TEMPLATE is checked on: system, two exchanges, a question.
PROBE_CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am Tuney."},
    {"role": "user", "content": "你是谁？\nAnswer in one line."},
    {"role": "assistant", "content": "我是 Tuney。"},
    {"role": "user", "content": "Thanks!"},
]


@dataclass(frozen=True)
class ChatShape:
    """A chat template reduced to its pieces: what wraps each role's content."""
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation_prompt: str
    default_system: str | None  # written when a conversation has no system message


def jinja_renderer(tokenizer) -> Render:
    """The tokenizer's own chat template as a `Render`."""
    return lambda messages, gen: tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=gen)


def chat_shape(render: Render) -> ChatShape:
    """Read prefix/suffix of each role off renders of marked conversations (see module doc)."""
    roles = ["system", "user", "assistant", "user", "assistant"]
    messages = [{"role": r, "content": _MARK.format(i)} for i, r in enumerate(roles)]
    prefix, suffix = {}, {}
    try:
        texts = [render(messages[:k], False) if k else "" for k in range(len(messages) + 1)]
        with_prompt = render(messages[:4], True)
        alone = render([{"role": "user", "content": _MARK.format(0)}], False)
    except Exception as err:  # noqa: BLE001 - a template that cannot render this is the finding
        raise _unsupported(msg("export.ollama.fails", error=str(err))) from None
    for k, message in enumerate(messages):
        if not texts[k + 1].startswith(texts[k]):
            raise _unsupported(msg("export.ollama.not_incremental"))
        block = texts[k + 1][len(texts[k]):]
        if block.count(message["content"]) != 1:
            raise _unsupported(msg("export.ollama.content_once", role=message["role"]))
        before, _, after = block.partition(message["content"])
        pair = prefix.setdefault(message["role"], before), suffix.setdefault(message["role"], after)
        if pair != (before, after):
            raise _unsupported(msg("export.ollama.turns_differ", role=message["role"]))
    if not with_prompt.startswith(texts[4]):
        raise _unsupported(msg("export.ollama.prompt_not_last"))
    user_block = prefix["user"] + _MARK.format(0) + suffix["user"]
    return ChatShape(prefix, suffix, with_prompt[len(texts[4]):],
                     _default_system(alone, user_block, prefix, suffix))


def _default_system(alone: str, user_block: str, prefix: dict, suffix: dict) -> str | None:
    """The system prompt a template adds when none is given (Qwen's), or None."""
    if not alone.endswith(user_block):
        raise _unsupported(msg("export.ollama.no_system_end"))
    lead = alone[: len(alone) - len(user_block)]
    if not lead:
        return None
    if lead.startswith(prefix["system"]) and lead.endswith(suffix["system"]):
        return lead[len(prefix["system"]): len(lead) - len(suffix["system"])]
    raise _unsupported(msg("export.ollama.lead_text"))


def _unsupported(why: Msg) -> BadInput:
    return BadInput(msg("export.ollama.unsupported", why=why), field="template")


def go_template(shape: ChatShape) -> str:
    """The Go text/template for Ollama: no whitespace trimming, so every character is literal."""
    for piece in list(shape.prefix.values()) + list(shape.suffix.values()) + [
            shape.generation_prompt]:
        if "{{" in piece or '"""' in piece:
            raise _unsupported(msg("export.ollama.braces"))
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}'
        f"{shape.prefix[role]}{{{{ .Content }}}}{shape.suffix[role]}"
        for i, role in enumerate(ROLES))
    return ("{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            f"{branches}{{{{ end }}}}"
            '{{ if and $last (ne .Role "assistant") }}'
            f"{shape.generation_prompt}{{{{ end }}}}{{{{ end }}}}")


# --- the Modelfile -------------------------------------------------------------------

def modelfile_text(gguf_name: str, template: str, stops: list[str], settings,
                   default_system: str | None = None) -> str:
    """FROM, TEMPLATE, SYSTEM, stop PARAMETERs and the generation defaults (config.GenConfig)."""
    system = settings.system.strip() or default_system
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    if system:
        if '"""' in system:
            raise BadInput(msg("export.ollama.system_quotes"), field="system")
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {_quote(stop)}" for stop in stops]
    # Ollama's names for tunebench's generation settings; top_k 0 means no limit in both.
    lines += [f"PARAMETER temperature {settings.temperature:g}",
              f"PARAMETER top_p {settings.top_p:g}",
              f"PARAMETER top_k {settings.top_k}",
              f"PARAMETER repeat_penalty {settings.repetition_penalty:g}",
              f"PARAMETER num_predict {settings.max_new_tokens}",
              f"PARAMETER seed {settings.seed}"]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_modelfile(gguf_file: Path, tokenizer, stops: list[str], settings=None) -> Path:
    """Write `Modelfile` beside `gguf_file`, after proving its TEMPLATE renders the probe
    conversation exactly as the tokenizer's Jinja template does."""
    from .config import GenConfig
    settings = settings or GenConfig()
    render = jinja_renderer(tokenizer)
    shape = chat_shape(render)
    template = go_template(shape)
    want = render(PROBE_CONVERSATION, True)
    got = render_go(template, PROBE_CONVERSATION, shape.default_system)
    if got != want:
        raise _unsupported(msg("export.ollama.renders", got=repr(got[:80]),
                               want=repr(want[:80])))
    path = Path(gguf_file).parent / "Modelfile"
    path.write_text(modelfile_text(Path(gguf_file).name, template, stops, settings,
                                   shape.default_system), encoding="utf-8")
    return path


def read_modelfile(path: Path) -> dict:
    """TEMPLATE, SYSTEM (or None) and the PARAMETER lines of a Modelfile written above."""
    text = Path(path).read_text(encoding="utf-8")
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    params: dict[str, list[str]] = {}
    for key, value in re.findall(r"^PARAMETER (\w+) (.*)$", text, re.M):
        params.setdefault(key, []).append(value)
    return {"from": re.search(r"^FROM (.*)$", text, re.M).group(1), "template": template,
            "system": system.group(1) if system else None, "parameters": params}


# --- a renderer of the Go template subset emitted above -------------------------------

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)


def render_go(template: str, messages: list[dict], system: str | None = None) -> str:
    """Render `template` as Ollama does for a chat: `.Messages` with Role and Content, the
    Modelfile's SYSTEM put first when the conversation has no system message.

    Supports what `go_template` writes: text, {{ .Field }}, {{ $v := expr }}, if / else
    if / else / end, range $i, $_ := expr, and the functions eq, ne, and, or, not, len,
    slice, index; plus {{- -}} trimming."""
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}] + list(messages)
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
            "System": system or ""}
    body, rest = _parse(_lex(template), 0)
    if rest != len(_lex(template)):
        raise ValueError("unbalanced {{ end }}")
    out: list[str] = []
    _exec(body, data, {"$": data}, out)
    return "".join(out)


def _lex(template: str) -> list[tuple[str, str]]:
    parts, pos = [], 0
    for match in _ACTION.finditer(template):
        text = template[pos:match.start()]
        if match.group(1):
            text = text.rstrip()
        parts.append(("text", text))
        parts.append(("action", match.group(2).strip()))
        pos = match.end()
        if match.group(3):
            pos += len(template[pos:]) - len(template[pos:].lstrip())
    parts.append(("text", template[pos:]))
    return [p for p in parts if p != ("text", "")]


def _parse(tokens: list, i: int, stop: tuple = ()) -> tuple[list, int]:
    """Nodes up to an action in `stop` (its index returned, not consumed)."""
    nodes = []
    while i < len(tokens):
        kind, value = tokens[i]
        word = value.split(" ", 1)[0] if kind == "action" else ""
        if kind == "action" and (word in stop or value.startswith("else")):
            return nodes, i
        if kind == "text":
            nodes.append(("text", value))
        elif word == "if":
            node, i = _parse_if(tokens, i)
            nodes.append(node)
        elif word == "range":
            head = re.fullmatch(r"range\s+(?:(\$\w+)\s*,\s*(\$\w+)\s*:=\s*)?(.+)", value)
            body, i = _parse(tokens, i + 1, ("end",))
            nodes.append(("range", head.group(1), head.group(2), head.group(3), body))
        elif word.startswith("$") and ":=" in value:
            name, expr = value.split(":=", 1)
            nodes.append(("set", name.strip(), expr.strip()))
        else:
            nodes.append(("out", value))
        i += 1
    return nodes, i


def _parse_if(tokens: list, i: int) -> tuple[tuple, int]:
    branches, cond = [], tokens[i][1][2:].strip()
    while True:
        body, i = _parse(tokens, i + 1, ("end",))
        branches.append((cond, body))
        value = tokens[i][1]
        if value == "end":
            return ("if", branches), i
        cond = value[len("else if"):].strip() if value.startswith("else if") else "true"


def _exec(nodes: list, dot, scope: dict, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "out":
            out.append(str(_eval(node[1], dot, scope)))
        elif node[0] == "set":
            scope[node[1]] = _eval(node[2], dot, scope)
        elif node[0] == "if":
            for cond, body in node[1]:
                if _truthy(_eval(cond, dot, scope)):
                    _exec(body, dot, scope, out)
                    break
        elif node[0] == "range":
            _, index_var, item_var, expr, body = node
            for i, item in enumerate(_eval(expr, dot, scope)):
                inner = dict(scope, **({index_var: i, item_var: item} if index_var else {}))
                _exec(body, item, inner, out)


_FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b,
    "and": lambda *a: next((x for x in a if not _truthy(x)), a[-1]),
    "or": lambda *a: next((x for x in a if _truthy(x)), a[-1]),
    "not": lambda a: not _truthy(a), "len": len, "index": lambda a, i: a[i],
    "slice": lambda a, i=0, j=None: a[i:j],
}


def _truthy(value) -> bool:
    return bool(value) and value != 0


def _eval(expr: str, dot, scope: dict):
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|\(|\)|[^\s()]+', expr)
    value, rest = _eval_tokens(tokens, dot, scope)
    if rest:
        raise ValueError(f"cannot evaluate {expr!r}")
    return value


def _eval_tokens(tokens: list[str], dot, scope: dict):
    """A command: a function and its arguments, or a single operand."""
    if tokens and tokens[0] in _FUNCS:
        args, rest = [], tokens[1:]
        while rest and rest[0] != ")":
            arg, rest = _operand(rest, dot, scope)
            args.append(arg)
        return _FUNCS[tokens[0]](*args), rest
    return _operand(tokens, dot, scope)


def _operand(tokens: list[str], dot, scope: dict):
    token, rest = tokens[0], tokens[1:]
    if token == "(":
        value, rest = _eval_tokens(rest, dot, scope)
        return value, rest[1:]  # the ")"
    if token.startswith('"'):
        return json.loads(token), rest
    if token.lstrip("-").isdigit():
        return int(token), rest
    if token in ("true", "false"):
        return token == "true", rest
    base, *fields = token.split(".")
    value = dot if base == "" else scope[base]
    for name in (f for f in fields if f):
        value = value[name]
    return value, rest
