"""Export a fine-tune as a merged model in one of several formats, and prove it works.

Reads top to bottom as the export runs:
  plan    check every input, the destination and the format (its library works here, it
          can write this architecture) before any weight is loaded
  load    the base + adapter (or the full checkpoint) in the export dtype
  source  the reference to compare with, taken on the source model (the format's own:
          one greedy chat turn, plus perplexity rows for the quantized formats)
  merge   fold the adapter into the base weights (PEFT merge_and_unload, in place)
  write   shard by shard into a hidden temp folder next to the destination
  convert the format's step from the merged folder (none for safetensors; quantize with
          bitsandbytes; llama.cpp's converter for GGUF), with the source freed
  verify  load the result as its users will and compare it with the reference
  publish rename the temp folder into place; nothing half-written is ever visible

Formats are rows of one table, FORMATS, sharing that path: each row says what it needs
installed, checks itself before any work, estimates its size, converts and verifies.

Memory: the model is held once. `save_pretrained(max_shard_size=...)` hands each
shard's tensors (views of the weights, no copies) to safetensors and drops them
before the next shard, so the peak is one model plus one shard's write buffer;
the verification reload happens after the source is freed.

A reward model (stage rm: an adapter with task type SEQ_CLS, or a sequence-
classification model folder) is exported the same way, as a model that
AutoModelForSequenceClassification loads; its "reference" and verification are its
scores of fixed replies to the probe prompts, since it generates nothing.

Progress lines go to stdout: plain text, or JSON lines when TUNEBENCH_PROGRESS=json
(the Export tab runs `tunebench export` as a subprocess and reads them).
"""

from __future__ import annotations

import errno
import functools
import gc
import json
import math
import os
import re
import resource
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from . import paths
from .config import EXPORT_DTYPES, EXPORT_FORMATS, GGUF_TYPES
from .errors import BadInput
from .i18n import Msg, msg, t, text_of
from .runs import now_iso

DTYPES = EXPORT_DTYPES  # declared once, with the export settings
PROBE = "Who are you?"
VERIFY_TOKENS = 48
# A reward model's verification: its scores of these replies to the chat probe prompts.
SCORE_REPLIES = ("I am an assistant fine-tuned with tunebench. How can I help?",
                 "I don't know.")
INDEX = "model.safetensors.index.json"
MERGED = ".merged"  # the full-precision merged folder a quantized format converts from
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def parse_size(text: str | int) -> int:
    """'500MB' -> 500_000_000, '2GiB' -> 2*2**30 (MB = 10**6, MiB = 2**20, as the hub counts)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    unit = match and match.group(2).upper()
    if unit and not unit.endswith("B"):
        unit += "B"  # "500M" means 500MB
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise BadInput(msg("export.size_expected", text=str(text)), field="shard_size")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 10**5:
        raise BadInput(msg("export.size_too_small", text=str(text)), field="shard_size")
    return size


def _header_margin(limit: int) -> int:
    """Room left in each shard for the safetensors JSON header, so files stay within `limit`."""
    return min(limit // 20, 256 * 1024)


# --- progress -------------------------------------------------------------------

class Reporter:
    """Progress lines for people, or JSON lines for the Export tab."""

    def __init__(self, as_json: bool | None = None):
        self.as_json = (os.environ.get("TUNEBENCH_PROGRESS") == "json"
                        if as_json is None else as_json)

    def step(self, fraction: float, message: "str | Msg") -> None:
        if self.as_json:
            print(json.dumps({"progress": round(fraction, 3), "message": text_of(message),
                              **message_record(message)}, ensure_ascii=False), flush=True)
        else:
            print(f"[{fraction:4.0%}] {message}", flush=True)

    def result(self, result: dict) -> None:
        if self.as_json:
            print(json.dumps({"result": result}, ensure_ascii=False), flush=True)
            return
        for check in result["checks"]:
            print(f"  {'ok  ' if check['ok'] else 'FAIL'} {check['name']}: {check['detail']}")
        print(t("export.result_line", **result_params(result)), flush=True)


def result_params(result: dict) -> dict:
    """The parameters of "export.result_line" (the one-line summary of a result)."""
    safetensors = result.get("format", "safetensors") == "safetensors"
    return {"state": msg("export.state.verified" if result["ok"] else "export.state.not_verified"),
            "out": result["out"], "shards": result["shards"],
            "files": msg("export.unit.shards" if safetensors else "export.unit.files"),
            "size_mb": result["size_mb"], "peak_rss_mb": result["peak_rss_mb"],
            "model_mb": result["model_mb"]}


def message_record(message: "str | Msg", key: str = "message_msg") -> dict:
    """{key: the language-neutral record} of a Msg (nothing for plain text), written beside
    its text so that the page can show a progress line in its visitor's language."""
    return {key: message.record()} if isinstance(message, Msg) else {}


# --- plan: every check before loading ----------------------------------------------

