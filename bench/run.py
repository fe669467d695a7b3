"""tunebench vs a plain TRL trainer script: same model, data and hyperparameters.

    python bench/run.py --workload mixed        # or identity, dpo, grpo, or all
    python bench/run.py --workload mixed --repeats 3 --set packing=true

Each run is its own subprocess (tunebench through `python -m core train`, the
baseline through bench/baseline_trl.py for SFT, baseline_trl_dpo.py for DPO and
baseline_trl_grpo.py for GRPO), measured from outside for wall time and
peak memory of the process tree, and from inside (the trainers' own counters)
for training time and the non-padding tokens trained on. The two alternate
order between repeats so drift on a shared machine hits both alike. The median
of the repeats is printed side by side with ratios and written as JSON.

On a machine with an NVIDIA GPU, `--gpu-model` builds a Qwen2 model of a few
hundred million parameters from a config (random weights, the demo tokenizer)
and the table adds model FLOPs utilisation (MFU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import run_measured  # noqa: E402
from workloads import REPO, Workload, workloads  # noqa: E402

RESULTS = REPO / "bench" / "results"


def tunebench_cmd(w: Workload, model: str, out: Path, extra: list[str]) -> list[str]:
    """tunebench with its own defaults (padding-free batches, fp32 on CPU, no checkpointing)
    plus the hyperparameters shared with the baseline; the scheduler matches TRL's configs'."""
    name, author = w.identity
    return [sys.executable, "-m", "core", "train", f"model={model}", f"dataset={w.dataset}",
            f"output_dir={out}", f"stage={w.stage}", f"method={w.method}", f"epochs={w.epochs}",
            f"batch_size={w.batch_size}", f"cutoff_len={w.cutoff_len}",
            f"learning_rate={w.learning_rate}", f"lora_rank={w.lora_rank}",
            f"lora_alpha={w.lora_alpha}", "lora_target=all-linear", "lr_scheduler=linear",
            "warmup_ratio=0", "seed=42", f"identity_name={name}", f"identity_author={author}",
            *(f"{k}={v}" for k, v in w.extra.items()), *extra]


def baseline_cmd(w: Workload, model: str, out: Path, extra: list[str] = ()) -> list[str]:
    """The stage's plain TRL script with the same shared settings (bench/baseline_trl*.py)."""
    script = {"sft": "baseline_trl.py", "dpo": "baseline_trl_dpo.py",
              "grpo": "baseline_trl_grpo.py"}[w.stage]
    shared = ["--epochs", str(w.epochs), "--batch-size", str(w.batch_size),
              "--learning-rate", str(w.learning_rate), "--lora-rank", str(w.lora_rank),
              "--lora-alpha", str(w.lora_alpha), "--seed", "42"]
    if w.stage == "sft":
        shared += ["--method", w.method, "--max-length", str(w.cutoff_len)]
    elif w.stage == "dpo":
        shared += ["--max-length", str(w.cutoff_len), "--beta", str(w.extra["pref_beta"]),
                   "--loss", w.extra["pref_loss"]]
    else:  # grpo: the prompts are far below cutoff_len, which GRPOConfig has no field for
        shared += ["--beta", str(w.extra["pref_beta"]),
                   "--num-generations", str(w.extra["num_generations"]),
                   "--max-completion-length", str(w.extra["max_completion_length"])]
    return [sys.executable, str(REPO / "bench" / script), model, w.dataset, str(out), *shared,
            *(arg for item in extra for arg in ("--set", item))]


# TRL's progress bar for the one reference pass before training (precompute_ref_log_probs).
_REFERENCE_PASS = re.compile(r"Computing reference log probs for train dataset: +100%[^\[]*"
                             r"\[([\d:]+)<")


def _reference_pass_s(log: str) -> float:
    """Seconds of the reference pass in train.log (0 when there was none)."""
    found = _REFERENCE_PASS.findall(log.replace("\r", "\n"))
    if not found:
        return 0.0
    seconds = 0
    for part in found[-1].split(":"):
        seconds = seconds * 60 + int(part)
    return float(seconds)


