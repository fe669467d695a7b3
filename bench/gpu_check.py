"""The GPU check: every path that only a GPU can show, as rows of one table, in 8 minutes.

    bash bench/gpu_check.sh                  # on a machine with an NVIDIA GPU
    bash bench/gpu_check.sh --cpu            # the CPU rows (CI); the GPU rows skip, saying why
    bash bench/gpu_check.sh --list           # the rows: what each needs, runs and checks
    bash bench/gpu_check.sh --only bf16,qlora-4bit

Each row of CHECKS is one real `python -m core train KEY=VALUE ...` (or `python -m core
serve ...`) subprocess in its own process group, with a few steps of the demo model or of
a model built from a config. It passes when the run folder says so: status.json
`completed`, a finite loss in metrics.jsonl, and the row's evidence (the precision or
attention train.log reports, the engine files in the folder). Its figures come from the
same files (steps/s, tokens/s, final loss), with peak memory sampled from outside:
nvidia-smi's used memory of the GPU (the run does not record torch's own peak), or the
resident memory of the process tree on CPU. A row whose CUDA, package or GPUs are
missing is `skipped` with the reason; no row starts once the time budget is spent, and
each row's timeout is cut to what is left of it.

The table is printed as markdown and written as JSON to
bench/results/gpu-check-<date>.json (gpu-check-cpu-<date>.json with --cpu).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]
from gpu_model import PEAK_BF16  # noqa: E402

BUDGET_S = 480  # the "at most 8 minutes on one GPU"

# A short LoRA run of the demo model: 32 identity records, batches of 4, 8 steps.
DEMO_RUN = ("dataset=identity", "max_samples=32", "batch_size=4", "epochs=1", "cutoff_len=256",
            "save_steps=100000", "logging_steps=1", "seed=42")
# Models built from a config (random weights, the demo tokenizer: speed depends on shapes).
# "0.5b": 20 layers of width 1536 (head 128, as Qwen2.5's), 0.49B parameters.
SHAPES = {
    "0.5b": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=20,
                 num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                 tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                 tie_word_embeddings=True),
}
# Full tuning on plain text whose every record fills cutoff_len (see write_corpus), so
# each step trains batch_size x cutoff_len tokens: 800 records x 3 epochs / 8 = 300 steps.
CONFIG_RUN_05B = ("stage=pt", "method=full", "compute_type=bf16", "cutoff_len=1024",
                  "batch_size=8", "epochs=3", "max_samples=800", "learning_rate=1e-4",
                  "warmup_ratio=0", "save_steps=100000", "logging_steps=10", "seed=42")
CONFIG_RUN_TINY = ("stage=pt", "method=full", "compute_type=fp32", "cutoff_len=128",
                   "batch_size=4", "epochs=1", "max_samples=16", "learning_rate=1e-3",
                   "save_steps=100000", "logging_steps=1", "seed=42")
ENGINE_HINT = ("core applies `distributed` only to more than one process (core/distributed.py "
               "trainer_kwargs, core/train.py main), so with one device it trains as a plain "
               "process")


@dataclass(frozen=True)
class Check:
    """One row: what it needs, the command's settings, and how it is judged."""
    name: str
    what: str                               # what only this row shows
    mode: str                               # "gpu": the default run; "cpu": with --cpu
    overrides: tuple[str, ...] = ()         # `tunebench train` KEY=VALUE, after DEMO_RUN
    needs: tuple[str, ...] = ()             # "cuda", "package:NAME", "command:NAME"
    gpus: int = 0
    model: str = "demo"                     # "demo", or "config:<SHAPES key>"
    kind: str = "train"                     # "train" or "serve"
    timeout_s: int = 90
    evidence: tuple[tuple[str, str], ...] = ()  # (file in the run folder, text it must hold)
    hint: str = ""                          # why the evidence may be missing
    mfu: bool = False                       # report MFU (full tuning: 6 FLOPs/param/token)

    def all_needs(self) -> list[str]:
        return [*self.needs, *([f"{self.gpus} GPU"] if self.gpus else [])]

    def pass_rule(self) -> str:
        if self.kind == "serve":
            return "GET /v1/models answers, then one chat request gets a reply with text"
        rule = "status.json completed, a finite final loss in metrics.jsonl"
        return rule + "".join(f", {f} contains '{t}'" for f, t in self.evidence)


