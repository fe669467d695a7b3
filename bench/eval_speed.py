"""`tunebench eval`'s speed against plain loops: batched predict and length-batched loss.

    python bench/eval_speed.py                       # the demo model alone
    python bench/eval_speed.py --train               # train the identity fine-tune first
    python bench/eval_speed.py --adapter saves/RUN   # a run folder (its final/) or checkpoint

Both sides use the same loaded model (the demo model, with the checkpoint when given) and
the same CPU threads (core.models.pick_cpu_threads, as `tunebench eval` sets them), in one
process, after a warm-up. The prompts are the bundled identity set's (68, placeholders
filled), or the datasets named with --dataset.

- predict: a plain loop calls `model.generate` one prompt at a time, as a user writes it
  (apply_chat_template, greedy, the chat stop tokens), against `ChatEngine.replies` in
  batches, prompts longest first as eval_tasks.run_predict orders them. Agreement is the
  share of prompts whose replies are the same token for token.
- loss: one row at a time through `model(input_ids, labels=...)` against eval_tasks'
  length-sorted batches (`_batch_nll`); both losses are token-weighted.

Each measurement runs --repeats times, the two sides alternating order; the median is
reported, with every repeat in the JSON file (bench/results/ unless --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `tunebench eval` does, before torch
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import REPO, RESULTS, machine  # noqa: E402

sys.path.insert(0, str(REPO))
IDENTITY = ("Tuney", "the tunebench team")


# --- setup -------------------------------------------------------------------------------

def train_identity(model: Path, folder: Path) -> Path:
    """`tunebench train` with its defaults on the identity set; the run's final/."""
    run = folder / "identity-run"
    cmd = [sys.executable, "-m", "core", "train", f"model={model}", "dataset=identity",
           f"dataset_dir={REPO / 'data'}", f"output_dir={run}",
           f"identity_name={IDENTITY[0]}", f"identity_author={IDENTITY[1]}"]
    print("training:", " ".join(cmd[2:]), flush=True)
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"training failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    print(f"trained in {time.monotonic() - started:.0f} s: {run} (reuse it with --adapter)",
          flush=True)
    return run / "final"


def checkpoint_of(path: str) -> str:
    """A run folder means its final/; anything else is taken as the checkpoint itself."""
    folder = Path(path).expanduser().resolve()
    return str(folder / "final") if (folder / "final").is_dir() else str(folder)


def eval_config(model: Path, adapter: str | None, datasets: list[str]):
    from core import config as cfg
    return dataclasses.replace(
        cfg.EvalConfig(), model=str(model), adapter=adapter or "", dataset=list(datasets),
        dataset_dir=str(REPO / "data"), identity_name=IDENTITY[0],
        identity_author=IDENTITY[1])


# --- predict -----------------------------------------------------------------------------

def cut(new: list[int], stops: set[int]) -> list[int]:
    """The reply's tokens: up to its first stop token (not included)."""
    end = next((i for i, t in enumerate(new) if t in stops), len(new))
    return new[:end]


def plain_loop(model, tokenizer, prompts: list[list[dict]], max_new: int,
               stops: list[int]) -> list[list[int]]:
    """One prompt at a time, written as a user would write it."""
    import torch

    replies = []
    for messages in prompts:
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        inputs = inputs.to(model.device)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=stops)
        replies.append(cut(out[0, inputs["input_ids"].shape[1]:].tolist(), set(stops)))
    return replies


class Recorder:
    """Keeps what the engine's `generate` returned, so replies compare token for token
    (Reply carries the text only). A pass-through: it costs nothing measurable."""

    def __init__(self, model):
        self.model, self.outputs = model, []
        self._generate = model.generate

    def __enter__(self):
        def generate(*args, **kwargs):
            out = self._generate(*args, **kwargs)
            self.outputs.append((kwargs["input_ids"].shape[1], out))
            return out
        self.model.generate = generate
        return self

    def __exit__(self, *exc):
        del self.model.generate  # the class's method again


