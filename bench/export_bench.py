"""`tunebench export` per format: wall time, peak memory and output size.

    python bench/export_bench.py                      # demo + a ~115M-parameter random qwen2
    python bench/export_bench.py --models demo        # the demo model only (seconds)
    python bench/export_bench.py --formats gguf-f16,gguf-q4_k_m

Each export is one fresh `python -m core export --model M --out DIR --format F` process,
run the way a user runs it (verification on), one after another. Models:

- demo: the built-in demo model (3.5M parameters, fp32).
- big: a qwen2 built from a config with random weights (hidden 768, 12 layers, 12 heads,
  intermediate 3072, the demo tokenizer's 2048-token vocabulary, tied embeddings, about
  115M parameters), saved once with save_pretrained (safetensors, fp32) under --workdir.
  Its logits are near uniform, so verification is expected to FAIL for it (a GGUF or bnb
  copy cannot reproduce greedy choices between near-equal logits); export then keeps
  nothing, but the process still does all the work, and the sizes come from its result.

Formats: safetensors (the plain merged export, for reference), gguf-f16, gguf-q4_k_m,
bnb-4bit (and bnb-8bit / gguf-q8_0 / gguf-bf16 on request).

Measured per export:
- wall s: process start to exit (includes Python and library imports, the model load, the
  conversion and the verification).
- peak RSS MB: the larger of (1) the process tree's summed RSS sampled with psutil every
  0.1 s and (2) ru_maxrss of the process from wait4(). Both are MiB (2**20 bytes).
- model MB: the fp32 safetensors bytes of the source (MiB).
- peak / model, and (peak - baseline) / model, where baseline is the RSS of a fresh Python
  process that imported torch, transformers and peft (what every export process holds
  before it touches a model; measured here once, median of 3). The export's own
  in-process baseline (after those imports, before the load) is recorded too.
- output MB: the exported weight files (from the export's result, also when it failed).
- verified: the export's own checks (the process prints them; TUNEBENCH_PROGRESS=json
  gives them as one result line, which this bench parses).

Results go to bench/results/export-<machine>-<date>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import REPO, RESULTS, machine  # noqa: E402

sys.path.insert(0, str(REPO))

os.environ.setdefault("TUNEBENCH_CACHE", "/tmp/tb-exportbench-cache")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FORMATS = {  # name: the export flags
    "safetensors": ["--format", "safetensors"],
    "gguf-f16": ["--format", "gguf", "--gguf-type", "f16"],
    "gguf-bf16": ["--format", "gguf", "--gguf-type", "bf16"],
    "gguf-q8_0": ["--format", "gguf", "--gguf-type", "q8_0"],
    "gguf-q4_k_m": ["--format", "gguf", "--gguf-type", "q4_k_m"],
    "bnb-4bit": ["--format", "bnb-4bit"],
    "bnb-8bit": ["--format", "bnb-8bit"],
}
BIG = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
           num_key_value_heads=12, intermediate_size=3072)
MiB = 2**20


def build_big(demo: Path, folder: Path) -> Path:
    """A random-weight qwen2 of about 115M parameters with the demo tokenizer (once)."""
    if (folder / "config.json").is_file() and list(folder.glob("*.safetensors")):
        return folder
    code = f"""
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
torch.manual_seed(0)
config = AutoConfig.from_pretrained({str(demo)!r})
for key, value in {BIG!r}.items():
    setattr(config, key, value)
