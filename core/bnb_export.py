"""Export a merged model quantized with bitsandbytes (4-bit NF4 or 8-bit LLM.int8), verified
by agreement with the source rather than equality.

What core/export.py calls, in order (the merge and the safetensors write are its own):
  check_available(kind)   at plan time: bitsandbytes is installed and runs on this CPU
  reference_rows(...)     with the source still loaded, beside export.greedy_turn: the
                          source's loss on a few bundled identity rows
  quantize_folder(...)    after the merged folder is written and the source freed:
                          from_pretrained with a BitsAndBytesConfig, then save_pretrained
  verify_quantized(...)   reload the quantized folder with plain from_pretrained (the
                          quantization_config saved in config.json does the rest), compare

Quantized weights round differently from the source, so "the same greedy tokens" is too
strict; the export must agree with the source on most greedy tokens (teacher-forced on
the source's own reply, so one early tie cannot sink the rest) and keep its perplexity
close. The thresholds below are set from measurements.

Everything runs on the CPU, as the rest of export does: bitsandbytes 0.50 quantizes, saves,
reloads and generates in both formats on the CPU (measured with transformers 5.24 and torch
2.13), and the folder it writes is the same one a GPU loads.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from .errors import BadInput
from .i18n import msg

KINDS = ("bnb-4bit", "bnb-8bit")
# Files save_pretrained writes itself; every other file of the merged folder (tokenizer,
# chat template, recommended settings) is copied as it is.
_WRITTEN = ("config.json", "generation_config.json", "model.safetensors.index.json")

# Verification thresholds, from measurements on the demo model and four identity fine-tunes
# of it (LoRA, DoRA, full, freeze; fp32, and the LoRA one in bf16), on the five chat probes:
# - agreement: the share of the source's greedy reply tokens that are also the export's
#   greedy choice, teacher-forced. Measured 1.00 everywhere except one near-tie in 4-bit
#   (0.94: 16 of 17). The wrong model (the base instead of the fine-tune, as when an
#   adapter is never merged) scored at most 0.59, so the limits sit between, with room
#   for the larger quantization error of models wider than the demo's 256.
# - perplexity on PERPLEXITY_ROWS identity rows, |ppl_export / ppl_source - 1|: measured at
#   most 0.8% in 4-bit and 0.1% in 8-bit; published NF4 results on sub-1B models reach
#   ~10-15% (LLM.int8 stays under 1%). The wrong model measured +1800%.
MIN_TOKEN_AGREEMENT = {"bnb-8bit": 0.90, "bnb-4bit": 0.80}
MAX_PERPLEXITY_CHANGE = {"bnb-8bit": 0.05, "bnb-4bit": 0.20}
PERPLEXITY_ROWS = 8  # identity rows spread over the file (6 English, 2 Chinese), one turn each
BNB_LOGGER = "bitsandbytes"

ProgressFn = Callable[[Any, float], None]  # (message: str or Msg, fraction)


# --- check ------------------------------------------------------------------------------

def check_available(kind: str) -> None:
    """BadInput, saying what to install or what is missing, unless `kind` can be written here.

    Beyond the import, a tiny quantize-and-multiply runs on the CPU: an install without
    this machine's kernels fails here in a second, not after the merge.
    """
    if kind not in KINDS:
        raise BadInput(msg("export.one_of", choices=", ".join(KINDS), got=kind), field="format")
    from transformers.utils import import_utils

    need = import_utils.BITSANDBYTES_MIN_VERSION
    if not import_utils.is_bitsandbytes_available():
        raise BadInput(msg("export.bnb.needs_bnb", kind=kind, need=str(need)), field="format")
    if not import_utils.is_accelerate_available():
        raise BadInput(msg("export.bnb.needs_accelerate", kind=kind), field="format")
    with _quiet_bnb():  # on AVX512-BF16 CPUs it warns that an optional hub kernel is missing
        import bitsandbytes as bnb
    if "cpu" not in getattr(bnb, "supported_torch_devices", {"cpu"}):
        raise BadInput(msg("export.bnb.no_cpu", version=bnb.__version__, need=str(need)),
                       field="format")
    try:
        _smoke_test(kind)
    except Exception as err:  # noqa: BLE001 - any failure means: cannot quantize here
        raise BadInput(msg("export.bnb.cannot_run", version=bnb.__version__, kind=kind,
                           error=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}",
                           need=str(need)), field="format") from None


def _smoke_test(kind: str) -> None:
    """Quantize a 64x64 matrix and multiply with it, through the kernels the model will use."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch

    weight, x = torch.randn(64, 64), torch.randn(2, 64)
    if kind == "bnb-4bit":
        packed, state = F.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
        got = bnb.matmul_4bit(x, packed.t(), quant_state=state)
    else:
        w8, w_scale, _ = F.int8_vectorwise_quant(weight.half())
        x8, x_scale, _ = F.int8_vectorwise_quant(x.half())
        got = F.int8_mm_dequant(F.int8_linear_matmul(x8, w8), x_scale, w_scale).float()
    want = x @ weight.t()
    if not torch.isfinite(got).all() or (got - want).abs().max() > 0.5 * want.abs().max():
        raise RuntimeError("the quantized product is wrong")