def batched(engine, prompts: list[list[dict]], max_new: int, size: int,
            stops: list[int]) -> list[list[int]]:
    """ChatEngine.replies over batches of `size`, longest prompts first (run_predict's
    order); the replies' tokens, in the prompts' order."""
    from core.config import GenConfig

    order = sorted(range(len(prompts)),
                   key=lambda i: -sum(len(m["content"]) for m in prompts[i]))
    settings = GenConfig(max_new_tokens=max_new)
    replies: list[list[int]] = [[] for _ in prompts]
    with Recorder(engine.model) as recorded:
        for start in range(0, len(order), size):
            batch = order[start:start + size]
            got = engine.replies([prompts[i] for i in batch], settings, "after")
            width, out = recorded.outputs[-1]
            for k, i in enumerate(batch):
                replies[i] = cut(out[k, width:].tolist(), set(stops))
                assert len(replies[i]) == got[k].tokens
    return replies


def agreement(plain: list[list[int]], other: list[list[int]]) -> dict:
    """Identical replies, and for the others where they part and by how many tokens."""
    differ = []
    for i, (a, b) in enumerate(zip(plain, other)):
        if a != b:
            first = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            differ.append({"prompt": i, "first_diff_at": first, "plain_tokens": len(a),
                           "tokens": len(b),
                           "tokens_differing": sum(x != y for x, y in zip(a, b))
                           + abs(len(a) - len(b))})
    return {"identical_pct": round(100 * (len(plain) - len(differ)) / len(plain), 2),
            "differing": differ}


def timed(fn) -> tuple[float, float, object]:
    """Wall seconds, this process's CPU seconds (less hurt by other work on a shared
    machine: time spent waiting for a core is not counted), and fn's result."""
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - start, time.process_time() - cpu, result


def bench_predict(engine, prompts, max_new: int, sizes: list[int], repeats: int) -> dict:
    from core.chat import stop_token_ids

    model, tok = engine.model, engine.tokenizer
    stops = stop_token_ids(tok, model.generation_config)
    plain_loop(model, tok, prompts[:2], 8, stops)  # warm-up, both paths
    batched(engine, prompts[:4], 8, 4, stops)
    sides = ["plain"] + [f"batch {s}" for s in sizes]
    runs: dict[str, list[float]] = {s: [] for s in sides}
    cpus: dict[str, list[float]] = {s: [] for s in sides}
    replies: dict[str, list] = {}
    for r in range(repeats):
        for side in sides if r % 2 == 0 else sides[::-1]:
            if side == "plain":
                seconds, cpu, got = timed(lambda: plain_loop(model, tok, prompts, max_new, stops))
            else:
                size = int(side.split()[1])
                seconds, cpu, got = timed(lambda: batched(engine, prompts, max_new, size, stops))
            if side in replies and replies[side] != got:
                print(f"  note: {side} replied differently on repeat {r + 1}", flush=True)
            replies.setdefault(side, got)
            runs[side].append(round(seconds, 3))
            cpus[side].append(round(cpu, 3))
            print(f"  predict {side:9s} {seconds:7.2f} s  {len(prompts) / seconds:6.2f} "
                  f"replies/s  (CPU {cpu:6.2f} s)", flush=True)
    tokens = {s: sum(len(x) for x in replies[s]) for s in sides}
    at_limit = {s: sum(len(x) >= max_new for x in replies[s]) for s in sides}
    result = {}
    for side in sides:
        med = statistics.median(runs[side])
        result[side] = {"seconds": runs[side], "median_s": round(med, 3),
                        "cpu_seconds": cpus[side],
                        "median_cpu_s": round(statistics.median(cpus[side]), 3),
                        "replies_per_s": round(len(prompts) / med, 3),
                        "tokens_per_s": round(tokens[side] / med, 1),
                        "reply_tokens": tokens[side], "replies_at_max_new_tokens": at_limit[side]}
        if side != "plain":
            result[side]["speedup"] = round(result["plain"]["median_s"] / med, 2)
            result[side]["speedup_cpu"] = round(
                result["plain"]["median_cpu_s"] / result[side]["median_cpu_s"], 2)
            result[side]["agreement"] = agreement(replies["plain"], replies[side])
    return result


