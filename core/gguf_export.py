"""Export a merged model folder to one GGUF file with llama.cpp's own converter, and prove it.

Reads top to bottom as a GGUF export runs:
  check     refuse an architecture llama.cpp's converter has no class for, before any work
  convert   llama.cpp's convert_hf_to_gguf code (its `conversion` package), lazily: tensors
            are read, converted and written one at a time, so memory stays near one
            tensor plus the libraries, never a second copy of the model
  quantize  q4_k_m: llama.cpp's llama_model_quantize (through llama-cpp-python) from a
            16-bit GGUF written first and deleted after; f16, bf16 and q8_0 come from the
            converter directly (gguf-py writes Q8_0 itself, no intermediate file)
  verify    load the file with llama-cpp-python and compare with the source model:
            tokenizer round trip, end-of-turn tokens, greedy tokens, next-token agreement
            and perplexity on bundled conversations

Where the converter comes from: llama-cpp-python's wheel keeps only the compiled library,
but its sdist carries llama.cpp, including convert_hf_to_gguf.py, the `conversion`
package behind it and the gguf-py package that code is written against. The gguf on
PyPI is NOT that package: gguf 0.19.0 on PyPI differs from the vendored gguf-py of the
same version number and lacks names the converter uses (importing the converter's qwen
module with it fails on MODEL_ARCH.DFLASH), so the converter always runs with the gguf-py
shipped beside it. `converter_dir` extracts these
three from the sdist of the installed llama-cpp-python version (pip download, once) into
the tunebench cache; converter and runtime therefore always come from the same llama.cpp.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from . import locks
from .errors import BadInput
from .export import _check, joined, one_of  # one shape of verification line for every format
from .i18n import msg
from .models import quiet_logger

GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_k_m")
# Types the converter writes itself (gguf.LlamaFileType names); the rest are quantized after.
CONVERTER_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
QUANTIZED_TYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # llama_cpp constants
INSTALL_HINT = "pip install 'tunebench[gguf]'"
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
# Verification limits, from the source model's greedy tokens (teacher-forced) and the
# perplexity of the bundled identity rows. Measured on the demo model against its fp32
# source (all 68 identity rows + the 5 probe replies, 2574 tokens): f16 100% / +0.00%,
# bf16 100% / +0.06%, q8_0 99.7% / +0.03%, q4_k_m 98.7% / -0.33%. A broken file (wrong
# tokenizer, wrong tensor layout) scores near 0% and a perplexity many times higher. The
# quantized limits sit well below the demo's numbers because larger and smaller models
# lose more to 4-bit k-quants (llama.cpp reports several % perplexity for q4_k_m), and a
# verification that fails on a correct file would teach people to ignore it.
MIN_AGREEMENT = {"f16": 0.98, "bf16": 0.95, "q8_0": 0.95, "q4_k_m": 0.80}
MAX_PERPLEXITY_RISE = {"f16": 0.01, "bf16": 0.03, "q8_0": 0.03, "q4_k_m": 0.15}
PERPLEXITY_ROWS = 8  # bundled identity conversations scored for perplexity

Progress = Callable[[Any, float], None]  # (message: str or Msg, fraction)


def _quiet(message: str, fraction: float) -> None:
    pass


# --- the converter -------------------------------------------------------------------

def llama_cpp_version() -> str:
    """The installed llama-cpp-python's version; BadInput naming the extra when it or
    sentencepiece is missing (the converter imports sentencepiece before it looks for a
    tokenizer.model, even for BPE models such as Qwen2)."""
    import importlib.util
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    if llama_cpp is None or importlib.util.find_spec("sentencepiece") is None:
        raise BadInput(msg("export.gguf.needs", hint=INSTALL_HINT), field="format")
    return llama_cpp.__version__


def converter_dir() -> Path:
    """llama.cpp's converter for the installed bindings: convert_hf_to_gguf.py, conversion/
    and gguf-py/, from TUNEBENCH_LLAMA_CPP (a llama.cpp source folder) or extracted once
    from the llama-cpp-python sdist into `<cache>/llama.cpp-convert-<version>`."""
    from .paths import cache_root
    if os.environ.get("TUNEBENCH_LLAMA_CPP"):
        folder = Path(os.environ["TUNEBENCH_LLAMA_CPP"]).expanduser()
        if not all((folder / part).exists() for part in CONVERTER_PARTS):
            raise BadInput(msg("export.gguf.not_llama_cpp", parts=", ".join(CONVERTER_PARTS)),
                           file=str(folder), field="TUNEBENCH_LLAMA_CPP")
        return folder
    version = llama_cpp_version()
    folder = cache_root() / f"llama.cpp-convert-{version}"
    if all((folder / part).exists() for part in CONVERTER_PARTS):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with locks.held(folder.parent / f".{folder.name}.lock"):  # a second process waits
        if all((folder / part).exists() for part in CONVERTER_PARTS):
            return folder
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.tmp-") as tmp:
            sdist = _download_sdist(version, Path(tmp))
            _extract_converter(sdist, Path(tmp) / "out")
            shutil.rmtree(folder, ignore_errors=True)
            os.rename(Path(tmp) / "out", folder)  # complete or absent, never half-extracted
    return folder


def _download_sdist(version: str, dest: Path) -> Path:
    """The llama-cpp-python sdist of `version` through pip (its cache, index and proxy)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--quiet", f"llama-cpp-python=={version}", "-d", str(dest)]
    done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode or not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        raise BadInput(msg("export.gguf.no_sdist", version=version, why=tail[0][:200]),
                       field="format")
    return found[0]