@dataclass
class Plan:
    model: str                 # as the user gave it ("demo", a folder, a hub id)
    base: str                  # resolved: what from_pretrained takes
    adapter: Path | None
    kind: str                  # "adapter", "full" (a whole-model checkpoint) or "model" (none)
    out: Path
    tmp: Path
    shard_bytes: int
    shard_size: str
    dtype: str
    overwrite: bool
    run_config: dict = field(default_factory=dict)
    head: str = "causal"       # "score": a reward model (stage rm), exported as one
    format: str = "safetensors"  # a row of FORMATS
    gguf_type: str = "q8_0"      # format gguf only

    @property
    def source(self) -> str:
        """The folder whose weights are exported."""
        return str(self.adapter) if self.kind == "full" else self.base


def plan_export(model: str, adapter: str | None, out: str, shard_size: str = "2GB",
                dtype: str = "auto", overwrite: bool = False, format: str = "safetensors",
                gguf_type: str = "q8_0") -> Plan:
    """Check the inputs, the destination and the format; no weights are loaded."""
    from .models import (check_adapter_fits, checkpoint_kind, is_reward_model, load_config,
                         resolve_model, run_config)

    if dtype not in DTYPES:
        raise BadInput(one_of(DTYPES, dtype), field="dtype")
    if format not in FORMATS:
        raise BadInput(one_of(FORMATS, format), field="format")
    if gguf_type not in GGUF_TYPES:
        raise BadInput(one_of(GGUF_TYPES, gguf_type), field="gguf_type")
    fmt = FORMATS[format]
    fmt.available()  # a missing extra fails first, naming what to install
    shard_bytes = parse_size(shard_size)
    ckpt = paths.guard(adapter, "checkpoint").resolve() if adapter else None
    kind = checkpoint_kind(ckpt) if ckpt else "model"
    base = resolve_model(model)
    if not str(out or "").strip():
        raise BadInput(msg("export.no_folder"), field="out")
    dest = paths.guard(out, "export folder").resolve()
    _check_destination(dest, [Path(base), ckpt], overwrite)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    _check_writable(tmp)
    if kind == "adapter":  # shapes against the base config: no weights loaded yet
        check_adapter_fits(base, load_config(base), ckpt)
    head = "score" if is_reward_model(ckpt if ckpt else base) else "causal"
    plan = Plan(model, base, ckpt, kind, dest, tmp, shard_bytes, str(shard_size), dtype,
                overwrite, run_config(ckpt) if ckpt else {}, head, format, gguf_type)
    if head == "score" and fmt.causal_only:
        raise BadInput(msg("export.reward_not_causal", format=format), field="format")
    fmt.check(plan)  # the library runs here, the architecture converts: before any work
    return plan


def one_of(choices, got) -> Msg:
    return msg("export.one_of", choices=", ".join(choices), got=str(got))


def _check_destination(dest: Path, sources: list, overwrite: bool) -> None:
    for source in sources:
        if source is not None and source.exists() and (
                dest == source.resolve() or source.resolve().is_relative_to(dest)):
            raise BadInput(msg("export.replaces_source"), file=str(dest))
    if dest.exists() and not dest.is_dir():
        raise BadInput(msg("export.file_in_way"), file=str(dest))
    if dest.is_dir() and any(dest.iterdir()):
        if not overwrite:
            raise BadInput(msg("export.exists"), file=str(dest))
        if not (dest / "config.json").is_file() and not any(dest.glob("*.gguf")):
            raise BadInput(msg("export.not_an_export"), file=str(dest))
    _remove_stale_temps(dest)


def _check_writable(tmp: Path) -> None:
    """Create (and remove) the temp folder once, so an unwritable place fails in seconds."""
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        tmp.rmdir()
    except OSError as err:
        raise BadInput(msg("export.cannot_write", reason=str(err.strerror or err)),
                       file=str(tmp.parent)) from None


def _remove_stale_temps(dest: Path) -> None:
    """Temp folders of earlier exports to `dest` whose process is gone (killed mid-write)."""
    import psutil
    if not dest.parent.is_dir():
        return
    for tmp in dest.parent.glob(f".{dest.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _make_temp(plan: Plan, needed_bytes: int) -> None:
    try:
        plan.tmp.mkdir(parents=True)
    except OSError as err:
        raise BadInput(msg("export.cannot_write", reason=str(err.strerror or err)),
                       file=str(plan.out.parent)) from None
    try:
        check_free_space(plan.out.parent, needed_bytes, plan.format)
    except BadInput:
        shutil.rmtree(plan.tmp, ignore_errors=True)
        raise


def check_free_space(folder: Path, needed_bytes: int, format: str = "safetensors") -> None:
    """BadInput when the disk holding `folder` (or its nearest existing parent) has less
    free space than the export needs, with 5% to spare. No torch: the page calls it too."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed_bytes * 1.05 > free:
        what = msg("export.disk_what.files" if format == "safetensors"
                   else "export.disk_what.merged")
        raise BadInput(msg("export.no_space", format=format, needed=needed_bytes / 1e9,
                           what=what, free=free / 1e9), file=str(folder))


# --- load, reference turn, merge ---------------------------------------------------

def export_dtype(plan: Plan):
    """auto = the dtype the source weights are stored in (fp32 when unrecorded): the one
    dtype policy's 'stored' (models.pick_dtype). Export always works on the CPU."""
    from .models import load_config, pick_dtype
    wanted = "stored" if plan.dtype == "auto" else plan.dtype
    return pick_dtype(wanted, load_config(plan.source), "cpu")


_ITEMSIZE = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


def source_sizes(source: str | Path, dtype: str = "auto") -> dict:
    """Sizes of a model folder from its files and config.json alone (no torch: the page
    shows them): parameters, embedding parameters, and the bytes per weight stored and
    after the export dtype. Zeros for a folder that is not here (a hub id)."""
    folder = Path(source)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"params": 0, "embed": 0, "stored": 4, "itemsize": 4}
    config = config.get("text_config") or config
    stored = _ITEMSIZE.get(str(config.get("dtype") or config.get("torch_dtype")), 4)
    files = folder.glob("*.safetensors")
    params = sum(f.stat().st_size for f in files) // stored
    embed = int(config.get("vocab_size") or 0) * int(config.get("hidden_size") or 0)
    embed *= 1 if config.get("tie_word_embeddings", True) else 2
    return {"params": params, "embed": min(embed, params), "stored": stored,
            "itemsize": stored if dtype == "auto" else _ITEMSIZE[dtype]}