config.layer_types = ["full_attention"] * config.num_hidden_layers
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.generation_config = AutoModelForCausalLM.from_pretrained({str(demo)!r}).generation_config
model.save_pretrained({str(folder)!r}, safe_serialization=True)
AutoTokenizer.from_pretrained({str(demo)!r}).save_pretrained({str(folder)!r})
print(sum(p.numel() for p in model.parameters()), "parameters")
"""
    folder.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code], check=True)
    return folder


def weights_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / MiB


def library_baseline(repeats: int = 3) -> float:
    """RSS (MiB) of a fresh Python that imported torch, transformers and peft."""
    code = ("import psutil, torch, transformers, peft\n"
            "from transformers import AutoModelForCausalLM\n"
            "print(psutil.Process().memory_info().rss / 2**20)")
    runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout.split()[-1]) for _ in range(repeats)]
    return statistics.median(runs)


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_export(model: str, fmt: str, out: Path, log: Path) -> dict:
    """One `python -m core export` process; wall time, peak RSS and its result line."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "core", "export", "--model", model, "--out", str(out),
           *FORMATS[fmt]]
    env = dict(os.environ, TUNEBENCH_PROGRESS="json")
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err,
                                text=True)
        watched = psutil.Process(proc.pid)
        peak = [0]
        done = threading.Event()

        def sample():
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], tree_rss(watched))
                except psutil.Error:
                    pass
                done.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss of this child, KiB
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    result = {}
    for line in stdout.splitlines():
        if line.startswith('{"result"'):
            result = json.loads(line)["result"]
    sampled, maxrss = peak[0] / MiB, usage.ru_maxrss / 1024
    return {"cmd": " ".join(cmd[1:]), "returncode": proc.returncode, "wall_s": round(wall, 2),
            "peak_rss_mb": round(max(sampled, maxrss), 1),
            "sampled_peak_mb": round(sampled, 1), "ru_maxrss_mb": round(maxrss, 1),
            "verified_ok": bool(result.get("ok")) if result else None,
            "output_mb": round(result["size_mb"] * 1e6 / MiB, 1) if result else None,
            "result": result, "stderr_log": str(log),
            "stdout_tail": stdout.splitlines()[-3:] if not result else None}


def table(runs: list[dict], baseline: float) -> str:
    lines = ["| model | format | wall s | peak RSS MB | model MB | peak / model | "
             "(peak - baseline) / model | output MB | verified |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        model_mb = r["model_mb"]
        checks = r["result"].get("checks", []) if r["result"] else []
        failed = [c["name"] for c in checks if not c["ok"]]
        verdict = ("ok" if r["verified_ok"] else "FAILED" + (f" ({'; '.join(failed)})"
                                                                if failed else ""))
        lines.append(
            f"| {r['model']} | {r['format']} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{model_mb:.1f} | {r['peak_rss_mb'] / model_mb:.2f}x | "
            f"{(r['peak_rss_mb'] - baseline) / model_mb:.2f}x | "
            f"{r['output_mb'] if r['output_mb'] is not None else '-'} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,big", help="demo and/or big, comma-separated")
    parser.add_argument("--formats", default="safetensors,gguf-f16,gguf-q4_k_m,bnb-4bit",
                        help=f"comma-separated, of {', '.join(FORMATS)}")
    parser.add_argument("--workdir", default="/tmp/tb-exportbench",
                        help="where the big model and the exports go (exports are deleted)")
    parser.add_argument("--keep", action="store_true", help="keep the exported folders")
    parser.add_argument("--out", default=None, help="JSON result file")
    args = parser.parse_args(argv)

    from core import gguf_export
    from core.demo_model import ensure_demo_model

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    demo = ensure_demo_model()
    formats = args.formats.split(",")
    if any(f.startswith("gguf") for f in formats):
        gguf_export.converter_dir()  # fetch llama.cpp's converter once, outside the timings
    sources = {}
    for name in args.models.split(","):
        sources[name] = ("demo", demo) if name == "demo" else (
            str(build_big(demo, work / "big-qwen2")),) * 2
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
              "cache": os.environ["TUNEBENCH_CACHE"]}
    baseline = library_baseline()
    report["library_baseline_rss_mb"] = round(baseline, 1)
    print(f"baseline RSS after importing torch, transformers, peft: {baseline:.0f} MB",
          flush=True)
    runs = []
    for name, (model, folder) in sources.items():
        model_mb = weights_mb(Path(folder))
        for fmt in formats:
            out = work / f"export-{name}-{fmt}"
            print(f"== {name} {fmt} ...", flush=True)
            run = run_export(model, fmt, out, work / f"export-{name}-{fmt}.log")
            run.update(model=name, format=fmt, model_mb=round(model_mb, 1))
            runs.append(run)
            print(f"   {run['wall_s']:.1f} s, peak {run['peak_rss_mb']:.0f} MB "
                  f"({run['peak_rss_mb'] / model_mb:.2f}x of {model_mb:.0f} MB), "
                  f"verified {run['verified_ok']}, rc {run['returncode']}", flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    report["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report.update(big_config=BIG, runs=runs)
    print(table(runs, baseline), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"export-cpu-{date.today()}.json"
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