_CUDA, _BF16 = ("cuda",), ("compute_type=bf16",)
_CPU_SHORT = ("max_samples=16",)  # 4 steps: each CPU row costs mostly its imports
CHECKS = (
    Check("cpu-fp32", "fp32 LoRA training of the demo model on CPU", "cpu",
          ("compute_type=fp32", *_CPU_SHORT), evidence=(("train.log", "precision fp32"),)),
    Check("cpu-bf16", "bf16 autocast LoRA training of the demo model on CPU", "cpu",
          (*_BF16, *_CPU_SHORT), evidence=(("train.log", "precision bf16"),)),
    Check("config-model-tiny", "the config-built model path (build, full tuning, MFU "
          "arithmetic) at a tiny size", "cpu", CONFIG_RUN_TINY, model="config:tiny", mfu=True,
          evidence=(("train.log", "method full"),)),
    Check("cpu-serve", "the serve row's path (start, /v1/models, one chat reply) with the "
          "transformers backend", "cpu", ("--backend", "transformers"), kind="serve"),
    Check("bf16", "bf16 mixed precision on the GPU", "gpu", _BF16, _CUDA, 1,
          evidence=(("train.log", "precision bf16"),)),
    Check("fp16", "fp16 mixed precision with loss scaling", "gpu", ("compute_type=fp16",),
          _CUDA, 1, evidence=(("train.log", "precision fp16"),)),
    Check("flash-attention-2", "flash-attn 2's variable-length kernel, padding-free", "gpu",
          ("booster=flash_attention_2", *_BF16), (*_CUDA, "package:flash_attn"), 1,
          evidence=(("status.json", "flash_attention_2"),)),
    Check("liger", "Liger's Triton kernels (RMSNorm, RoPE, SwiGLU)", "gpu",
          ("booster=liger", *_BF16), (*_CUDA, "package:liger_kernel"), 1,
          evidence=(("config.yaml", "booster: liger"),),
          hint="Liger's patching leaves no mark in the run folder: a completed run is the check"),
    Check("qlora-4bit", "QLoRA on an NF4 base, bitsandbytes CUDA kernels", "gpu",
          ("method=qlora", "quant_bits=4", *_BF16), (*_CUDA, "package:bitsandbytes"), 1,
          evidence=(("train.log", "method qlora"), ("config.yaml", "quant_bits: 4"))),
    Check("qlora-8bit", "QLoRA on an int8 base, bitsandbytes CUDA kernels", "gpu",
          ("method=qlora", "quant_bits=8", *_BF16), (*_CUDA, "package:bitsandbytes"), 1,
          evidence=(("train.log", "method qlora"), ("config.yaml", "quant_bits: 8"))),
    Check("model-0.5b", "a 0.49B model built from a config, full bf16 tuning for 300 steps, "
          "MFU", "gpu", CONFIG_RUN_05B, _CUDA, 1, model="config:0.5b", timeout_s=240,
          mfu=True, evidence=(("train.log", "precision bf16"),)),
    Check("deepspeed-zero2", "DeepSpeed ZeRO-2 on one device", "gpu",
          ("distributed=deepspeed_zero2", *_BF16), (*_CUDA, "package:deepspeed"), 1,
          evidence=(("deepspeed.json", '"stage": 2'),), hint=ENGINE_HINT),
    Check("deepspeed-zero3", "DeepSpeed ZeRO-3 on one device", "gpu",
          ("distributed=deepspeed_zero3", *_BF16), (*_CUDA, "package:deepspeed"), 1,
          evidence=(("deepspeed.json", '"stage": 3'),), hint=ENGINE_HINT),
    Check("fsdp", "FSDP (full_shard) on one device", "gpu", ("distributed=fsdp", *_BF16),
          _CUDA, 1, evidence=(("fsdp.json", "full_shard"),), hint=ENGINE_HINT),
    Check("vllm-serve", "`tunebench serve --backend vllm` answers a chat request", "gpu",
          ("--backend", "vllm"), needs=(*_CUDA, "package:vllm", "command:vllm"), gpus=1,
          kind="serve", timeout_s=180),
    # Beyond the list, last so that they never crowd out its rows.
    Check("pure-bf16", "bf16 weights as well as compute (no fp32 master copy)", "gpu",
          ("compute_type=pure_bf16",), _CUDA, 1,
          evidence=(("train.log", "precision pure_bf16"),)),
    Check("paged-adamw-8bit", "bitsandbytes' paged 8-bit optimizer", "gpu",
          ("optim=paged_adamw_8bit", *_BF16), (*_CUDA, "package:bitsandbytes"), 1,
          evidence=(("config.yaml", "optim: paged_adamw_8bit"),)),
)