def estimate(source: str | Path, format: str = "safetensors", gguf_type: str = "q8_0",
             dtype: str = "auto") -> dict:
    """{"merged", "output", "disk"} in bytes: the merged model, the export's files, and the
    disk the export needs while it runs (the merged folder stays until the converted
    files are written, for the formats that convert it)."""
    sizes = source_sizes(source, dtype)
    merged = sizes["params"] * sizes["itemsize"]
    fmt = FORMATS[format]
    output = int(fmt.size(sizes, gguf_type))
    scratch = int(fmt.scratch(sizes, gguf_type))
    return {"merged": merged, "output": output, "disk": output + scratch}


def estimate_bytes(plan: Plan) -> int:
    """The disk an export needs: its files, plus the merged intermediate where there is one."""
    return estimate(plan.source, plan.format, plan.gguf_type, plan.dtype)["disk"]


def load_source(plan: Plan, dtype, report: Reporter):
    """The model to export (adapter applied, not merged yet) and its tokenizer.

    Export always works on the CPU: it needs no GPU, and CPU RAM is what the memory goal
    is about.
    """
    from .models import load_checkpoint
    tokenizer, model = load_checkpoint(
        plan.base, plan.adapter, head=plan.head, dtype=dtype, device="cpu",
        progress=lambda message, fraction: report.step(0.05 + 0.15 * fraction, message))
    return model, tokenizer


def score_turns(model, tokenizer) -> list[float]:
    """A reward model's reference: its scores of SCORE_REPLIES to each chat probe prompt."""
    from .chat import DEFAULT_PROBES
    from .models import score_replies
    return [score for prompt in DEFAULT_PROBES
            for score in score_replies(model, tokenizer, prompt, list(SCORE_REPLIES))]


def greedy_turn(model, tokenizer, eos_ids: list[int] | None = None) -> dict:
    """One greedy chat turn on PROBE: the new tokens and the first step's logits."""
    import torch
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": PROBE}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    extra = {"eos_token_id": eos_ids} if eos_ids is not None else {}
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=VERIFY_TOKENS,
                             output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tokenizer.pad_token_id, **extra)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return {"tokens": tokens, "logits": [step[0].float().clone() for step in out.logits]}


def merge(model, plan: Plan, tokenizer):
    """Fold the adapter into the weights and set the stop tokens the template needs."""
    from .chat import stop_token_ids
    if plan.kind == "adapter":
        model = model.merge_and_unload()  # in place: no second copy of the weights
    if plan.head == "score":  # a reward model generates nothing: no stop tokens to set
        return model, []
    stops = stop_token_ids(tokenizer, model.generation_config)
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = True
    return model, stops


# --- write ------------------------------------------------------------------------

def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.state_dict().values())


def write_shards(model, tokenizer, plan: Plan, report: Reporter,
                 folder: Path | None = None) -> None:
    """save_pretrained shard by shard into the temp folder (or `folder`, the merged
    intermediate of a converting format), reporting each shard as it lands."""
    folder = folder or plan.tmp
    total = math.ceil(model_bytes(model) / (plan.shard_bytes - _header_margin(plan.shard_bytes)))
    done = threading.Event()

    def watch():
        seen = 0
        while not done.wait(0.3):
            count = len(list(folder.glob("model*.safetensors")))
            if count != seen:
                seen = count
                report.step(0.35 + 0.3 * min(count / max(total, 1), 1.0),
                            msg("export.step.shard", count=count, total=total))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        model.save_pretrained(folder, max_shard_size=plan.shard_bytes
                              - _header_margin(plan.shard_bytes))
        tokenizer.save_pretrained(folder)
        carry_recommendations(Path(plan.base), folder)
    finally:
        done.set()
        watcher.join()


def carry_recommendations(base: Path, out: Path) -> None:
    """Copy the base's recommended training settings (config.RECOMMENDED_FILE) into the
    export: the merged model has its base's size and shape, so the settings measured for
    the base are the best start for its next stage (SFT, export, then DPO on the export)."""
    from .config import RECOMMENDED_FILE
    if (base / RECOMMENDED_FILE).is_file():
        shutil.copyfile(base / RECOMMENDED_FILE, out / RECOMMENDED_FILE)