def _extract_converter(sdist: Path, out: Path) -> None:
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            parts = Path(member.name).parts  # llama_cpp_python-X/vendor/llama.cpp/<part>/...
            if len(parts) > 3 and parts[1:3] == ("vendor", "llama.cpp") and \
                    parts[3] in CONVERTER_PARTS and (member.isfile() or member.isdir()):
                member.name = str(Path(*parts[3:]))
                members.append(member)
        # Only plain files and folders under the three parts are extracted (no links).
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(out, members=members, **safe)
    if not all((out / part).exists() for part in CONVERTER_PARTS):
        raise BadInput(msg("export.gguf.no_converter"), file=str(sdist))


def load_converter():
    """llama.cpp's `conversion` package and the gguf package it is written against."""
    folder = converter_dir()
    loaded = sys.modules.get("gguf")
    if loaded is not None and not Path(loaded.__file__).resolve().is_relative_to(
            (folder / "gguf-py").resolve()):
        raise RuntimeError(f"another gguf package is already imported ({loaded.__file__}); "
                           "the converter needs the gguf-py shipped with it")
    for path in (folder / "gguf-py", folder):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    import conversion
    import gguf
    return conversion, gguf


# --- check: before any work -------------------------------------------------------------

def check_convertible(model_folder: str | Path) -> str:
    """The model's architecture, if llama.cpp's converter has a class for it; else BadInput
    naming it. Reads config.json only."""
    folder = Path(model_folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BadInput(msg("export.gguf.no_config", why=str(err)), file=str(folder)) from None
    conversion, _ = load_converter()
    try:
        arch = conversion.get_model_architecture(config, conversion.ModelType.TEXT)
    except ValueError:
        raise BadInput(msg("export.gguf.no_arch"), file=str(folder)) from None
    if arch not in conversion.TEXT_MODEL_MAP:
        raise BadInput(msg("export.gguf.unsupported", version=llama_cpp_version(), arch=arch),
                       file=str(folder), field="architectures")
    return arch


# --- convert and quantize -----------------------------------------------------------------

# llama.cpp's pre-tokenizer "qwen2": the regex llama-vocab.cpp implements for it, as it
# appears in Qwen2's tokenizer.json (and transformers' Qwen2 PRETOKENIZE_REGEX).
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def is_qwen2_pretokenizer(tokenizer) -> bool:
    """True when the tokenizer pre-tokenizes exactly as Qwen2's does: its regex split,
    isolated, then byte-level mapping without a regex of its own.

    Why a structural test: llama.cpp recognises a BPE pre-tokenizer by hashing the token
    ids of a fixed text, so a tokenizer trained with Qwen2's rules but its own merges
    (tunebench's demo model, and every fine-tune of it) has an unknown hash. A declared
    name (a metadata key) would not travel: a merged export folder carries tokenizer.json
    but not the demo's tunebench_demo.json, and a key can say one thing while the
    tokenizer does another. The loaded tokenizer states the rules transformers actually
    applies (for a qwen2 folder transformers 5 rebuilds Qwen2's own, whatever
    tokenizer.json says), which is what training saw. The verification's round trip on
    the converter's own test text then shows llama.cpp tokenizes exactly as transformers.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    pre, normalizer = spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    # NFC is allowed: Qwen2's own tokenizer has it and llama.cpp's "qwen2" leaves it out
    # for Qwen2 as well (the round trip checks the texts tunebench renders).
    if not steps or len(steps) != 2 or normalizer not in (None, {"type": "NFC"}):
        return False
    split, byte_level = steps
    return (split.get("type") == "Split" and split.get("pattern") == {"Regex": QWEN2_REGEX}
            and split.get("behavior") == "Isolated" and not split.get("invert")
            and byte_level.get("type") == "ByteLevel"
            and not byte_level.get("add_prefix_space") and not byte_level.get("use_regex"))


def model_class(conversion, arch: str):
    """The converter's class for `arch`, told the pre-tokenizer when its hash is unknown
    but the rules are provably Qwen2's (is_qwen2_pretokenizer)."""
    base = conversion.get_model_class(arch)

    def get_vocab_base_pre(self, tokenizer) -> str:
        # its banner for unknown hashes, handled below
        with quiet_logger(conversion.logger.name, logging.CRITICAL):
            try:
                return base.get_vocab_base_pre(self, tokenizer)
            except NotImplementedError:
                pass
        if is_qwen2_pretokenizer(tokenizer):
            return "qwen2"
        raise BadInput(msg("export.gguf.pretokenizer"), file=str(self.dir_model),
                       field="tokenizer")

    # The converter requires each class to name model_arch in its own body.
    return type(base.__name__, (base,), {"model_arch": base.model_arch,
                                         "get_vocab_base_pre": get_vocab_base_pre})


def convert(hf_folder: str | Path, out_file: str | Path, gguf_type: str,
            progress: Progress = _quiet, name: str | None = None) -> Path:
    """Write `out_file` (a .gguf of `gguf_type`) from a merged Hugging Face model folder,
    via a temp name renamed into place. Raises BadInput for anything unconvertible.
    `name` is the general.name written into the file (default: the folder's name)."""
    if gguf_type not in GGUF_TYPES:
        raise BadInput(one_of(GGUF_TYPES, gguf_type), field="gguf_type")
    hf_folder, out_file = Path(hf_folder), Path(out_file)
    llama_cpp_version()
    arch = check_convertible(hf_folder)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.parent / f".{out_file.name}.tmp-{os.getpid()}"
    try:
        if gguf_type in CONVERTER_TYPES:
            progress(msg("export.gguf.converting", arch=arch, type=gguf_type), 0.1)
            _run_converter(hf_folder, tmp, arch, CONVERTER_TYPES[gguf_type], name)
        else:
            half = out_file.parent / f".{out_file.name}.16bit-{os.getpid()}"
            try:
                kind = _half_type(hf_folder)
                progress(msg("export.gguf.converting", arch=arch, type=kind), 0.1)
                _run_converter(hf_folder, half, arch, CONVERTER_TYPES[kind], name)
                progress(msg("export.gguf.quantizing", type=gguf_type), 0.5)
                quantize(half, tmp, gguf_type)
            finally:
                half.unlink(missing_ok=True)
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    progress(msg("export.gguf.wrote", size=out_file.stat().st_size / 1e6), 0.6)
    return out_file


def _half_type(hf_folder: Path) -> str:
    """The 16-bit type to quantize from: bf16 for bf16 weights (f16 could overflow them)."""
    config = json.loads((hf_folder / "config.json").read_text(encoding="utf-8"))
    stored = config.get("dtype") or config.get("torch_dtype")
    return "bf16" if stored == "bfloat16" else "f16"


def _run_converter(hf_folder: Path, out_file: Path, arch: str, file_type: str,
                   name: str | None = None) -> None:
    """The converter, as convert_hf_to_gguf.py's main() runs it, in its lazy mode."""
    import torch
    conversion, gguf = load_converter()
    cls = model_class(conversion, arch)
    with torch.inference_mode(), quiet_logger(conversion.logger.name, logging.CRITICAL):
        model = cls(hf_folder, getattr(gguf.LlamaFileType, file_type), out_file, eager=False,
                    model_name=name or hf_folder.name)
        model.write()


def quantize(in_file: str | Path, out_file: str | Path, gguf_type: str,
             threads: int | None = None) -> None:
    """llama.cpp's llama_model_quantize (k-quants pick per-tensor types, e.g. q6_k for
    ffn_down in q4_k_m, and fall back where a row length is not a multiple of 256)."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZED_TYPES[gguf_type])
    params.nthread = threads or os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(str(in_file).encode(), str(out_file).encode(), params)
    if code != 0:
        raise RuntimeError(f"llama_model_quantize failed with code {code} for {in_file}")


# --- verify -----------------------------------------------------------------------------

# llama.cpp's own pre-tokenizer test text (chktxt in convert_hf_to_gguf's
# get_vocab_base_pre): whitespace runs, emoji, digit runs, Khmer, Chinese, Cyrillic,
# quotes and contractions. Tokenizing it identically proves the pre-tokenizer matches.
PRETOKENIZER_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL")


def sample_conversations(n: int = PERPLEXITY_ROWS) -> list[list[dict]]:
    """The first `n` rows of the bundled identity set as conversations (its {{name}} and
    {{author}} placeholders filled with the defaults the identity stage uses)."""
    from .paths import project_root
    rows = json.loads((project_root() / "data" / "identity.json").read_text(encoding="utf-8"))
    fill = lambda text: text.replace("{{name}}", "Tuney").replace("{{author}}", "tunebench")
    return [[{"role": "user", "content": fill(row["instruction"])},
             {"role": "assistant", "content": fill(row["output"])}] for row in rows[:n]]


def reference(model, tokenizer, stops: list[int], rows: list[list[dict]] | None = None) -> dict:
    """What the GGUF is compared with, from the source model: each probe prompt's ids,
    greedy reply and step logits; each bundled row's ids and mean next-token NLL. Taken
    before the comparison so the caller can free the source model first."""
    import torch
    from .chat import DEFAULT_PROBES
    from .export import VERIFY_TOKENS
    probes = []
    for prompt in DEFAULT_PROBES:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), do_sample=False,
                                 max_new_tokens=VERIFY_TOKENS, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id, output_logits=True,
                                 return_dict_in_generate=True)
        probes.append({"prompt": prompt, "text": text, "ids": ids,
                       "tokens": out.sequences[0, len(ids):].tolist(),
                       "logits": [step[0].float().numpy() for step in out.logits]})
    scored = []
    for row in rows if rows is not None else sample_conversations():
        text = tokenizer.apply_chat_template(row, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0].float()
        scored.append({"text": text, "ids": ids, "nll": _mean_nll(logits.numpy(), ids),
                       "argmax": logits[:-1].argmax(dim=-1).tolist()})
    return {"probes": probes, "rows": scored, "stops": list(stops)}


def _mean_nll(logits, ids: list[int]) -> float:
    """Mean negative log-likelihood of ids[1:] given the logits at positions 0..n-2."""
    import numpy as np
    logits = np.asarray(logits[: len(ids) - 1], dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_z = (top[:, 0] + np.log(np.exp(logits - top).sum(axis=1)))
    return float((log_z - logits[np.arange(len(ids) - 1), ids[1:]]).mean())


def load_gguf(gguf_file: str | Path, n_ctx: int = 512):
    """The GGUF in llama-cpp-python, every position's logits kept (for teacher forcing)."""
    import llama_cpp
    llama_cpp_version()
    with _plain_cpu_buffers():
        return llama_cpp.Llama(str(gguf_file), n_ctx=n_ctx, logits_all=True, verbose=False,
                               n_threads=verify_threads(Path(gguf_file).stat().st_size))


def verify_threads(file_bytes: int) -> int:
    """llama.cpp threads for the verification. Its threads spin while they wait for each
    other, so when another process holds a core they stall: on 2 cores with one busy, a
    32-token reply of the demo GGUF took 380-490 ms on 2 threads and 58-86 ms on 1. A small
    model gets one thread, a bigger one leaves a core to the rest of the machine."""
    cores = os.cpu_count() or 1
    if file_bytes < SMALL_GGUF_BYTES:
        return 1
    return max(1, min(4, cores - 1))


SMALL_GGUF_BYTES = 200 * 2**20  # a step this small is not worth sharing (as pick_cpu_threads)


@contextmanager
def _plain_cpu_buffers():
    """Load weights without llama.cpp's "extra" CPU buffer types (repacking, AMX).

    Why: on CPUs with AMX (Sapphire Rapids and later, including this project's build
    machine) a natively built llama-cpp-python 0.3.36 moves quantized weights into an AMX
    buffer and segfaults in ggml_backend_amx_mul_mat on the first decode (measured for
    q8_0, q4_0, q5_0 and q4_k_m; llama.cpp issue #20824, closed unfixed). The verification
    is about the file, not the fastest kernels, so it uses the plain CPU path. Llama()
    has no argument for model_params.use_extra_bufts, hence the wrapped defaults.
    """
    import llama_cpp.llama_cpp as low
    original = low.llama_model_default_params

    def defaults():
        params = original()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = defaults
    try:
        yield
    finally:
        low.llama_model_default_params = original


def _logits(llm, ids: list[int]):
    """Logits after each token of `ids`, from a fresh context."""
    llm.reset()
    llm.eval(ids)
    return llm.scores[: len(ids)].copy()


def _greedy(llm, ids: list[int], max_new: int) -> tuple[list[int], list]:
    """llama.cpp's own greedy reply: argmax each step, stopping at an end-of-generation token."""
    import llama_cpp
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    llm.reset()
    llm.eval(ids)
    tokens, steps = [], []
    for _ in range(max_new):
        step = llm.scores[llm.n_tokens - 1].copy()
        token = int(step.argmax())
        tokens.append(token)
        steps.append(step)
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        llm.eval([token])
    return tokens, steps


def verify_gguf(gguf_file: str | Path, tokenizer, ref: dict, gguf_type: str) -> list[dict]:
    """Load the GGUF with llama-cpp-python and compare it with the source's `ref`
    (see `reference`). Returns check dicts like core/export.py's."""
    llm = load_gguf(gguf_file)
    try:
        checks = [check_tokenizer(llm, tokenizer, ref), check_stops(llm, tokenizer, ref)]
        checks.append(check_greedy(llm, tokenizer, ref, gguf_type))
        checks += check_agreement(llm, ref, gguf_type)
        return checks
    finally:
        llm.close()


def check_tokenizer(llm, tokenizer, ref: dict) -> dict:
    """llama.cpp's tokenizer gives transformers' ids: on the probe prompts and the bundled
    rows with the chat template applied (special tokens, end-of-turn included), on
    llama.cpp's pre-tokenizer test text, and with the same BOS policy."""
    cases = [(item["text"], True, item["ids"]) for item in ref["probes"] + ref["rows"]]
    cases.append((PRETOKENIZER_TEXT, False,
                  tokenizer(PRETOKENIZER_TEXT, add_special_tokens=False)["input_ids"]))
    for text, special, want in cases:
        got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b),
                      min(len(want), len(got)))
            return _check(msg("export.check.tokens"), False, msg(
                "export.tokens.differs", text=repr(text[:40]), at=at, want=str(want[at:at + 3]),
                got=str(got[at:at + 3])))
    first = cases[0][0]
    want = tokenizer(first)["input_ids"]  # transformers' own special-token policy
    got = llm.tokenize(first.encode("utf-8"), add_bos=True, special=True)
    if got != want:
        return _check(msg("export.check.tokens"), False,
                      msg("export.tokens.bos", got=str(got[:3]), want=str(want[:3])))
    return _check(msg("export.check.tokens"), True, msg("export.tokens.same", n=len(cases) - 1))