# --- the machine and the skip logic -------------------------------------------------

@dataclass
class Machine:
    cuda: bool
    gpus: int
    gpu_name: str
    no_cuda: str = ""        # why CUDA rows cannot run here


def detect(cpu_mode: bool) -> Machine:
    import torch

    none = f"no CUDA device (torch {torch.__version__})"
    if cpu_mode:
        why = "--cpu hides the GPUs" if torch.cuda.is_available() else none
        return Machine(False, 0, "cpu", why)
    if not torch.cuda.is_available():
        return Machine(False, 0, "cpu", none)
    return Machine(True, torch.cuda.device_count(), torch.cuda.get_device_name(0))


def missing(check: Check, machine: Machine) -> str | None:
    """Why `check` cannot run on `machine` (None when it can)."""
    for need in check.needs:
        kind, _, name = need.partition(":")
        if kind == "cuda" and not machine.cuda:
            return f"needs CUDA: {machine.no_cuda}"
        if kind == "package" and importlib.util.find_spec(name) is None:
            return f"needs the {name} package, which is not installed"
        if kind == "command" and shutil.which(name) is None:
            return f"needs the `{name}` command, which is not on PATH"
    if check.gpus > machine.gpus:
        return f"needs {check.gpus} GPU(s); {machine.gpus} visible"
    return None


# --- MFU ------------------------------------------------------------------------------