# --- verify -----------------------------------------------------------------------

def _check(name: "str | Msg", ok: bool, detail: "str | Msg") -> dict:
    """One verification line: its text in the current language and, for Msgs, their
    records (name_msg, detail_msg), so that the page shows it in its visitor's language."""
    return {"name": text_of(name), "ok": bool(ok), "detail": text_of(detail),
            **message_record(name, "name_msg"), **message_record(detail, "detail_msg")}


def joined(parts: list) -> "Msg | str":
    """Several findings as one message, separated by "; " (each may be a Msg)."""
    if len(parts) == 1:
        return parts[0]
    return msg("export.joined", first=parts[0], rest=joined(parts[1:]))


def check_shards(folder: Path, limit: int) -> dict:
    """Every shard within `limit` (unless one tensor alone is bigger) and listed in the index."""
    from safetensors import safe_open

    files = sorted(p.name for p in folder.glob("*.safetensors"))
    index_path = folder / INDEX
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    else:
        weight_map = {}
        if files == ["model.safetensors"]:
            with safe_open(str(folder / files[0]), framework="pt") as fh:
                weight_map = {k: files[0] for k in fh.keys()}
    problems, oversized = [], []
    listed = set(weight_map.values())
    problems += [msg("export.shard.unlisted", file=f) for f in files if f not in listed]
    problems += [msg("export.shard.missing", file=f) for f in sorted(listed) if f not in files]
    for name in files:
        with safe_open(str(folder / name), framework="pt") as fh:
            keys = list(fh.keys())
        problems += [msg("export.shard.misplaced", key=k, file=name, index=str(weight_map.get(k)))
                     for k in keys if weight_map.get(k) != name]
        size = (folder / name).stat().st_size
        if size > limit:
            (oversized if len(keys) == 1 else problems).append(
                msg("export.shard.oversized", file=name, size=size / 1e6, limit=limit / 1e6))
    largest = max((folder / f).stat().st_size for f in files) if files else 0
    detail = msg("export.shard.detail", shards=len(files), largest=largest / 1e6,
                 limit=limit / 1e6)
    if oversized:
        detail = msg("export.shard.detail_oversized", detail=detail, oversized=joined(oversized))
    return _check(msg("export.check.shards"), not problems,
                  joined(problems[:3]) if problems else detail)


def verify(folder: Path, dtype, reference: dict | list | None, stops: list[int], limit: int,
           report: Reporter, head: str = "causal") -> list[dict]:
    """Reload the export as a model folder (transformers' from_pretrained, through the one
    loader, as chat or scoring will load it) and compare it with the source model."""
    from .models import load_checkpoint

    checks = [check_shards(folder, limit)]
    report.step(0.75, msg("export.step.reloading"))
    try:
        tokenizer, model = load_checkpoint(str(folder), head=head, dtype=dtype, device="cpu")
    except Exception as err:  # noqa: BLE001 - a failed reload is the finding, not a crash
        return checks + [_check(msg("export.check.reloads"), False,
                                msg("text", text=f"{type(err).__name__}: {text_of(err)}"))]
    checks.append(_check(msg("export.check.reloads"), True,
                         msg("export.reloads.detail", cls=type(model).__name__,
                             params=sum(p.numel() for p in model.parameters()))))
    if head == "score":
        return checks + _verify_scores(folder, model, tokenizer, reference, dtype, report)
    saved_eos = model.generation_config.eos_token_id
    saved_eos = saved_eos if isinstance(saved_eos, list) else [saved_eos]
    names = ", ".join(tokenizer.convert_ids_to_tokens(i) for i in stops)
    checks.append(_check(msg("export.check.stops"), set(stops) <= set(saved_eos),
                         msg("export.stops.detail", eos=str(saved_eos), names=names)))
    if reference is None:
        return checks
    report.step(0.85, msg("export.step.greedy"))
    got = greedy_turn(model, tokenizer)  # with the export's own generation config
    checks += compare_turns(reference, got, tokenizer, set(saved_eos))
    return checks


