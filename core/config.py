"""The one declaration of every training setting.

Each field of `TrainConfig` carries its type, default, bounds, help text and the
group it belongs to. The YAML loader, the CLI's KEY=VALUE overrides and the web
form are all derived from this file; nothing else declares a setting.

Loading goes: raw mapping -> `coerce` each value by its field's type and bounds
-> `TrainConfig` -> `validate` (cross-field rules). Any problem is `BadInput`,
raised before a model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import device, limits
from .errors import BadInput, Problems

GROUPS = ("model", "data", "method", "training", "run")
METHODS = ("lora", "qlora", "dora", "full", "freeze")
LORA_FAMILY = ("lora", "qlora", "dora")
DEMO_MODEL = "demo"


def setting(default: Any, help: str, group: str, *, min: float | None = None,
            max: float | None = None, choices: tuple | None = None, advanced: bool = False,
            methods: tuple[str, ...] | None = None, widget: str | None = None,
            max_len: int | None = None, path: bool = False) -> Any:
    """A dataclass field with the metadata every front end reads.

    `methods` limits a setting to some tuning methods (the form hides it otherwise);
    `advanced` folds it away in the form; `widget` overrides the widget guessed
    from the type ("slider", "textbox", ...). Text is at most `max_len` characters
    (each entry, for a list); a `path` setting is at most `limits.MAX_PATH_BYTES`
    bytes, with no file or folder name over the file system's limit. Text settings
    without a `max_len` get `limits.MAX_SETTING_CHARS`.
    """
    assert group in GROUPS, group
    if path:
        max_len = limits.MAX_PATH_BYTES
    elif max_len is None and isinstance(default, (str, list)):
        max_len = limits.MAX_SETTING_CHARS
    meta = dict(help=help, group=group, min=min, max=max, choices=choices,
                advanced=advanced, methods=methods, widget=widget, max_len=max_len, path=path)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- model -----------------------------------------------------------------
    model: str = setting(
        DEMO_MODEL, "Base model: a local folder, a hub id (when online), or 'demo' for the "
        "small model tunebench builds locally on first use.", "model", path=True)
    template: str = setting(
        "auto", "Chat template. 'auto' uses the tokenizer's own; name one for models without "
        "a template (alpaca, chatml, qwen, llama2, llama3, mistral).", "model",
        choices=("auto", "alpaca", "chatml", "qwen", "llama2", "llama3", "mistral"))
    booster: str = setting(
        "auto", "Attention implementation. 'auto' picks the fastest one installed and supported "
        "on this device.", "model",
        choices=("auto", "sdpa", "eager", "flash_attention_2", "liger"), advanced=True)
    rope_scaling: str = setting(
        "none", "Stretch the model's context with RoPE scaling (for cutoff_len beyond what it "
        "was trained on).", "model", choices=("none", "linear", "dynamic", "yarn", "llama3"),
        advanced=True)
    rope_factor: float = setting(2.0, "How many times longer the context becomes with RoPE "
                                 "scaling.", "model", min=1.0, max=64.0, advanced=True)
    trust_remote_code: bool = setting(
        False, "Run Python code shipped inside the model folder. Only enable for models you trust.",
        "model", advanced=True)

    # --- data ------------------------------------------------------------------
    dataset: list[str] = setting(
        ["identity"], "Datasets: names from <dataset_dir>/dataset_info.json, or file paths.",
        "data", path=True)
    dataset_dir: str = setting("data", "Folder holding dataset_info.json and the data files.",
                               "data", advanced=True, path=True)
    identity_name: str = setting("Tuney", "Fills {{name}} in datasets such as 'identity'.", "data",
                                 max_len=limits.MAX_NAME_CHARS)
    identity_author: str = setting("the tunebench team", "Fills {{author}} in datasets such as "
                                   "'identity'.", "data", max_len=limits.MAX_NAME_CHARS)
    cutoff_len: int = setting(1024, "Longest sequence in tokens. Longer examples are truncated, "
                              "keeping part of every response.", "data", min=16, max=262144)
    max_samples: int = setting(0, "Use at most this many records per dataset (0 = all).", "data",
                               min=0, advanced=True)
    val_size: float = setting(0.0, "Share of records held out for evaluation (0 = none).", "data",
                              min=0.0, max=0.5)
    packing: bool = setting(False, "Pack short examples into full sequences, padding-free; "
                            "examples never attend to each other.", "data", advanced=True)

    # --- method ----------------------------------------------------------------
    stage: str = setting("sft", "sft: supervised chat fine-tuning. pt: plain-text pre-training.",
                         "method", choices=("sft", "pt"))
    method: str = setting("lora", "lora/dora: small adapters; qlora: adapters on a 4- or 8-bit "
                          "base; full: every weight; freeze: only the last layers.", "method",
                          choices=METHODS)
    lora_rank: int = setting(32, "Adapter rank. Higher learns more and uses more memory.", "method",
                             min=1, max=1024, methods=LORA_FAMILY)
    lora_alpha: int = setting(64, "Adapter scale numerator; alpha/rank scales the update.",
                              "method", min=1, max=4096, methods=LORA_FAMILY)
    lora_dropout: float = setting(0.0, "Dropout on the adapter input.", "method", min=0.0,
                                  max=0.9, methods=LORA_FAMILY, advanced=True)
    lora_target: str = setting("all-linear", "Modules that get adapters: 'all-linear' or a "
                               "comma-separated list such as q_proj,v_proj.", "method",
                               methods=LORA_FAMILY, advanced=True,
                               max_len=limits.MAX_LORA_TARGET_CHARS)
    quant_bits: int = setting(4, "Bits of the quantized base model for QLoRA.", "method",
                              choices=(4, 8), methods=("qlora",))
    freeze_layers: int = setting(2, "Train only this many last transformer layers (and the "
                                 "output head).", "method", min=1, max=1024, methods=("freeze",))

    # --- training --------------------------------------------------------------
    epochs: float = setting(3.0, "Passes over the data.", "training", min=0.01, max=1000)
    learning_rate: float = setting(
        2e-4, "Peak learning rate. 1e-4..3e-4 suits LoRA on billion-parameter models; 1e-5 "
        "suits full tuning.", "training", min=1e-8, max=1.0)
    batch_size: int = setting(8, "Examples per device per step.", "training", min=1, max=4096)
    grad_accum: int = setting(1, "Steps accumulated before each optimizer update.", "training",
                              min=1, max=1024)
    lr_scheduler: str = setting("cosine", "How the learning rate changes over the run.",
                                "training", choices=("cosine", "linear", "constant",
                                                     "constant_with_warmup", "polynomial"),
                                advanced=True)
    warmup_ratio: float = setting(0.03, "Share of steps spent warming up the learning rate.",
                                  "training", min=0.0, max=1.0, advanced=True)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm (0 = off).", "training", min=0.0,
                                   max=1e6, advanced=True)
    weight_decay: float = setting(0.0, "AdamW weight decay.", "training", min=0.0, max=1.0,
                                  advanced=True)
    compute_type: str = setting(
        "auto", "Numeric precision. auto: bf16 where supported, else fp16 on GPU, else fp32. "
        "pure_bf16 keeps the weights in bf16 too.", "training",
        choices=("auto", "bf16", "fp16", "fp32", "pure_bf16"), advanced=True)
    optim: str = setting(
        "adamw_torch", "Optimizer. The 8-bit and paged ones (bitsandbytes) save memory on GPU.",
        "training", choices=("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
                             "adafactor", "sgd"), advanced=True)
    gradient_checkpointing: bool = setting(False, "Recompute activations in the backward pass: "
                                           "less memory, about 30% slower.", "training",
                                           advanced=True)
    seed: int = setting(42, "Random seed for data order and initialisation.", "training", min=0,
                        max=2**31 - 1, advanced=True)

    num_devices: int = setting(1, "Processes to train with, one per GPU (or CPU processes for "
                               "testing).", "training", min=1, max=1024, advanced=True)
    distributed: str = setting(
        "ddp", "How several devices share the work: ddp copies the model to each; fsdp and "
        "deepspeed shard it (GPU only).", "training",
        choices=("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"), advanced=True)

    # --- run -------------------------------------------------------------------
    logging_steps: int = setting(1, "Write a metrics line every this many steps.", "run", min=1,
                                 max=100000, advanced=True)
    save_steps: int = setting(0, "Save a checkpoint every this many steps (0 = about five "
                              "checkpoints spread over the run).",
                              "run", min=0, max=10**7, advanced=True)
    output_dir: str = setting("", "Run folder. Empty = saves/<run name>.", "run", path=True)
    run_name: str = setting("", "Run name. Empty = <method>-<date>-<time>.", "run", advanced=True,
                            max_len=limits.MAX_RUN_NAME_CHARS)
    resume: bool | str = setting(False, "true resumes from this run's last checkpoint; a path "
                                 "resumes from that checkpoint.", "run", advanced=True, path=True)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def fields_in(group: str) -> list[dataclasses.Field]:
    """The fields of one group, in declaration order (the order of the form)."""
    return [f for f in FIELDS.values() if f.metadata["group"] == group]


def default_value(name: str) -> Any:
    f = FIELDS[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


# --- coercion: one raw value -> the field's type --------------------------------

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _to_bool(raw: Any, name: str = "") -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise ValueError("expected true or false")


def _to_int(raw: Any, name: str = "") -> int:
    if isinstance(raw, bool):
        raise ValueError("expected a whole number")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str):
        try:
            return int(raw.strip())
        except ValueError:
            pass
    raise ValueError("expected a whole number")


def _to_float(raw: Any, name: str = "") -> float:
    if isinstance(raw, bool):
        raise ValueError("expected a number")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError("expected a number") from None
    except OverflowError:  # an integer with hundreds of digits
        raise ValueError("expected a finite number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number")
    return value


def _vet(name: str, text: str) -> str:
    """Refuse text the setting `name` cannot take (too long, control characters, lone
    surrogates, a path the file system would refuse) with a BadInput naming it."""
    meta = FIELDS[name].metadata
    if meta["path"]:
        return limits.check_path_text(text, name, meta["max_len"])
    return limits.check_text(text, name, meta["max_len"] or limits.MAX_SETTING_CHARS)


def _to_str(raw: Any, name: str) -> str:
    if isinstance(raw, (dict, list)) or raw is None:
        raise ValueError("expected text")
    return _vet(name, str(raw).strip())


def _to_str_list(raw: Any, name: str) -> list[str]:
    most = limits.MAX_LIST_ITEMS
    if isinstance(raw, str):
        parts = raw.split(",", most)  # never more than one piece past the limit
        if len(parts) > most:
            raise ValueError(f"more than {most} entries; the limit is {most}")
        items = [_vet(name, part.strip()) for part in parts]
    elif isinstance(raw, list):
        if len(raw) > most:
            raise ValueError(f"{len(raw):,} entries; the limit is {most}")
        items = [_to_str(item, name) for item in raw]
    else:
        raise ValueError("expected a list of names or paths")
    items = [item for item in items if item]
    if not items:
        raise ValueError("expected at least one entry")
    return items


def _to_bool_or_path(raw: Any, name: str) -> bool | str:
    try:
        return _to_bool(raw)
    except ValueError:
        return _to_str(raw, name)


# Each converter takes (raw value, setting name); only the text ones use the name,
# to look up the setting's length limit and to name it when refusing.
_COERCE = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str,
           list[str]: _to_str_list, bool | str: _to_bool_or_path}


def coerce(name: str, raw: Any) -> Any:
    """Convert one raw value (from YAML, the CLI or the form) to the field's type.

    Raises ValueError with a short reason, to which the caller adds the key name and
    the value; or, for text the setting cannot take, BadInput naming the key and
    quoting the value (`limits.check_text`).
    """
    meta = FIELDS[name].metadata
    value = _COERCE[_TYPES[name]](raw, name)
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ValueError("expected one of " + ", ".join(map(str, meta["choices"])))
    if meta["min"] is not None and value < meta["min"]:
        raise ValueError(f"must be at least {meta['min']:g}")
    if meta["max"] is not None and value > meta["max"]:
        raise ValueError(f"must be at most {meta['max']:g}")
    return value


def _unknown_key(key: Any, suggest: bool = True) -> str:
    """"unknown key 'x'", with the closest setting name when one is near."""
    text = key if isinstance(key, str) else limits.quote(key, 64)
    # difflib is quadratic in the key's length: only look for short, plausible keys
    close = difflib.get_close_matches(text, FIELDS, n=1) if suggest and len(text) <= 64 else []
    return f"unknown key {limits.quote(text, 64)}" + (
        f" (did you mean '{close[0]}'?)" if close else "")


def _capped(problems: list[str]) -> list[str]:
    """The first MAX_REPORTED_PROBLEMS problems, and a count of the rest."""
    most = limits.MAX_REPORTED_PROBLEMS
    if len(problems) <= most:
        return problems
    return problems[:most] + [f"... and {len(problems) - most:,} more problems"]


def from_mapping(raw: dict, source: str | None = None) -> TrainConfig:
    """Build a config from a plain mapping, collecting every problem before failing."""
    if not isinstance(raw, dict):
        raise BadInput("expected a mapping of key: value", file=source)
    problems, values = [], {}
    for key, value in raw.items():
        if key not in FIELDS:
            problems.append(_unknown_key(key, suggest=len(problems) < limits.MAX_REPORTED_PROBLEMS))
            continue
        try:
            values[key] = coerce(key, value)
        except BadInput as err:  # already names the problem and quotes the value
            problems.append(f"{key}: {err.what}")
        except ValueError as err:
            problems.append(f"{key}: {err} (got {limits.quote(value)})")
    if problems:
        raise Problems(_capped(problems), file=source)
    config = TrainConfig(**values)
    problems = validate(config)
    if problems:
        raise Problems(problems, file=source)
    return config


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """KEY=VALUE strings from the command line -> a mapping of raw strings."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"expected KEY=VALUE, got {limits.quote(pair)}")
        out[key.strip()] = value
    return out