# --- loss --------------------------------------------------------------------------------

def loss_rows(config, tokenizer) -> list[dict]:
    """The rows eval_tasks.run_loss scores: encoded as training encodes them."""
    from core import eval_tasks, stages
    rows = [stages.STAGES[stage].encode(record, tokenizer, config.cutoff_len)
            for stage, record in eval_tasks.check_loss(config).rows]
    return [r for r in rows if r is not None and any(x != -100 for x in r["labels"])]


def plain_loss(model, rows: list[dict]) -> tuple[float, int]:
    """One row at a time through the model's own loss (a mean over the row's predicted
    tokens), weighted back by their count so the figure is token-weighted."""
    import torch

    total, count = 0.0, 0
    for row in rows:
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        with torch.inference_mode():
            loss = model(input_ids=ids.to(model.device), labels=labels.to(model.device)).loss
        n = int((labels[:, 1:] != -100).sum())
        total, count = total + float(loss) * n, count + n
    return total, count


def length_batched_loss(model, rows: list[dict], tokenizer, size: int) -> tuple[float, int]:
    """eval_tasks.run_loss's way: sorted by length, batches of `size`, `_batch_nll`."""
    from core.eval_tasks import _batch_nll
    rows = sorted(rows, key=lambda r: len(r["input_ids"]))
    total, count = 0.0, 0
    for start in range(0, len(rows), size):
        nll, n = _batch_nll(model, rows[start:start + size], tokenizer)
        total, count = total + nll, count + n
    return total, count


def bench_loss(engine, rows: list[dict], size: int, repeats: int) -> dict:
    tok = engine.tokenizer
    with engine.using("after") as model:
        plain_loss(model, rows[:4])  # warm-up
        length_batched_loss(model, rows[:8], tok, size)
        sides = {"plain": lambda: plain_loss(model, rows),
                 f"batch {size}": lambda: length_batched_loss(model, rows, tok, size)}
        runs: dict[str, list[float]] = {s: [] for s in sides}
        cpus: dict[str, list[float]] = {s: [] for s in sides}
        figures = {}
        for r in range(repeats):
            for side in list(sides) if r % 2 == 0 else list(sides)[::-1]:
                seconds, cpu, (total, count) = timed(sides[side])
                runs[side].append(round(seconds, 3))
                cpus[side].append(round(cpu, 3))
                figures[side] = (total / count, count)
                print(f"  loss    {side:9s} {seconds:7.2f} s  {len(rows) / seconds:6.1f} rows/s"
                      f"  (CPU {cpu:5.2f} s)  loss {total / count:.6f}", flush=True)
    result = {}
    for side in sides:
        med = statistics.median(runs[side])
        result[side] = {"seconds": runs[side], "median_s": round(med, 3),
                        "cpu_seconds": cpus[side],
                        "median_cpu_s": round(statistics.median(cpus[side]), 3),
                        "rows_per_s": round(len(rows) / med, 2),
                        "loss": round(figures[side][0], 7), "tokens": figures[side][1]}
    batch = result[f"batch {size}"]
    batch["speedup"] = round(result["plain"]["median_s"] / batch["median_s"], 2)
    batch["speedup_cpu"] = round(result["plain"]["median_cpu_s"] / batch["median_cpu_s"], 2)
    batch["loss_diff"] = float(f"{abs(figures[f'batch {size}'][0] - figures['plain'][0]):.3g}")
    return result


# --- report ------------------------------------------------------------------------------