def _verify_scores(folder: Path, model, tokenizer, reference: list | None, dtype,
                   report: Reporter) -> list[dict]:
    """A reward model's checks: it is saved as one, and it scores as the source did."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    arch = ", ".join(config.get("architectures") or ["none"])
    is_rm = arch.endswith("ForSequenceClassification") and model.config.num_labels == 1
    checks = [_check(msg("export.check.reward"), is_rm and config.get("pad_token_id") is not None,
                     msg("export.reward.detail", arch=arch, labels=model.config.num_labels,
                         pad=str(config.get("pad_token_id"))))]
    if reference is None:
        return checks
    report.step(0.85, msg("export.step.scores"))
    return checks + [compare_scores(reference, score_turns(model, tokenizer), dtype)]


def compare_scores(reference: list[float], got: list[float], dtype) -> dict:
    """Same scores as the source, within what merging can change at this precision: in
    fp32 only summation order (1e-4 of the scores' size), in bf16/fp16 the merged weights
    round differently from base + adapter (a few percent)."""
    import torch
    size = max([abs(x) for x in reference] + [1.0])
    tolerance = (1e-4 if dtype == torch.float32 else 5e-2) * size
    diff = max((abs(a - b) for a, b in zip(reference, got)), default=0.0)
    ok = len(reference) == len(got) and diff <= tolerance
    return _check(msg("export.check.scores"), ok,
                  msg("export.scores.detail", n=len(got), diff=diff, tolerance=tolerance,
                      got=got[0], want=reference[0])
                  if got and reference else msg("export.scores.none"))


def compare_turns(reference: dict, got: dict, tokenizer, eos: set[int]) -> list[dict]:
    """Same greedy tokens as the source, allowing only a rounding tie to be broken differently.

    In bf16/fp16 the merged weights round differently from base + adapter, so where the
    source's two best tokens are closer than that rounding (margin <= 2 x the logit
    difference at that step) greedy may pick the other one. Anywhere else, a different
    token means the export is not the same model.
    """
    ref, new = reference["tokens"], got["tokens"]
    diff = float((reference["logits"][0] - got["logits"][0]).abs().max())
    text = tokenizer.decode(new, skip_special_tokens=True)[:80]
    greedy = msg("export.check.greedy")
    if ref == new:
        same = _check(greedy, True, msg("export.greedy.same", n=len(new), diff=diff,
                                      text=repr(text)))
    else:
        at = next((i for i, (a, b) in enumerate(zip(ref, new)) if a != b), min(len(ref), len(new)))
        same = _check(greedy, False, msg("export.greedy.differs", at=at, n=len(ref), diff=diff))
        if at < min(len(ref), len(new)):
            step_ref, step_new = reference["logits"][at], got["logits"][at]
            margin = float(step_ref[ref[at]] - step_ref[new[at]])
            noise = float((step_ref - step_new).abs().max())
            if margin <= 2 * noise:
                same = _check(greedy, True, msg("export.greedy.tie", at=at, margin=margin,
                                              noise=noise))
    name = msg("export.check.eos")
    if new and new[-1] in eos:
        end = tokenizer.convert_ids_to_tokens(new[-1])
        stops = _check(name, True, msg("export.eos.ends", end=str(end), n=len(new)))
    elif ref and ref[-1] in eos and ref == new[:len(ref)]:
        stops = _check(name, False, msg("export.eos.missed", n=len(ref)))
    else:
        stops = _check(name, True, msg("export.eos.unobserved", n=VERIFY_TOKENS))
    return [same, stops]


# --- card and publish ----------------------------------------------------------------

def method_of(plan: Plan) -> str:
    if plan.run_config.get("method"):
        return str(plan.run_config["method"])
    if plan.kind == "adapter":
        config = json.loads((plan.adapter / "adapter_config.json").read_text("utf-8"))
        return "dora" if config.get("use_dora") else str(config.get("peft_type", "lora")).lower()
    return "full" if plan.kind == "full" else "none (base model re-saved)"


def write_card(folder: Path, plan: Plan, result: dict) -> None:
    """A short README.md model card: what it was made from, how, and the verification."""
    checks = "\n".join(f"- {'✅' if c['ok'] else '❌'} {c['name']}: {c['detail']}"
                       for c in result["checks"]) or "- not run (--no-verify)"
    config = yaml.safe_dump(plan.run_config, sort_keys=False, allow_unicode=True).strip()
    method = method_of(plan)
    stage = plan.run_config.get("stage")
    reward = plan.head == "score"
    fmt = FORMATS[plan.format]
    weights = (f"Weights: {result['dtype']}, {result['shards']} safetensors shard(s) of at most "
               f"{plan.shard_size}, {result['size_mb']:.1f} MB" if plan.format == "safetensors"
               else f"Weights: {result['weights']}, {result['shards']} file(s), "
               f"{result['size_mb']:.1f} MB (merged in {result['dtype']})")
    facts = [
        f"Base model: `{plan.model}`" + (f" ({plan.base})" if plan.base != plan.model else ""),
        f"Fine-tune: `{plan.adapter or 'none'}`" + (f", stage {stage}" if stage else ""),
        f"Method: {method}" + (" (adapter merged into the base weights)"
                               if plan.kind == "adapter" else ""),
        weights,
        "Reward model: one score per reply (higher = better); loads with "
        "AutoModelForSequenceClassification" if reward else
        f"Stop tokens (generation_config.json): {', '.join(result['stop_tokens'])}",
        f"Export peak memory: {result['peak_rss_mb']:.0f} MB resident for a "
        f"{result['model_mb']:.0f} MB model (process baseline {result['baseline_rss_mb']:.0f} MB)"]
    tags = ["tunebench", method.split()[0]] + (["reward-model"] if reward else [])
    files = [Path(f).name for f in result.get("files", [])]
    text = CARD.format(
        tags=", ".join(tags + [plan.format]), name=plan.out.name, when=now_iso(),
        library=fmt.library, facts="\n".join(f"- {fact}" for fact in facts), checks=checks,
        use=(SCORE_USE if reward else fmt.use).format(
            name=plan.out.name, probe=PROBE, reply=SCORE_REPLIES[0],
            file=files[0] if files else "model.gguf"),
        config=config or "# not recorded (the checkpoint is not inside a tunebench run folder)")
    (folder / "README.md").write_text(text, encoding="utf-8")


CHAT_USE = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{name}")
model = AutoModelForCausalLM.from_pretrained("{name}")
messages = [{{"role": "user", "content": "{probe}"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)
reply = model.generate(**inputs, max_new_tokens=64)[0, inputs["input_ids"].shape[1]:]
print(tokenizer.decode(reply, skip_special_tokens=True))
```"""