class _ConfigLoader(yaml.SafeLoader):
    """yaml.safe_load's loader (never constructs Python objects), which also refuses a
    document that costs far more than its size: values longer than any setting, and
    aliases that expand past MAX_YAML_NODES values ("billion laughs"). Both are found
    on the composed node graph, which stays small because an alias shares its node,
    before a single Python object is built."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return self.construct_document(node)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a node graph that expands to more than MAX_YAML_NODES values.

    Iterative depth-first walk (a deeply nested file must not exhaust the stack);
    each distinct node's expanded size is computed once (memoised by id), so the
    walk costs the graph's size, not the expansion's.
    """
    most = limits.MAX_YAML_NODES
    sizes: dict[int, int] = {}
    on_path: set[int] = set()  # the nodes being expanded: meeting one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > most or len(sizes) > most:
                raise _too_big(len(sizes) > most, node)
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise BadInput("a YAML alias (*name) refers to a value that contains it; write the "
                           "values out")
        if isinstance(node, yaml.ScalarNode) and len(node.value) > limits.MAX_YAML_SCALAR_CHARS:
            raise BadInput(f"the value at line {node.start_mark.line + 1} is "
                           f"{len(node.value):,} characters long; the limit is "
                           f"{limits.MAX_YAML_SCALAR_CHARS:,}")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)