def check_stops(llm, tokenizer, ref: dict) -> dict:
    """Every stop token of the chat template ends generation in llama.cpp too."""
    import llama_cpp
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    names = tokenizer.convert_ids_to_tokens(ref["stops"])
    missing = [n for i, n in zip(ref["stops"], names) if not llama_cpp.llama_vocab_is_eog(vocab, i)]
    return _check(msg("export.check.gguf_stops"), not missing and bool(names),
                  msg("export.gguf_stops.missing", names=", ".join(missing)) if missing else
                  msg("export.gguf_stops.ok", names=", ".join(names)))


def check_greedy(llm, tokenizer, ref: dict, gguf_type: str) -> dict:
    """llama.cpp's greedy replies to the probe prompts. f16/bf16 must give the source's
    tokens, except where the source's two best tokens are closer than the rounding (margin
    <= 2x the logit difference at that step, the rule core/export.py uses); a quantized
    file is reported here and held to MIN_AGREEMENT below."""
    same, ties, problems, stopped = 0, 0, [], 0
    for probe in ref["probes"]:
        tokens, steps = _greedy(llm, probe["ids"], len(probe["tokens"]))
        stopped += bool(tokens) and tokens[-1] in ref["stops"]
        if tokens == probe["tokens"]:
            same += 1
            continue
        at = next((i for i, (a, b) in enumerate(zip(probe["tokens"], tokens)) if a != b),
                  min(len(tokens), len(probe["tokens"])))
        if at < min(len(tokens), len(probe["tokens"])):
            want, got = probe["logits"][at], steps[at]
            margin = float(want[probe["tokens"][at]] - want[tokens[at]])
            if 0 <= margin <= 2 * float(abs(want - got).max()):
                ties += 1
                continue
        problems.append(msg("export.gguf_greedy.differs", prompt=repr(probe["prompt"]), at=at))
    n = len(ref["probes"])
    ok = not problems or gguf_type not in ("f16", "bf16")
    detail = msg("export.gguf_greedy.detail", same=same, n=n, stopped=stopped,
                 ties=msg("export.gguf_greedy.ties", ties=ties) if ties else "")
    return _check(msg("export.check.greedy"), ok, joined([detail] + problems))