SCORE_USE = """A reward model: it scores a reply to a prompt (higher = better); it does not write replies.
Use it as a reward model for GRPO (tunebench's `reward_model`, or TRL's `reward_funcs`),
or score replies directly:

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{name}")
model = AutoModelForSequenceClassification.from_pretrained("{name}")
messages = [{{"role": "user", "content": "{probe}"}},
            {{"role": "assistant", "content": "{reply}"}}]
inputs = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)
print(model(**inputs).logits[0, 0].item())  # the score
```"""

BNB_USE = CHAT_USE + """

Loading needs bitsandbytes installed (`pip install bitsandbytes`); the quantization settings
are in config.json. On a CPU, `torch.set_num_threads(1)` (or OMP_WAIT_POLICY=PASSIVE) avoids
a slow 4-bit decode when other processes keep the cores busy."""

GGUF_USE = """With llama.cpp:
```shell
llama-cli -m {file} -cnv
```
With Ollama (the Modelfile beside the file carries the chat template, its stop tokens and
the default generation settings):
```shell
ollama create {name} -f Modelfile
ollama run {name} "{probe}"
```
With llama-cpp-python:
```python
from llama_cpp import Llama
llm = Llama("{file}")
print(llm.create_chat_completion([{{"role": "user", "content": "{probe}"}}])["choices"][0])
```
On CPUs with AMX (Intel Sapphire Rapids and later), llama-cpp-python 0.3.36 crashes on the
first token of a quantized file (llama.cpp issue #20824). Turn off llama.cpp's extra weight
buffers before loading:
```python
import llama_cpp.llama_cpp as low
defaults = low.llama_model_default_params
def plain_buffers():
    params = defaults()
    params.use_extra_bufts = False
    return params
low.llama_model_default_params = plain_buffers
```"""

CARD = """---
library_name: {library}
tags: [{tags}]
---
# {name}

Exported by tunebench on {when}.

{facts}

## Verification
{checks}

## Use
{use}

## Training config
```yaml
{config}
```
"""


def publish(plan: Plan) -> None:
    """Rename the finished temp folder into place; an old export is moved aside first."""
    old = plan.out.parent / f".{plan.out.name}.old-{os.getpid()}"
    if plan.out.exists():
        if not plan.overwrite and any(plan.out.iterdir()):
            raise BadInput(msg("export.appeared"), file=str(plan.out))
        os.rename(plan.out, old)
    os.rename(plan.tmp, plan.out)
    shutil.rmtree(old, ignore_errors=True)


# --- the whole export -----------------------------------------------------------------

def _rss_mb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def export(plan: Plan, verify_after: bool = True, report: Reporter | None = None) -> dict:
    """Run a planned export. Returns the result (also written into the model card)."""
    report = report or Reporter()
    import peft  # noqa: F401 - the libraries count as baseline, the model does not
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401
    baseline = _rss_mb()
    fmt = FORMATS[plan.format]
    dtype = export_dtype(plan)
    _make_temp(plan, estimate_bytes(plan))  # an unwritable or full disk fails first
    try:
        model, tokenizer = load_source(plan, dtype, report)
        reference = fmt.reference(model, tokenizer, plan, report) if verify_after else None
        report.step(0.3, msg("export.step.merging" if plan.kind == "adapter"
                             else "export.step.preparing"))
        model, stops = merge(model, plan, tokenizer)
        size = model_bytes(model)  # what is exported (the adapter is folded in by now)
        merged = plan.tmp if fmt.name == "safetensors" else plan.tmp / MERGED
        _write_or_explain(plan, functools.partial(write_shards, model, tokenizer, plan, report,
                                                  merged))
        del model
        gc.collect()  # the source is freed before converting: one model in memory at a time
        notes = _write_or_explain(plan, lambda: fmt.convert(plan, merged, tokenizer, stops,
                                                            report))
        if merged != plan.tmp:
            shutil.rmtree(merged)
        checks = (fmt.verify(plan, reference, tokenizer, stops, dtype, report)
                  if verify_after else [])
        result = _result(plan, dtype, size, baseline, checks + notes, stops, tokenizer)
        result["verified"] = bool(checks)
        _write_or_explain(plan, lambda: write_card(plan.tmp, plan, result))
        if result["ok"]:
            report.step(0.97, msg("export.step.publishing", out=str(plan.out)))
            publish(plan)
        return result
    finally:
        shutil.rmtree(plan.tmp, ignore_errors=True)  # gone after publish; else never visible


