"""The baseline: a plain TRL SFTTrainer script, written the way a user would write it.

A messages dataset, `SFTConfig` with its defaults, and only the hyperparameters
the benchmark shares with tunebench (epochs, batch size, learning rate, max
length, seed, LoRA rank/alpha/targets). Nothing here is tuned: that is the point.

    python bench/baseline_trl.py MODEL DATA.jsonl OUT_DIR --method lora --epochs 1 ...

The last line printed is one JSON object with what the trainer measured.
"""

import argparse
import json
import time

import torch

from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    # Only for bench/ablate.py, to find out which default costs what; the benchmark passes none.
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one SFTConfig field (JSON value), e.g. bf16=false")
    args = parser.parse_args()
    overrides = {k: json.loads(v) for k, _, v in (item.partition("=") for item in args.set)}

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    dataset = load_dataset("json", data_files=args.data, split="train")
    peft_config = None
    if args.method == "lora":
        peft_config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    config = SFTConfig(output_dir=args.out, num_train_epochs=args.epochs,
                       per_device_train_batch_size=args.batch_size,
                       learning_rate=args.learning_rate, max_length=args.max_length,
                       seed=args.seed,
                       # SFTConfig defaults to bf16, which on a CPU-only machine fails with
                       # "You need to assign use_cpu": what its error message tells users to do.
                       use_cpu=not torch.cuda.is_available(), **overrides)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=peft_config)
    start = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - start
    trainer.save_model(args.out)
    # Measurement only (not something a user would write): TRL's own count of the
    # non-padding tokens it trained on, the same counter tunebench reports.
    tokens = trainer._total_train_tokens
    print(json.dumps({"train_s": round(train_s, 3), "num_tokens": int(tokens),
                      "samples": len(trainer.train_dataset) * args.epochs,
                      "steps": result.global_step, "loss": result.training_loss}))


if __name__ == "__main__":
    main()