def check_agreement(llm, ref: dict, gguf_type: str) -> list[dict]:
    """Next-token agreement with the source, teacher-forced (so one early difference does
    not shift the rest): on the probe replies and every position of the bundled rows; and
    the perplexity of those rows."""
    import numpy as np
    agree = total = 0
    for probe in ref["probes"]:
        ids = probe["ids"] + probe["tokens"]
        logits = _logits(llm, ids)[len(probe["ids"]) - 1: len(ids) - 1]
        agree += int((logits.argmax(axis=1) == np.array(probe["tokens"])).sum())
        total += len(probe["tokens"])
    nlls = []
    for row in ref["rows"]:
        logits = _logits(llm, row["ids"])
        agree += int((logits[:-1].argmax(axis=1) == np.array(row["argmax"])).sum())
        total += len(row["argmax"])
        nlls.append(_mean_nll(logits, row["ids"]))
    share = agree / max(total, 1)
    source = math.exp(sum(r["nll"] for r in ref["rows"]) / len(ref["rows"]))
    ours = math.exp(sum(nlls) / len(nlls))
    rise = ours / source - 1
    return [
        _check(msg("export.check.agreement"), share >= MIN_AGREEMENT[gguf_type],
               msg("export.agreement.detail", share=share, total=total, rows=len(nlls),
                   least=MIN_AGREEMENT[gguf_type], type=gguf_type)),
        _check(msg("export.check.gguf_perplexity"), rise <= MAX_PERPLEXITY_RISE[gguf_type],
               msg("export.gguf_perplexity.detail", ours=ours, source=source, rise=rise,
                   most=MAX_PERPLEXITY_RISE[gguf_type], type=gguf_type, rows=len(nlls)))]


