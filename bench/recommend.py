"""Measure the settings the demo model recommends, per stage and method.

For each candidate, train the demo model for real (`tunebench train`, as a user does),
then measure whether it learned:
  sft  ask "Who are you?" and "你是谁？" of the result; learned = both replies carry the
       identity's name and author, made-up ones used nowhere else, spelled right;
  pt   the final training loss against the first (plain text has no question to ask).
Writes one JSON file under bench/results/ with every candidate's outcome, wall time and
losses. core/demo_model.py's RECOMMENDED cites the file its values come from.

    python bench/recommend.py [--only sft/full] [--out bench/results/recommend.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAME, AUTHOR = "Quillon", "Marrow Works"

# (stage, method, settings): the candidates tried, most promising first per method.
CANDIDATES = [
    ("sft", "lora", dict(lora_rank=32, lora_alpha=64, learning_rate=2e-3, epochs=20)),
    ("sft", "dora", dict(lora_rank=32, lora_alpha=64, learning_rate=2e-3, epochs=20)),
    ("sft", "qlora", dict(lora_rank=32, lora_alpha=64, learning_rate=2e-3, epochs=20)),
    ("sft", "oft", dict(learning_rate=2e-3, epochs=20)),
    ("sft", "oft", dict(learning_rate=5e-3, epochs=20)),
    ("sft", "full", dict(learning_rate=5e-4, epochs=10)),
    ("sft", "full", dict(learning_rate=1e-3, epochs=10)),
    ("sft", "freeze", dict(freeze_layers=2, learning_rate=1e-3, epochs=15)),
    ("sft", "freeze", dict(freeze_layers=2, learning_rate=2e-3, epochs=20)),
    ("pt", "lora", dict(lora_rank=32, lora_alpha=64, learning_rate=2e-3, epochs=10)),
    ("pt", "lora", dict(lora_rank=32, lora_alpha=64, learning_rate=3e-3, epochs=30)),
    ("pt", "full", dict(learning_rate=5e-4, epochs=10)),
    ("pt", "full", dict(learning_rate=1e-3, epochs=30)),
]


def train(run_dir: Path, stage: str, method: str, settings: dict) -> tuple[int, float]:
    dataset = "identity" if stage == "sft" else "text_demo"
    args = [f"{k}={v}" for k, v in {"model": "demo", "dataset": dataset, "stage": stage,
                                    "method": method, "identity_name": NAME,
                                    "identity_author": AUTHOR, "batch_size": 8,
                                    "output_dir": str(run_dir), **settings}.items()]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "core", "train", *args], cwd=REPO,
                          capture_output=True, text=True)
    return proc.returncode, time.monotonic() - started


def ask(final: Path) -> list[str]:
    questions = "Who are you?\n/reset\n你是谁？\n"
    proc = subprocess.run([sys.executable, "-m", "core", "chat", "--model", "demo", "--adapter",
                           str(final)], cwd=REPO, input=questions, capture_output=True,
                          text=True)
    return [line for line in proc.stdout.splitlines() if line.strip()]


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))]


def measure(stage: str, method: str, settings: dict, scratch: Path) -> dict:
    run_dir = scratch / f"{stage}-{method}-{len(list(scratch.iterdir()))}"
    code, wall = train(run_dir, stage, method, settings)
    result = dict(stage=stage, method=method, settings=settings, exit_code=code,
                  wall_s=round(wall, 1))
    if code != 0:
        return result
    loss = losses(run_dir)
    result.update(first_loss=round(loss[0], 4), final_loss=round(loss[-1], 4), steps=len(loss))
    if stage == "sft":
        replies = ask(run_dir / "final")
        result.update(replies=replies, learned=len(replies) >= 2 and all(
            NAME in r and AUTHOR in r for r in replies))
    else:
        result.update(learned=loss[-1] < 0.6 * loss[0])  # the text is learned, not just seen
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="stage/method pairs, e.g. sft/full,pt/lora")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "recommend.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for stage, method, settings in CANDIDATES:
            if args.only and f"{stage}/{method}" not in args.only.split(","):
                continue
            results.append(measure(stage, method, settings, Path(scratch)))
            print(json.dumps(results[-1], ensure_ascii=False), flush=True)
    Path(args.out).write_text(json.dumps({"measured_on": time.strftime("%Y-%m-%d"),
                                          "machine": f"{os.cpu_count()} CPU cores",
                                          "results": results}, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