def quantization_config(kind: str, compute_dtype):
    """NF4 with double quantization (QLoRA's choice) computing in the weights' own dtype, or
    LLM.int8 with its default outlier threshold; saved into config.json by save_pretrained."""
    from transformers import BitsAndBytesConfig
    if kind == "bnb-4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


# --- quantize ---------------------------------------------------------------------------

def quantize_folder(merged_hf_folder: str | Path, out_folder: str | Path, kind: str,
                    progress: ProgressFn | None = None) -> dict:
    """Load the merged model folder quantized and save it, with its tokenizer, into out_folder.

    transformers quantizes each weight as it is read from the (memory-mapped) safetensors,
    so the process holds one quantized model, never the full-precision one: measured on a
    150M-parameter fp32 model (580 MB), 182 MB of anonymous memory at the peak for 4-bit,
    462 MB for 8-bit. Non-linear weights (embeddings, norms, a tied lm_head) keep the
    stored dtype. Returns the size written and the time taken.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import pick_dtype

    progress = progress or (lambda message, fraction: None)
    check_available(kind)
    source, out = Path(merged_hf_folder), Path(out_folder)
    dtype = pick_dtype("stored", AutoConfig.from_pretrained(source))
    progress(msg("export.bnb.quantizing", kind=kind), 0.0)
    start = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=quantization_config(kind, dtype), device_map="cpu",
        dtype=dtype)
    progress(msg("export.bnb.writing", kind=kind), 0.7)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    del model
    for item in source.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name not in _WRITTEN:
            shutil.copyfile(item, out / item.name)
    progress(msg("export.bnb.written", kind=kind), 1.0)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"kind": kind, "size_mb": size / 1e6, "seconds": time.monotonic() - start}


# --- reference (on the source, before it is freed) ------------------------------------

def perplexity_rows(tokenizer, identity: tuple[str, str] | None = None,
                    n: int = PERPLEXITY_ROWS) -> list[dict]:
    """`n` conversations spread over the bundled identity data, through the chat template
    as SFT sees them: input ids, and labels on the reply tokens only (-100 elsewhere).

    `identity` (name, author) fills {{name}} and {{author}}: pass the run's own, so the rows
    are what the fine-tune learned; the schema defaults otherwise.
    """
    from .config import TrainConfig
    from .templates import encode_conversation

    if identity is None:
        defaults = TrainConfig()
        identity = (defaults.identity_name, defaults.identity_author)
    records = _bundled_identity(identity)
    rows = []
    for record in records[::max(len(records) // n, 1)][:n]:
        ids, labels = encode_conversation(record["messages"], tokenizer)
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _data_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "data"


def _bundled_identity(identity: tuple[str, str]) -> list[dict]:
    """The bundled identity rows as SFT reads them (data.read_dataset's steps), from the
    package's own data folder without the path gate: an export started from the page is
    confined to the user's folders, which need not hold the package, and this file is
    tunebench's own data, not a path anyone typed."""
    from . import data
    entry = data.resolve("identity", _data_dir(), confine=False)
    records, src = data._read_entry(entry)
    return data._fill_all(data._for_stage(records, src, "sft"), identity)


def reference_rows(model, tokenizer, identity: tuple[str, str] | None = None) -> list[dict]:
    """perplexity_rows with the source model's loss on each (`nll`, `tokens`): the rows
    verify_quantized compares the export with. Call it while the source is loaded."""
    rows = perplexity_rows(tokenizer, identity)
    for row, (nll, tokens) in zip(rows, _row_losses(model, rows)):
        row.update(nll=nll, tokens=tokens)
    return rows


def _row_losses(model, rows: list[dict]) -> list[tuple[float, int]]:
    """(mean negative log-likelihood over the labelled tokens, their count) per row."""
    import torch
    out = []
    with torch.inference_mode():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor([row["labels"]])
            loss = model(input_ids=ids, labels=labels).loss
            out.append((float(loss), int((labels[0, 1:] != -100).sum())))
    return out


def _perplexity(losses: list[tuple[float, int]]) -> float:
    tokens = sum(count for _, count in losses)
    return math.exp(sum(nll * count for nll, count in losses) / max(tokens, 1))


# --- verify -------------------------------------------------------------------------------

def verify_quantized(out_folder: str | Path, reference_turn: dict, tokenizer,
                     rows: list[dict]) -> list[dict]:
    """Reload the export with plain `AutoModelForCausalLM.from_pretrained(folder)` and check
    it agrees with the source: export._check dicts, each failing below its threshold.

    `reference_turn` is export.greedy_turn on the source; `rows` come from reference_rows.
    """
    from transformers import AutoModelForCausalLM

    from .chat import stop_token_ids
    from .export import _check, compare_turns, greedy_turn

    folder = Path(out_folder)
    kind = _kind_saved(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - a failed reload is the finding, not a crash
        return [_check(msg("export.check.bnb_reloads"), False,
                       msg("text", text=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"))]
    layers = _quantized_layers(model)
    checks = [_check(msg("export.check.bnb_reloads"), kind is not None and layers > 0,
                     msg("export.bnb_reloads.detail", cls=type(model).__name__, layers=layers,
                         kind=kind or msg("export.bnb.unquantized")))]
    if kind is None or not layers:
        return checks
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    stops = stop_token_ids(tokenizer)  # the tokenizer's eos and the template's end of turn
    checks.append(_check(msg("export.check.stops"), set(stops) <= set(eos), msg(
        "export.stops.detail", eos=str(eos),
        names=", ".join(map(str, tokenizer.convert_ids_to_tokens(eos))))))
    with _quiet_bnb(), _threads_for(model):
        got = greedy_turn(model, tokenizer)  # free-running, with the export's generation config
        checks.append(_agreement(model, tokenizer, reference_turn, got, kind))
        checks += compare_turns(reference_turn, got, tokenizer, set(eos))[1:]  # stops at eos
        checks.append(_perplexity_check(model, rows, kind))
    return checks


def _kind_saved(folder: Path) -> str | None:
    """The format config.json's quantization_config says the folder holds, or None."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "bitsandbytes":
        return None
    if quant.get("load_in_4bit"):
        return "bnb-4bit"
    return "bnb-8bit" if quant.get("load_in_8bit") else None


def _quantized_layers(model) -> int:
    import bitsandbytes as bnb
    return sum(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


@contextlib.contextmanager
def _threads_for(model):
    """models.pick_cpu_threads for generation, undone afterwards: bitsandbytes' CPU 4-bit
    kernel for one token at a time ran 200x slower on two spinning threads while another
    process used a core (11 ms instead of 0.05 ms a layer; a 15-token reply took 6 s)."""
    import torch

    from .models import count_parameters, pick_cpu_threads
    before = torch.get_num_threads()
    pick_cpu_threads(count_parameters(model)[1], generates=True)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _quiet_bnb():
    """LLM.int8 logs 'inputs will be cast from float32 to float16' on every matmul on the
    CPU (thousands of lines for one reply); the cast is expected, so keep it out of the
    export's output."""
    from .models import quiet_logger
    return quiet_logger(BNB_LOGGER)


def _probe_ids(tokenizer):
    from .export import PROBE
    return tokenizer.apply_chat_template([{"role": "user", "content": PROBE}],
                                         add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


def token_agreement(model, tokenizer, reference_turn: dict) -> float:
    """Share of the source's greedy reply tokens that are also the export's greedy choice
    with the same text before them (one forward over prompt + reply: teacher forcing)."""
    import torch
    ref = reference_turn["tokens"]
    if not ref:
        return 1.0
    prompt = _probe_ids(tokenizer)
    ids = torch.cat([prompt, torch.tensor([ref])], dim=1)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, prompt.shape[1] - 1:-1]
    return float((logits.argmax(-1) == torch.tensor(ref)).float().mean())


def _agreement(model, tokenizer, reference_turn: dict, got: dict, kind: str) -> dict:
    from .export import _check
    share = token_agreement(model, tokenizer, reference_turn)
    ref, new = reference_turn["tokens"], got["tokens"]
    prefix = next((i for i, (a, b) in enumerate(zip(ref, new)) if a != b), min(len(ref), len(new)))
    text = tokenizer.decode(new, skip_special_tokens=True)[:80]
    limit = MIN_TOKEN_AGREEMENT[kind]
    return _check(msg("export.check.bnb_agreement"), share >= limit,
                  msg("export.bnb_agreement.detail", share=share, n=len(ref), limit=limit,
                      prefix=prefix, text=repr(text)))


def _perplexity_check(model, rows: list[dict], kind: str) -> dict:
    from .export import _check
    if not rows:
        return _check(msg("export.check.bnb_perplexity"), False, msg("export.bnb.no_rows"))
    source = _perplexity([(row["nll"], row["tokens"]) for row in rows])
    export = _perplexity(_row_losses(model, rows))
    change = export / source - 1
    limit = MAX_PERPLEXITY_CHANGE[kind]
    return _check(msg("export.check.bnb_perplexity"), abs(change) <= limit,
                  msg("export.bnb_perplexity.detail", ours=export, source=source, rows=len(rows),
                      change=change, limit=limit))