def _too_big(distinct: bool, node: yaml.Node) -> BadInput:
    most = limits.MAX_YAML_NODES
    if distinct:
        return BadInput(f"config has more than {most:,} values; a config needs about a hundred")
    return BadInput(f"config expands to more than {most:,} values through YAML aliases "
                    "(&anchor/*alias); write the values out")


def _short(text: str) -> str:
    """One line of at most MAX_QUOTE_CHARS characters (YAML's messages quote the input)."""
    text = " ".join(str(text).split())
    most = limits.MAX_QUOTE_CHARS
    return text if len(text) <= most else text[:most] + "…"


def _yaml_error(err: yaml.YAMLError) -> str:
    """A short "invalid YAML" message: where, and what PyYAML found, without its
    multi-line snippet of the file."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        mark = err.problem_mark
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        context = f"{_short(err.context)}: " if err.context else ""
        return f"invalid YAML{where}: {context}{_short(err.problem)}"
    return f"invalid YAML: {_short(str(err))}"


def _read_config_text(path: Path) -> str:
    """The file's text, refusing one larger than MAX_CONFIG_BYTES before reading it."""
    most = limits.MAX_CONFIG_BYTES
    try:
        size = path.stat().st_size
        if size > most:
            raise BadInput(f"config file is {size:,} bytes; the limit is {most:,} "
                           "(a config is a few KB)", file=str(path))
        with path.open("rb") as handle:
            data = handle.read(most + 1)  # bounded even if the file grows meanwhile
    except FileNotFoundError:
        raise BadInput("config file not found", file=str(path)) from None
    except IsADirectoryError as err:
        raise BadInput(f"cannot read config: {err}", file=str(path)) from None
    except (OSError, ValueError) as err:  # no permission, a NUL in the name
        raise BadInput(f"cannot read config: {getattr(err, 'strerror', None) or err}",
                       file=str(path)) from None
    if len(data) > most:
        raise BadInput(f"config file is over {most:,} bytes (a config is a few KB)",
                       file=str(path))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadInput(f"cannot read config: {err}", file=str(path)) from None