def table(predict: dict, loss: dict, n_prompts: int, n_rows: int, max_new: int) -> str:
    lines = [f"predict: {n_prompts} prompts, greedy, max_new_tokens {max_new} (median)",
             f"{'':22s}{'replies/s':>10s}{'tokens/s':>10s}{'speedup':>9s}{'(CPU)':>8s}"
             f"{'identical':>11s}{'at limit':>10s}"]
    for side, r in predict.items():
        label = "plain generate loop" if side == "plain" else f"tunebench {side}"
        agree = f"{r['agreement']['identical_pct']:.1f}%" if "agreement" in r else ""
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        cpu = f"{r['speedup_cpu']:.2f}x" if "speedup_cpu" in r else ""
        lines.append(f"{label:22s}{r['replies_per_s']:>10.2f}{r['tokens_per_s']:>10.0f}"
                     f"{speed:>9s}{cpu:>8s}{agree:>11s}{r['replies_at_max_new_tokens']:>10d}")
    lines += ["", f"loss: {n_rows} rows (median)",
              f"{'':22s}{'rows/s':>10s}{'speedup':>9s}{'(CPU)':>8s}{'loss':>12s}{'tokens':>8s}"
              f"{'difference':>12s}"]
    for side, r in loss.items():
        label = "plain per-row loop" if side == "plain" else f"tunebench {side}"
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        diff = f"{r['loss_diff']:.1e}" if "loss_diff" in r else ""
        cpu = f"{r['speedup_cpu']:.2f}x" if "speedup_cpu" in r else ""
        lines.append(f"{label:22s}{r['rows_per_s']:>10.1f}{speed:>9s}{cpu:>8s}{r['loss']:>12.6f}"
                     f"{r['tokens']:>8d}{diff:>12s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=None, help="a run folder (its final/) or checkpoint")
    parser.add_argument("--train", action="store_true",
                        help="train the identity fine-tune first (tunebench's defaults)")
    parser.add_argument("--dataset", action="append", default=None,
                        help="dataset name (repeatable); default identity")
    parser.add_argument("--batch-sizes", default="8,16,32",
                        help="predict batch sizes, comma-separated (eval's default is 8)")
    parser.add_argument("--loss-batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="eval's default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON result file")
    args = parser.parse_args(argv)

    from core import models
    from core.chat import ChatEngine
    from core.demo_model import ensure_demo_model

    model = ensure_demo_model()
    adapter = checkpoint_of(args.adapter) if args.adapter else None
    if args.train:
        adapter = str(train_identity(model, Path(tempfile.mkdtemp(prefix="tb-eval-speed-"))))
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
              "model": str(model), "adapter": adapter, "repeats": args.repeats}
    config = eval_config(model, adapter, args.dataset or ["identity"])
    engine = ChatEngine()
    loaded = engine.load(str(model), adapter)
    models.pick_cpu_threads(loaded.params, generates=True)  # as core/evaluate.py does
    import torch
    report["machine"].update(torch_threads=torch.get_num_threads(), torch=torch.__version__,
                             omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
    print(loaded.describe(), f"; {torch.get_num_threads()} thread(s)", flush=True)

    from core.eval_tasks import check_predict
    prompts = [row["prompt"] for row in check_predict(config).rows]
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    predict = bench_predict(engine, prompts, args.max_new_tokens, sizes, args.repeats)
    rows = loss_rows(config, engine.tokenizer)
    loss = bench_loss(engine, rows, args.loss_batch_size, args.repeats)
    report["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report.update(datasets=config.dataset, prompts=len(prompts), loss_rows=len(rows),
                  max_new_tokens=args.max_new_tokens, predict=predict, loss=loss)
    print(table(predict, loss, len(prompts), len(rows), args.max_new_tokens), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"eval-speed-{'tuned' if adapter else 'base'}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out = Path(args.out) if args.out else RESULTS / name
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
