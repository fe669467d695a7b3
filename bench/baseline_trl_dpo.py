"""The DPO baseline: a plain TRL DPOTrainer script, written the way a user would write it.

A conversational preference dataset (prompt, chosen, rejected), `DPOConfig` with its
defaults, and only the settings the benchmark shares with tunebench (epochs, batch
size, learning rate, max length, seed, beta, loss, LoRA rank/alpha/targets). Nothing
here is tuned: that is the point.

    python bench/baseline_trl_dpo.py MODEL PAIRS.jsonl OUT_DIR --epochs 3 --beta 0.1 ...

The last line printed is one JSON object with what the trainer measured.
"""

import argparse
import json
import time

import torch

from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--loss", default="sigmoid")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    # Only for finding out which default costs what; the benchmark passes none.
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one DPOConfig field (JSON value), e.g. bf16=false")
    args = parser.parse_args()
    overrides = {k: json.loads(v) for k, _, v in (item.partition("=") for item in args.set)}

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    dataset = load_dataset("json", data_files=args.data, split="train")
    peft_config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    config = DPOConfig(output_dir=args.out, num_train_epochs=args.epochs,
                       per_device_train_batch_size=args.batch_size,
                       learning_rate=args.learning_rate, max_length=args.max_length,
                       beta=args.beta, loss_type=[args.loss], seed=args.seed,
                       # DPOConfig defaults to bf16, which on a CPU-only machine fails with
                       # "You need to assign use_cpu": what its error message tells users to do.
                       use_cpu=not torch.cuda.is_available(), **overrides)
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=peft_config)
    start = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - start
    trainer.save_model(args.out)
    # Measurement only (not something a user would write): TRL's own count of the
    # non-padding tokens it trained on (both replies with their prompt), the counter
    # tunebench reports too.
    print(json.dumps({"train_s": round(train_s, 3), "num_tokens": int(trainer._total_train_tokens),
                      "samples": len(trainer.train_dataset) * args.epochs,
                      "steps": result.global_step, "loss": result.training_loss}))


if __name__ == "__main__":
    main()