def read_yaml(path: str | Path) -> dict:
    """A YAML config file -> its mapping ({} for an empty file)."""
    path = Path(path)
    text = _read_config_text(path)
    try:
        raw = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise BadInput(_yaml_error(err), file=str(path)) from None
    except BadInput as err:
        raise BadInput(err.what, file=str(path)) from None
    except RecursionError:
        raise BadInput("invalid YAML: nested too deeply", file=str(path)) from None
    except ValueError as err:  # e.g. an integer with more digits than Python converts
        raise BadInput(f"invalid YAML: {_short(str(err))}", file=str(path)) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadInput("expected a mapping of key: value at the top level", file=str(path))
    return raw


def quickstart_values() -> dict:
    """The first job: the demo model learns an identity in about a minute on a CPU.

    The web form opens with these, and `tunebench train` without a config file uses
    them. They layer on the schema defaults, which stay right for real models
    (a tiny model needs a far higher learning rate and more epochs than a 7B one).
    """
    from .demo_model import RECOMMENDED_FINETUNE  # measured in core/demo_model.py

    return {"model": DEMO_MODEL, "dataset": ["identity"], **RECOMMENDED_FINETUNE}


def quickstart() -> TrainConfig:
    return from_mapping(quickstart_values())


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The CLI's path: YAML file (or, without one, the quick-start job), then KEY=VALUE
    overrides on top."""
    raw = read_yaml(path) if path else quickstart_values()
    raw.update(parse_overrides(overrides or []))
    return from_mapping(raw, source=str(path) if path else None)


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)


def changed(config: TrainConfig) -> dict:
    """Only the settings that differ from their defaults (what a command line needs)."""
    return {k: v for k, v in to_dict(config).items() if v != default_value(k)}


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


# --- cross-field rules: the one place they live ---------------------------------

def validate(config: TrainConfig, total_steps: int | None = None) -> list[str]:
    """Every rule that spans several settings or the machine. Empty list = fine.

    Shared by the CLI and the UI so both refuse the same things with the same words.
    `total_steps` is known only after the data is read; rules needing it run then.
    """
    problems = []
    if config.method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("method: qlora needs bitsandbytes (pip install bitsandbytes)")
    if config.stage == "pt" and config.template != "auto":
        problems.append("template: plain-text pre-training (stage: pt) does not use a chat template")
    if config.lora_target != "all-linear" and not all(
            part.strip().isidentifier() for part in config.lora_target.split(",")):
        problems.append("lora_target: expected 'all-linear' or module names such as q_proj,v_proj")
    if isinstance(config.resume, str) and not Path(config.resume).is_dir():
        problems.append(f"resume: checkpoint folder {limits.quote(config.resume)} does not exist")
    if config.run_name and not _is_safe_name(config.run_name):
        problems.append("run_name: use letters, digits, '-', '_' and '.' only")
    problems += _precision_problems(config)
    problems += _distributed_problems(config)
    problems += _booster_problems(config)
    if total_steps is not None and config.save_steps > total_steps:
        problems.append(f"save_steps: {config.save_steps} exceeds the run's {total_steps} "
                        "total steps, so no checkpoint would be saved")
    return problems


def _is_safe_name(name: str) -> bool:
    return all(c.isalnum() or c in "-_." for c in name) and not name.startswith(".")


def _precision_problems(config: TrainConfig) -> list[str]:
    dev = device.detect()
    if config.compute_type == "fp16" and dev.kind == "cpu":
        return ["compute_type: fp16 training needs a GPU; use auto or fp32 on CPU"]
    if config.compute_type in ("bf16", "pure_bf16") and dev.kind == "cuda" and not dev.bf16:
        return ["compute_type: this GPU does not support bf16; use fp16 or auto"]
    return []


def _distributed_problems(config: TrainConfig) -> list[str]:
    dev = device.detect()
    problems = []
    if config.num_devices > 1 and config.distributed != "ddp" and dev.kind != "cuda":
        problems.append(f"distributed: {config.distributed} needs GPUs; use ddp on CPU")
    if config.distributed.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None \
            and config.num_devices > 1:
        problems.append(f"distributed: {config.distributed} needs the deepspeed package "
                        "(pip install deepspeed)")
    if dev.kind == "cuda" and config.num_devices > dev.count:
        problems.append(f"num_devices: {config.num_devices} requested but this machine has "
                        f"{dev.count} GPU(s)")
    if config.optim in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit") and \
            importlib.util.find_spec("bitsandbytes") is None:
        problems.append(f"optim: {config.optim} needs bitsandbytes (pip install bitsandbytes)")
    return problems


def _booster_problems(config: TrainConfig) -> list[str]:
    if config.booster == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            return ["booster: flash_attention_2 needs the flash-attn package "
                    "(pip install 'tunebench[flash-attn]'), which needs an NVIDIA GPU"]
        if device.detect().kind != "cuda":
            return ["booster: flash_attention_2 needs an NVIDIA GPU; use auto or sdpa on CPU"]
    if config.booster == "liger" and importlib.util.find_spec("liger_kernel") is None:
        return ["booster: liger needs the liger-kernel package (pip install 'tunebench[liger]')"]
    return []