def _reference(model, tokenizer, plan: Plan, report: Reporter):
    """What the export is compared with: the source's greedy turn, or a reward model's
    scores on the probe prompts."""
    if plan.head == "score":
        report.step(0.25, msg("export.step.reference_scores"))
        return score_turns(model, tokenizer)
    report.step(0.25, msg("export.step.reference_turn"))
    from .chat import stop_token_ids
    return greedy_turn(model, tokenizer, stop_token_ids(tokenizer, model.generation_config))


def _write_or_explain(plan: Plan, write: Callable[[], Any]) -> Any:
    """Run a writing step; a full disk becomes a clear BadInput instead of a traceback."""
    try:
        return write()
    except Exception as err:  # noqa: BLE001 - safetensors reports I/O errors as its own type
        # numpy's tofile (llama.cpp's GGUF writer) reports a short write without an errno
        if getattr(err, "errno", None) in _DISK_FULL or any(
                word in str(err) for word in ("No space left", "File too large", "Disk quota")
        ) or (isinstance(err, OSError) and re.search(r"\d+ requested and \d+ written", str(err))):
            raise BadInput(msg("export.disk_full", detail=str(err).splitlines()[0][:120]),
                           file=str(plan.out)) from None
        raise


def _result(plan: Plan, dtype, size: int, baseline: float, checks: list[dict], stops: list[int],
            tokenizer) -> dict:
    fmt = FORMATS[plan.format]
    files = sorted(plan.tmp.glob(fmt.files))
    torch_dtype = str(dtype).replace("torch.", "")
    return {"ok": all(c["ok"] for c in checks), "out": str(plan.out), "checks": checks,
            "verified": bool(checks), "format": plan.format,
            "gguf_type": plan.gguf_type if plan.format == "gguf" else None,
            "weights": fmt.weights(plan) or torch_dtype,
            "files": [str(plan.out / f.name) for f in files], "shards": len(files),
            "size_mb": sum(p.stat().st_size for p in files) / 1e6,
            "dtype": torch_dtype, "model_mb": size / 2**20,
            "peak_rss_mb": _peak_rss_mb(), "baseline_rss_mb": baseline,
            "stop_tokens": tokenizer.convert_ids_to_tokens(stops)}


def main(model: str, adapter: str | None, out: str, shard_size: str = "2GB", dtype: str = "auto",
         verify: bool = True, overwrite: bool = False, format: str = "safetensors",
         gguf_type: str = "q8_0", report: Reporter | None = None) -> int:
    """`tunebench export`: 0 when written (and verified), 1 when verification failed."""
    report = report or Reporter()
    plan = plan_export(model, adapter, out, shard_size, dtype, overwrite, format, gguf_type)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a cancelled export cleans up too
    try:
        result = export(plan, verify_after=verify, report=report)
    finally:
        signal.signal(signal.SIGTERM, previous)
    report.step(1.0, msg("export.step.done" if result["ok"] else "export.not_verified"))
    report.result(result)
    return 0 if result["ok"] else 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


# --- the formats: rows of one table ------------------------------------------------------
# Each row plugs into the one path of export(): what it needs installed, its check before
# any work, its size, its reference taken on the source, its conversion of the merged
# folder, and its verification. A new format is a new row, not a new branch.

def _none(*args) -> list:
    return []


def _no_scratch(sizes: dict, gguf_type: str) -> int:
    return 0


def _merged_size(sizes: dict, gguf_type: str = "") -> int:
    return sizes["params"] * sizes["itemsize"]


def _verify_safetensors(plan: Plan, reference, tokenizer, stops, dtype, report) -> list[dict]:
    return verify(plan.tmp, dtype, reference, stops, plan.shard_bytes, report, plan.head)


# bitsandbytes: linear layers quantized; embeddings, norms and a tied lm_head keep the dtype.
_BNB_BYTES = {"bnb-4bit": 0.55, "bnb-8bit": 1.05}  # per linear weight, with the scales


def _bnb_size(kind: str) -> Callable[[dict, str], int]:
    return lambda sizes, _: (sizes["embed"] * sizes["itemsize"]
                             + (sizes["params"] - sizes["embed"]) * _BNB_BYTES[kind])


def _bnb_check(plan: Plan) -> None:
    from . import bnb_export
    bnb_export.check_available(plan.format)


def _bnb_reference(model, tokenizer, plan: Plan, report: Reporter) -> dict:
    from . import bnb_export
    turn = _reference(model, tokenizer, plan, report)
    identity = (plan.run_config.get("identity_name"), plan.run_config.get("identity_author"))
    report.step(0.27, msg("export.step.reference_rows"))
    return {"turn": turn, "rows": bnb_export.reference_rows(
        model, tokenizer, identity if all(identity) else None)}


def _bnb_convert(plan: Plan, merged: Path, tokenizer, stops, report: Reporter) -> list[dict]:
    from . import bnb_export
    bnb_export.quantize_folder(merged, plan.tmp, plan.format,
                               progress=lambda message, f: report.step(0.65 + 0.1 * f, message))
    return []


def _bnb_verify(plan: Plan, reference, tokenizer, stops, dtype, report) -> list[dict]:
    from . import bnb_export
    report.step(0.8, msg("export.step.reloading_format", format=plan.format))
    return bnb_export.verify_quantized(plan.tmp, reference["turn"], tokenizer, reference["rows"])