def _tunebench_inside(out: Path) -> dict:
    """Training time and tokens from the run directory's metrics.jsonl.

    DPO: TRL computes the frozen reference's log-probs once, in the trainer's constructor,
    outside train_runtime; the baseline does it inside every step. So the train time here
    adds that pass (from TRL's progress bar in train.log, to the second), and both sides'
    train times cover the same work."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    summary = next((x for x in reversed(lines) if "train_runtime" in x), {})
    train = [x for x in lines if "loss" in x]
    tokens = summary.get("num_tokens") or max((x.get("num_tokens", 0) for x in train), default=0)
    share = [x["nonpad_share"] for x in train if "nonpad_share" in x]
    log = out / "train.log"
    reference_s = _reference_pass_s(log.read_text(errors="replace")) if log.exists() else 0.0
    runtime = summary.get("train_runtime", lines[-1]["elapsed_s"])
    return {"train_s": round(runtime + reference_s, 3), "trainer_runtime_s": runtime,
            "reference_pass_s": reference_s,
            "num_tokens": tokens, "steps": lines[-1]["step"],
            "loss": train[-1]["loss"] if train else None,
            "nonpad_share": round(statistics.mean(share), 4) if share else None}


def _baseline_inside(output: str) -> dict:
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{") and "train_s" in line:
            return json.loads(line)
    raise RuntimeError("the baseline printed no result line:\n" + output[-3000:])


def run_one(tool: str, w: Workload, model: str, extra: list[str], env: dict) -> dict:
    """One measured run; `extra` is KEY=VALUE settings for that tool (none for the benchmark's
    baseline, which runs with its TRL config's defaults)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{tool}-") as tmp:
        out = Path(tmp) / "run"
        cmd = tunebench_cmd(w, model, out, extra) if tool == "tunebench" else \
            baseline_cmd(w, model, out, extra)
        m = run_measured(cmd, env=env, cwd=str(REPO))
        if m.returncode != 0:
            raise RuntimeError(f"{tool} failed ({m.returncode}):\n{m.output[-4000:]}")
        inside = _tunebench_inside(out) if tool == "tunebench" else _baseline_inside(m.output)
    result = {"wall_s": round(m.wall_s, 2), "cpu_s": round(m.cpu_s, 2),
              "peak_rss_gb": round(m.peak_rss_gb, 3), **inside}
    result["tokens_per_s"] = round(result["num_tokens"] / result["train_s"], 1)
    print(f"  {tool:9s} wall {result['wall_s']:6.1f}s  cpu {result['cpu_s']:6.1f}s  "
          f"train {result['train_s']:6.1f}s  "
          f"{result['tokens_per_s']:8.0f} tok/s  peak {result['peak_rss_gb']:.2f} GB", flush=True)
    return result


def summarize(runs: list[dict], samples: float, flops_per_token: float | None,
              peak_flops: float | None) -> dict:
    med = {k: statistics.median(r[k] for r in runs)
           for k in ("wall_s", "cpu_s", "train_s", "tokens_per_s", "peak_rss_gb", "num_tokens")}
    med["samples_per_s"] = round(samples / med["train_s"], 2)
    if flops_per_token and peak_flops:
        med["mfu"] = round(med["tokens_per_s"] * flops_per_token / peak_flops, 4)
    return med


def table(name: str, tb: dict, base: dict) -> str:
    rows = [("tokens/s (train)", "tokens_per_s", "{:.0f}", True),
            ("samples/s (train)", "samples_per_s", "{:.2f}", True),
            ("train time (s)", "train_s", "{:.1f}", False),
            ("wall time (s)", "wall_s", "{:.1f}", False),
            ("CPU time (s)", "cpu_s", "{:.1f}", False),
            ("peak memory (GB)", "peak_rss_gb", "{:.2f}", False)]
    if "mfu" in tb:
        rows.append(("MFU", "mfu", "{:.1%}", True))
    lines = [f"workload {name}", f"{'':20s}{'tunebench':>12s}{'TRL script':>12s}{'ratio':>9s}"]
    for label, key, fmt, higher_better in rows:
        ratio = tb[key] / base[key] if base[key] else float("nan")
        lines.append(f"{label:20s}{fmt.format(tb[key]):>12s}{fmt.format(base[key]):>12s}"
                     f"{ratio:>8.2f}x")
    return "\n".join(lines)


def machine() -> dict:
    from core import device

    dev = device.detect()
    return {"device": dev.describe(), "cpu_count": psutil.cpu_count(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "platform": platform.platform()}


def bench_workload(w: Workload, model: str, repeats: int, extra: list[str], env: dict,
                   gpu: dict | None, only: str | None = None,
                   baseline_extra: list[str] = ()) -> dict:
    print(f"== {w.name}: {w.notes}", flush=True)
    tools = (only,) if only else ("tunebench", "baseline")
    runs = {t: [] for t in tools}
    for i in range(repeats):
        for tool in tools if i % 2 == 0 else tools[::-1]:
            runs[tool].append(run_one(tool, w, model, extra if tool == "tunebench" else
                                      list(baseline_extra), env))
    n_rows = sum(1 for _ in open(w.dataset, encoding="utf-8"))
    # MFU counts a forward and backward per token: SFT's sums, not DPO's or GRPO's passes.
    fpt = gpu and w.stage == "sft" and gpu["flops_per_token"][w.method]
    med = {t: summarize(runs[t], w.samples(n_rows), fpt, gpu and gpu["peak_flops"])
           for t in tools}
    result = {"workload": w.__dict__, "tunebench_settings": extra,
              "baseline_settings": list(baseline_extra), "runs": runs, "median": med}
    if not only:
        tb, base = med["tunebench"], med["baseline"]
        print(table(w.name, tb, base), flush=True)
        result["ratio"] = {k: round(tb[k] / base[k], 3) for k in tb if base.get(k)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("mixed", "identity", "dpo", "grpo", "all"),
                        default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="demo", help="model folder, or 'demo'")
    parser.add_argument("--gpu-model", action="store_true",
                        help="build a few-hundred-million-parameter Qwen2 from a config (GPU runs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra tunebench settings, e.g. packing=true")
    parser.add_argument("--baseline-set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field of the baseline's TRL config (JSON value), to "
                             "find out what a default costs, e.g. gradient_checkpointing=false")
    parser.add_argument("--only", choices=("tunebench", "baseline"), default=None,
                        help="run one side only (for quick checks; prints no ratios)")
    parser.add_argument("--out", default=None, help="JSON result file")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from core.models import resolve_model

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    model, gpu = resolve_model(args.model), None
    work = Path(tempfile.mkdtemp(prefix="tunebench-bench-"))
    if args.gpu_model:
        from gpu_model import build_gpu_model, gpu_facts

        model = str(build_gpu_model(work / "gpu-model"))
        gpu = gpu_facts(model)
    chosen = workloads(work / "data")
    names = list(chosen) if args.workload == "all" else [args.workload]
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
              "model": model, "repeats": args.repeats, "gpu": gpu, "results": {}}
    for name in names:
        report["results"][name] = bench_workload(chosen[name], model, args.repeats, args.set,
                                                 env, gpu, args.only, args.baseline_set)
    report["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"{args.workload}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
