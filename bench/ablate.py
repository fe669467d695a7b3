"""Which setting makes the difference? One factor at a time, on a slice of the mixed set.

    python bench/ablate.py [--rows 300]

Runs tunebench and the TRL baseline script with single settings changed from
their defaults and prints tokens/s, CPU time and peak memory for each. One run
each (it is for finding causes, not for the headline figures in RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import REPO, run_one  # noqa: E402
from workloads import workloads  # noqa: E402

# (label, settings for that tool, environment variables)
TUNEBENCH = [
    ("tunebench defaults (padding-free SDPA per example, 2 sleeping threads)", [], {}),
    ("  OMP_NUM_THREADS=1", [], {"OMP_NUM_THREADS": "1"}),
    ("  2 spinning threads (OMP_WAIT_POLICY=ACTIVE, OMP_NUM_THREADS=2)", [],
     {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "2"}),
    ("  booster=eager (padded, length-grouped)", ["booster=eager"], {}),
    ("  gradient_checkpointing=true", ["gradient_checkpointing=true"], {}),
    ("  compute_type=bf16 (autocast on CPU)", ["compute_type=bf16"], {}),
    ("  packing=true (rows of cutoff_len)", ["packing=true"], {}),
]
BASELINE = [
    ("TRL script defaults (bf16, checkpointing, padded, random order)", [], {}),
    ("  bf16=false", ["bf16=false"], {}),
    ("  gradient_checkpointing=false", ["gradient_checkpointing=false"], {}),
    ("  bf16=false, gradient_checkpointing=false", ["bf16=false", "gradient_checkpointing=false"],
     {}),
    ("  ... and train_sampling_strategy=group_by_length",
     ["bf16=false", "gradient_checkpointing=false", 'train_sampling_strategy="group_by_length"'],
     {}),
    ("  defaults with OMP_WAIT_POLICY=PASSIVE", [], {"OMP_WAIT_POLICY": "PASSIVE"}),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from core.models import resolve_model

    model = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="tunebench-ablate-"))
    full = workloads(work / "data")["mixed"]
    subset = work / "data" / f"mixed-{args.rows}.jsonl"
    subset.write_text("".join(Path(full.dataset).read_text().splitlines(True)[: args.rows]))
    w = replace(full, dataset=str(subset))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = []
    for tool, variants in (("tunebench", TUNEBENCH), ("baseline", BASELINE)):
        for label, extra, more_env in variants:
            print(label, flush=True)
            results.append({"tool": tool, "label": label.strip(), "settings": extra,
                            "env": more_env, **run_one(tool, w, model, extra,
                                                       {**env, **more_env})})
    print(f"\n{'variant':72s}{'tok/s':>8s}{'train s':>8s}{'cpu s':>8s}{'peak GB':>9s}")
    for r in results:
        print(f"{r['label'][:71]:72s}{r['tokens_per_s']:8.0f}{r['train_s']:8.1f}"
              f"{r['cpu_s']:8.1f}{r['peak_rss_gb']:9.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