# GGUF: bytes per weight of each type (q4_k_m mixes q4_k with q6_k, and falls back to
# larger types where a row is not a multiple of 256).
_GGUF_BYTES = {"f16": 2.0, "bf16": 2.0, "q8_0": 1.07, "q4_k_m": 0.7}


def gguf_file(plan: Plan) -> Path:
    return plan.tmp / f"{plan.out.name}-{plan.gguf_type}.gguf"


def _gguf_size(sizes: dict, gguf_type: str) -> int:
    return sizes["params"] * _GGUF_BYTES[gguf_type]


def _gguf_scratch(sizes: dict, gguf_type: str) -> int:
    """The merged folder, and for the k-quants the 16-bit GGUF they are quantized from."""
    half = sizes["params"] * 2 if gguf_type == "q4_k_m" else 0
    return _merged_size(sizes) + half


def _gguf_check(plan: Plan) -> None:
    from . import gguf_export
    gguf_export.check_convertible(plan.source)


def _gguf_reference(model, tokenizer, plan: Plan, report: Reporter) -> dict:
    from . import gguf_export
    from .chat import stop_token_ids
    report.step(0.25, msg("export.step.reference_gguf"))
    return gguf_export.reference(model, tokenizer,
                                 stop_token_ids(tokenizer, model.generation_config))


def _gguf_convert(plan: Plan, merged: Path, tokenizer, stops, report: Reporter) -> list[dict]:
    """The .gguf from the merged folder, and the Ollama Modelfile beside it. A chat template
    that Ollama's template language cannot express leaves the Modelfile out, saying why."""
    from . import gguf_export, ollama
    target = gguf_file(plan)
    gguf_export.convert(merged, target, plan.gguf_type, name=plan.out.name,
                        progress=lambda message, f: report.step(0.65 + 0.1 * f, message))
    try:
        ollama.write_modelfile(target, tokenizer, tokenizer.convert_ids_to_tokens(stops))
        return [_check(msg("export.check.modelfile"), True, msg(
            "export.modelfile.written", stops=", ".join(tokenizer.convert_ids_to_tokens(stops))))]
    except BadInput as err:
        return [_check(msg("export.check.modelfile"), True,
                       msg("export.modelfile.skipped", why=err.what))]


def _gguf_verify(plan: Plan, reference, tokenizer, stops, dtype, report) -> list[dict]:
    from . import gguf_export
    report.step(0.8, msg("export.step.verify_gguf"))
    return gguf_export.verify_gguf(gguf_file(plan), tokenizer, reference, plan.gguf_type)


@dataclass(frozen=True)
class Format:
    name: str
    needs: tuple[str, ...]      # modules it imports (found with find_spec: nothing loads)
    install: str                # what to install when one is missing
    causal_only: bool           # a reward model (stage rm) cannot be written in it
    check: Callable[[Plan], None]          # before any work: BadInput if it cannot be done
    size: Callable[[dict, str], float]     # its files' bytes, from source_sizes()
    scratch: Callable[[dict, str], float]  # more disk while it runs (the merged folder)
    reference: Callable                    # (model, tokenizer, plan, report): on the source
    convert: Callable                      # (plan, merged, tokenizer, stops, report) -> notes
    verify: Callable                       # (plan, ref, tokenizer, stops, dtype, report)
    files: str                             # glob of its weight files in the folder
    weights: Callable[[Plan], str | None]  # what the weights are, for people
    library: str                           # the model card's library_name
    use: str                               # the model card's "Use" section

    def missing(self) -> Msg | None:
        """Why this format cannot be written here (a library is not installed), or None."""
        import importlib.util
        gone = [name for name in self.needs if importlib.util.find_spec(name) is None]
        return msg("export.format_missing", format=self.name, gone=" and ".join(gone),
                   install=self.install) if gone else None

    def available(self) -> None:
        problem = self.missing()
        if problem:
            raise BadInput(problem, field="format")


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("safetensors", (), "", False, lambda plan: None, _merged_size, _no_scratch,
           _reference, _none, _verify_safetensors, "*.safetensors", lambda plan: None,
           "transformers", CHAT_USE),
    *(Format(kind, ("bitsandbytes", "accelerate"), "pip install 'bitsandbytes>=0.46.1' accelerate", True,
             _bnb_check, _bnb_size(kind), _merged_size, _bnb_reference, _bnb_convert,
             _bnb_verify, "*.safetensors",
             lambda plan: {"bnb-4bit": "nf4 4-bit", "bnb-8bit": "int8"}[plan.format]
             + " (bitsandbytes)", "transformers", BNB_USE)
      for kind in ("bnb-4bit", "bnb-8bit")),
    Format("gguf", ("llama_cpp", "sentencepiece"), "pip install 'tunebench[gguf]'", True,
           _gguf_check, _gguf_size, _gguf_scratch, _gguf_reference, _gguf_convert,
           _gguf_verify, "*.gguf", lambda plan: f"GGUF {plan.gguf_type}", "gguf", GGUF_USE),
)}
assert tuple(FORMATS) == EXPORT_FORMATS, "config.EXPORT_FORMATS lists the rows of FORMATS"