def peak_flops(gpu_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU named (bench/gpu_model.py's table), None if unknown."""
    return next((v for k, v in PEAK_BF16.items() if k in gpu_name), None)


def mfu(tokens_per_s: float, params: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation of full tuning: tokens/s x 6 x params / peak FLOP/s.

    6 per parameter and token: 2 forward, 4 backward (the weights' and the activations'
    gradients). Attention scores are left out, as bench/gpu_model.py leaves them out.
    """
    if not peak or not tokens_per_s:
        return None
    return tokens_per_s * 6 * params / peak


def model_params(folder: Path) -> int:
    """All parameters of a config.json, counted from its shapes (core/memory.py)."""
    from core import memory

    shape = memory.shape_of(json.loads((folder / "config.json").read_text()))
    return memory.count_params(shape)[0]


# --- inputs: the models and the corpus ------------------------------------------------

def config_model(shape_name: str) -> Path:
    """The model of SHAPES[shape_name], built once into the tunebench cache."""
    from core import paths
    from gpu_model import build_gpu_model

    folder = paths.cache_root() / f"gpu-check-model-{shape_name}"
    if (folder / "config.json").exists():
        return folder
    staging = folder.with_name(f"{folder.name}.tmp{os.getpid()}")  # no half-built model
    shutil.rmtree(staging, ignore_errors=True)
    build_gpu_model(staging, SHAPES[shape_name])
    os.replace(staging, folder)
    return folder


def write_corpus(path: Path, records: int = 800) -> Path:
    """Plain-text records of about 1,700 demo-tokenizer tokens each (every sentence of
    data/text_demo.jsonl, shuffled per record), so each fills a 1,024-token row."""
    sentences = [json.loads(line)["text"] for line in
                 (REPO / "data" / "text_demo.jsonl").read_text().splitlines() if line.strip()]
    rng = random.Random(0)
    with path.open("w") as out:
        for _ in range(records):
            rng.shuffle(sentences)
            out.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return path


# --- running one command, watched -----------------------------------------------------

class Watched:
    """A command in its own process group; a thread samples its peak memory: the GPU's
    used memory (nvidia-smi) above what was used at the start, or the tree's RSS."""

    def __init__(self, argv: list[str], env: dict, log: Path, gpu: bool):
        self.gpu = gpu
        self.base = _gpu_used_mib() if gpu else 0
        self.peak: float | None = None
        self.start = time.monotonic()
        self.log = log.open("w")
        self.proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self._done = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._done.is_set():
            value = _gpu_used_mib() if self.gpu else _tree_rss_mib(self.proc.pid)
            if value is not None:
                used = value - (self.base or 0)
                self.peak = used if self.peak is None else max(self.peak, used)
            self._done.wait(0.5)

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if it was still running at `timeout` (then stopped)."""
        try:
            return self.proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            self.stop()
            return None

    def stop(self) -> None:
        """SIGTERM the group (the trainer saves and settles its status), SIGKILL what is
        still alive in it 15 s later; return once no live process is left in it."""
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            if not self._group_alive():
                return
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + grace
            while self._group_alive() and time.monotonic() < deadline:
                time.sleep(0.1)

    def _group_alive(self) -> bool:
        """Whether a process of the group still runs (zombies left to an init that does not
        reap them do not count: they hold no memory)."""
        self.proc.poll()  # reap the leader
        for p in psutil.process_iter(["status"]):
            try:
                if os.getpgid(p.pid) == self.proc.pid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    return True
            except (ProcessLookupError, PermissionError):
                continue
        return False

    def close(self) -> float:
        self._done.set()
        self.log.close()
        return time.monotonic() - self.start


def _gpu_used_mib() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,"
                              "nounits", "-i", "0"], capture_output=True, text=True, timeout=5)
        return float(out.stdout.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _tree_rss_mib(pid: int) -> float | None:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 2**20


# --- one row ----------------------------------------------------------------------------

@dataclass
class Result:
    name: str
    result: str                       # passed, failed or skipped
    reason: str = ""
    figures: dict = field(default_factory=dict)
    seconds: float | None = None
    command: list[str] = field(default_factory=list)
    run_dir: str = ""


class Context:
    """What every row shares: the machine, the work folder, the environment, the budget."""

    def __init__(self, machine: Machine, work: Path, cpu_mode: bool, budget_s: float):
        self.machine, self.work, self.budget_s = machine, work, budget_s
        self.started = time.monotonic()
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        if cpu_mode:
            self.env["CUDA_VISIBLE_DEVICES"] = ""
        self._corpus: Path | None = None

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def corpus(self) -> Path:
        if self._corpus is None:
            self._corpus = write_corpus(self.work / "corpus.jsonl")
        return self._corpus

    def model(self, check: Check) -> str:
        """The model argument: 'demo' or the built config model's folder."""
        kind, _, shape = check.model.partition(":")
        return "demo" if kind == "demo" else str(config_model(shape))


def merged(*groups: tuple[str, ...]) -> list[str]:
    """KEY=VALUE settings, a later group's value replacing an earlier one's in place."""
    out: dict[str, str] = {}
    for pair in (p for group in groups for p in group):
        out[pair.partition("=")[0]] = pair
    return list(out.values())


def train_command(check: Check, ctx: Context, run_dir: Path) -> list[str]:
    base = DEMO_RUN if check.model == "demo" else (f"dataset={ctx.corpus()}",)
    return [sys.executable, "-m", "core", "train", f"model={ctx.model(check)}",
            *merged(base, check.overrides, (f"output_dir={run_dir}",))]


def run_train(check: Check, ctx: Context, timeout: float) -> Result:
    run_dir = ctx.work / check.name
    argv = train_command(check, ctx, run_dir)  # may build the config model: budget time
    timeout = min(timeout, ctx.left_s())
    if timeout <= 0:
        return _over_budget(check, ctx)
    watched = Watched(argv, ctx.env, ctx.work / f"{check.name}.out", ctx.machine.cuda)
    code = watched.wait(timeout)
    watched.stop()  # anything the trainer left running in its group
    seconds = watched.close()
    result = judge_run(check, run_dir, code, timeout)
    result.figures.update(train_figures(run_dir), **_peak(watched))
    if check.mfu and result.figures.get("tokens_per_s"):
        result.figures.update(mfu_figures(Path(ctx.model(check)), result.figures["tokens_per_s"],
                                          ctx.machine))
    result.seconds, result.command, result.run_dir = round(seconds, 1), argv, str(run_dir)
    return result


def judge_run(check: Check, run_dir: Path, code: int | None, timeout: float) -> Result:
    """passed or failed, from the run folder (and the exit code)."""
    from core import runs

    if code is None:
        return Result(check.name, "failed", f"still running after {timeout:.0f} s (stopped)")
    status = runs.read_status_raw(run_dir) or {}
    if status.get("state") != "completed" or code != 0:
        why = status.get("error") or _last_line(run_dir / runs.LOG) or "no status.json"
        return Result(check.name, "failed", f"exit {code}, {status.get('state', 'no status')}:"
                                            f" {why}")
    losses = [r["loss"] for r in runs.read_metrics(run_dir) if r.get("loss") is not None]
    if not losses or not math.isfinite(losses[-1]):
        return Result(check.name, "failed", f"no finite loss in metrics.jsonl ({losses[-1:]})")
    for name, text in check.evidence:
        path = run_dir / name
        if not path.is_file() or text not in path.read_text(errors="replace"):
            where = "absent" if not path.is_file() else f"has no '{text}'"
            return Result(check.name, "failed", f"{name} {where}" +
                          (f": {check.hint}" if check.hint else ""))
    return Result(check.name, "passed")


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def train_figures(run_dir: Path) -> dict:
    """steps/s over the trainer's runtime; tokens/s as the median of the logged rates after
    the first quarter of the run (warm-up and compilation left out); the final loss."""
    from core import runs

    records = runs.read_metrics(run_dir)
    logged = [r for r in records if r.get("loss") is not None]
    end = next((r for r in reversed(records) if r.get("train_runtime")), None)
    out: dict = {}
    if end:
        out["steps"] = end["step"]
        out["steps_per_s"] = round(end["step"] / end["train_runtime"], 2)
    rates = [r["tokens_per_s"] for r in logged if r.get("tokens_per_s")]
    steady = rates[len(rates) // 4:] or rates
    if steady:
        out["tokens_per_s"] = round(statistics.median(steady), 1)
    if logged:
        out["final_loss"] = round(logged[-1]["loss"], 4)
    return out


def mfu_figures(model: Path, tokens_per_s: float, machine: Machine) -> dict:
    params = model_params(model)
    peak = peak_flops(machine.gpu_name) if machine.cuda else None
    out = {"params": params, "model_tflops": round(tokens_per_s * 6 * params / 1e12, 3),
           "peak_tflops": peak and peak / 1e12}
    value = mfu(tokens_per_s, params, peak)
    if value is not None:
        out["mfu"] = round(value, 4)
    else:
        out["mfu_note"] = (f"no bf16 peak known for {machine.gpu_name}" if machine.cuda
                           else "no peak FLOPs for a CPU")
    return out


def _peak(watched: Watched) -> dict:
    if watched.peak is None:
        return {}
    key = "peak_gpu_mib" if watched.gpu else "peak_rss_mib"
    return {key: round(watched.peak)}


# --- the serve row ----------------------------------------------------------------------

def run_serve(check: Check, ctx: Context, timeout: float) -> Result:
    """`tunebench serve` with the row's flags, up until /v1/models answers, then one chat
    reply; the server is stopped either way."""
    port = _free_port()
    argv = [sys.executable, "-m", "core", "serve", "--model", ctx.model(check),
            *check.overrides, "--port", str(port)]
    watched = Watched(argv, ctx.env, ctx.work / f"{check.name}.out", ctx.machine.cuda)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    try:
        result = _ask_server(check, url, watched, deadline)
    finally:
        watched.stop()
        result_seconds = watched.close()
    if result.result == "failed":  # the server's own last word says why, most often
        result.reason += f"; its last output: {_last_line(ctx.work / f'{check.name}.out')}"
    result.figures.update(_peak(watched))
    result.seconds, result.command = round(result_seconds, 1), argv
    return result


def _ask_server(check: Check, url: str, watched: Watched, deadline: float) -> Result:
    models = None
    while models is None:
        if watched.proc.poll() is not None:
            return Result(check.name, "failed", f"server exited ({watched.proc.returncode}) "
                          f"before answering")
        if time.monotonic() > deadline:
            return Result(check.name, "failed", "server did not answer /v1/models in time")
        models = _get_json(f"{url}/v1/models")
        time.sleep(0 if models else 1)
    ready = time.monotonic() - watched.start
    body = {"model": models["data"][0]["id"], "max_tokens": 32, "temperature": 0,
            "messages": [{"role": "user", "content": "Who are you?"}]}
    asked = time.monotonic()
    reply = _post_json(f"{url}/v1/chat/completions", body, deadline - asked)
    took = time.monotonic() - asked
    text = ((reply or {}).get("choices") or [{}])[0].get("message", {}).get("content")
    figures = {"ready_s": round(ready, 1), "reply_s": round(took, 2)}
    tokens = ((reply or {}).get("usage") or {}).get("completion_tokens")
    if tokens:
        figures.update(completion_tokens=tokens, tokens_per_s=round(tokens / took, 1))
    if not isinstance(text, str) or not text.strip():
        return Result(check.name, "failed", f"no reply text: {json.dumps(reply)[:200]}",
                      figures)
    return Result(check.name, "passed", "", {**figures, "reply": text[:60]})


def _get_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None


def _post_json(url: str, body: dict, timeout: float) -> dict | None:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=max(timeout, 1)) as response:
            return json.loads(response.read())
    except (OSError, ValueError, urllib.error.URLError) as err:
        return {"error": str(err)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- all rows ------------------------------------------------------------------------

RUNNERS = {"train": run_train, "serve": run_serve}


def run_check(check: Check, ctx: Context) -> Result:
    why = missing(check, ctx.machine)
    if why:
        return Result(check.name, "skipped", why)
    left = ctx.left_s()
    if left <= 0:
        return _over_budget(check, ctx)
    try:
        return RUNNERS[check.kind](check, ctx, min(check.timeout_s, left))
    except Exception as err:  # a bug or a broken input in this row must not stop the others
        return Result(check.name, "failed", f"{type(err).__name__}: {err}")


def _over_budget(check: Check, ctx: Context) -> Result:
    return Result(check.name, "skipped", f"the time budget ({ctx.budget_s:.0f} s) was spent "
                                         "before this row")


def selected(cpu_mode: bool, only: list[str] | None) -> list[Check]:
    """The rows of this mode (GPU rows too with --cpu: they show as skipped), or `only`."""
    rows = [c for c in CHECKS if c.mode == "gpu" or cpu_mode]
    if only:
        unknown = set(only) - {c.name for c in CHECKS}
        if unknown:
            raise SystemExit(f"unknown check(s): {', '.join(sorted(unknown))}; "
                             f"--list shows them")
        rows = [c for c in CHECKS if c.name in only]
    return rows


def run_all(rows: list[Check], ctx: Context) -> list[Result]:
    results = []
    for i, check in enumerate(rows, 1):
        print(f"[{i}/{len(rows)}] {check.name}: {check.what} ...", file=sys.stderr, flush=True)
        result = run_check(check, ctx)
        results.append(result)
        used = ctx.budget_s - ctx.left_s()
        print(f"    {result.result}{' - ' + result.reason if result.reason else ''} "
              f"({used:.0f} s of {ctx.budget_s:.0f} s used)", file=sys.stderr, flush=True)
    return results


# --- the table ------------------------------------------------------------------------

def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        value = f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value}{unit}"


def markdown(results: list[Result]) -> str:
    head = ("| check | result | steps/s | tokens/s | peak memory | final loss | MFU | time | "
            "notes |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in results:
        f = r.figures
        memory = (_fmt(f.get("peak_gpu_mib"), " MiB GPU") if "peak_gpu_mib" in f
                  else _fmt(f.get("peak_rss_mib"), " MiB RSS"))
        mfu_cell = f"{f['mfu']:.1%}" if "mfu" in f else ("n/a" if "mfu_note" in f else "-")
        notes = r.reason or _notes(f)
        lines.append(f"| {r.name} | {r.result} | {_fmt(f.get('steps_per_s'))} | "
                     f"{_fmt(f.get('tokens_per_s'))} | {memory} | {_fmt(f.get('final_loss'))} | "
                     f"{mfu_cell} | {_fmt(r.seconds, ' s')} | {notes.replace('|', '/')} |")
    return "\n".join(lines)


def _notes(f: dict) -> str:
    parts = []
    if "params" in f:
        parts.append(f"{f['params'] / 1e6:,.1f}M params, {f['model_tflops']} model TFLOP/s")
    if "mfu_note" in f:
        parts.append(f["mfu_note"])
    if "ready_s" in f:
        parts.append(f"ready in {f['ready_s']} s, reply in {f['reply_s']} s: "
                     f"{f.get('reply', '')!r}")
    if "steps" in f:
        parts.append(f"{f['steps']} steps")
    return "; ".join(parts)


def shown_command(check: Check) -> list[str]:
    """The row's command as --list and RESULTS.md show it (paths as placeholders)."""
    kind, _, shape = check.model.partition(":")
    model = "demo" if kind == "demo" else f"<built from SHAPES['{shape}']>"
    if check.kind == "serve":
        return ["tunebench", "serve", "--model", model, *check.overrides]
    base = DEMO_RUN if kind == "demo" else ("dataset=<corpus.jsonl>",)
    return ["tunebench", "train", f"model={model}", *merged(base, check.overrides)]


def describe_rows() -> str:
    """--list: each row's needs, command and pass rule."""
    lines = ["| check | mode | needs | command | timeout | passes when |",
             "|---|---|---|---|---|---|"]
    for c in CHECKS:
        needs = ", ".join(c.all_needs()) or "-"
        command = " ".join(shown_command(c))
        lines.append(f"| {c.name} | {c.mode} | {needs} | `{command}` | {c.timeout_s} s | "
                     f"{c.pass_rule()} |")
    return "\n".join(lines)


def row_facts(name: str) -> dict:
    """What a row is, for the JSON beside its outcome: needs, timeout, pass rule."""
    check = next(c for c in CHECKS if c.name == name)
    return {"what": check.what, "needs": check.all_needs(), "timeout_s": check.timeout_s,
            "pass_rule": check.pass_rule()}


def report(results: list[Result], ctx: Context, cpu_mode: bool, out: Path) -> dict:
    record = {"date": dt.date.today().isoformat(), "mode": "cpu" if cpu_mode else "gpu",
              "machine": asdict(ctx.machine), "budget_s": ctx.budget_s,
              "total_s": round(ctx.budget_s - ctx.left_s(), 1),
              "rows": [{**row_facts(r.name), **asdict(r)} for r in results]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    return record


# --- the command line -------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print(describe_rows())
        return 0
    rows = selected(args.cpu, args.only.split(",") if args.only else None)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(detect(args.cpu), work, args.cpu, args.budget_s)
    print(f"GPU check on {ctx.machine.gpu_name} ({'--cpu' if args.cpu else 'gpu'} mode), "
          f"{len(rows)} rows, budget {args.budget_s:.0f} s, work folder {work}",
          file=sys.stderr, flush=True)
    if any(missing(c, ctx.machine) is None and c.model == "demo" for c in rows):
        from core.demo_model import ensure_demo_model
        ensure_demo_model(progress=lambda *a, **k: None)  # built once, inside the budget
    results = run_all(rows, ctx)
    out = Path(args.out) if args.out else default_out(args.cpu)
    record = report(results, ctx, args.cpu, out)
    print(f"\nGPU check, {record['date']}, {ctx.machine.gpu_name}, {record['total_s']} s\n")
    print(markdown(results))
    print(f"\nwritten to {out}")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r.result == "failed" for r in results) else 0


def default_out(cpu_mode: bool) -> Path:
    return BENCH / "results" / f"gpu-check{'-cpu' if cpu_mode else ''}-{dt.date.today()}.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run the CPU rows; GPU rows skip")
    p.add_argument("--list", action="store_true", help="print the rows and exit")
    p.add_argument("--only", help="comma-separated check names")
    p.add_argument("--budget-s", type=float, default=BUDGET_S,
                   help=f"no row starts after this many seconds (default {BUDGET_S})")
    p.add_argument("--out", help="the JSON file (default bench/results/gpu-check-<date>.json)")
    p.add_argument("--work", help="folder for the runs (default: a temporary one, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