# --- the whole GGUF export -------------------------------------------------------------

def export_gguf(hf_folder: str | Path, out_file: str | Path, gguf_type: str,
                progress: Progress = _quiet, settings=None) -> dict:
    """Convert a merged model folder to a verified GGUF with an Ollama Modelfile beside it.

    The file is written and verified under a hidden name and only renamed to `out_file`
    when every check passes. One model is in memory at a time: the converter streams
    tensors, the source is freed after its reference is taken, then the GGUF is loaded.
    Returns {"ok", "out", "checks", "size_mb", "modelfile"}.
    """
    from .chat import stop_token_ids
    from .models import load_checkpoint
    from .ollama import write_modelfile
    hf_folder, out_file = Path(hf_folder), Path(out_file)
    tmp = out_file.parent / f".{out_file.name}.unverified-{os.getpid()}"
    try:
        convert(hf_folder, tmp, gguf_type, progress, name=out_file.stem)
        progress(msg("export.gguf.reference"), 0.65)
        tokenizer, model = load_checkpoint(str(hf_folder), dtype="stored", device="cpu")
        stops = stop_token_ids(tokenizer, model.generation_config)
        ref = reference(model, tokenizer, stops)
        del model
        gc.collect()
        progress(msg("export.gguf.verifying"), 0.8)
        checks = verify_gguf(tmp, tokenizer, ref, gguf_type)
        result = {"ok": all(c["ok"] for c in checks), "out": str(out_file), "checks": checks,
                  "size_mb": tmp.stat().st_size / 1e6, "modelfile": None}
        if result["ok"]:
            os.replace(tmp, out_file)
            names = tokenizer.convert_ids_to_tokens(stops)
            result["modelfile"] = str(write_modelfile(out_file, tokenizer, names, settings))
        return result
    finally:
        tmp.unlink(missing_ok=True)
