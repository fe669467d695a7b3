"""The GRPO baseline: a plain TRL GRPOTrainer script, written the way a user would write it.

A conversational prompt dataset with an `answer` column, an exact-match reward
function written here (the same normalisation as tunebench's exact_match, copied:
a baseline must not import tunebench), `GRPOConfig` with its defaults, and only
the settings the benchmark shares with tunebench (epochs, batch size, learning
rate, seed, beta, replies per prompt, reply length, LoRA rank/alpha/targets).

    python bench/baseline_trl_grpo.py MODEL PROMPTS.jsonl OUT_DIR --num-generations 4 ...

The last line printed is one JSON object with what the trainer measured.
"""

import argparse
import json
import time
import unicodedata

import torch

from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer


def normalize(text: str) -> str:
    """Case, width, inner whitespace and trailing punctuation do not count."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(text.split()).strip(".!?。！？ \t\n")


def exact_match(completions, answer, **kwargs) -> list[float]:
    """1.0 when the reply equals the row's answer, else 0.0 (conversational replies are
    lists of messages)."""
    texts = ["".join(m["content"] for m in c) if isinstance(c, list) else c for c in completions]
    return [float(bool(a) and normalize(t) == normalize(str(a))) for t, a in zip(texts, answer)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    # Only for finding out which default costs what; the benchmark passes none.
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one GRPOConfig field (JSON value), e.g. bf16=false")
    args = parser.parse_args()
    overrides = {k: json.loads(v) for k, _, v in (item.partition("=") for item in args.set)}

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    dataset = load_dataset("json", data_files=args.data, split="train")
    peft_config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    config = GRPOConfig(output_dir=args.out, num_train_epochs=args.epochs,
                        per_device_train_batch_size=args.batch_size,
                        learning_rate=args.learning_rate, beta=args.beta,
                        num_generations=args.num_generations,
                        max_completion_length=args.max_completion_length, seed=args.seed,
                        # GRPOConfig defaults to bf16, which on a CPU-only machine fails with
                        # "You need to assign use_cpu": what its error message tells users to do.
                        use_cpu=not torch.cuda.is_available(), **overrides)
    trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=config,
                          train_dataset=dataset, processing_class=tokenizer,
                          peft_config=peft_config)
    start = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - start
    trainer.save_model(args.out)
    # Measurement only (not something a user would write): TRL's own count of the tokens
    # it processed (prompts and sampled replies), the counter tunebench reports too.
    replies = len(trainer.train_dataset) * args.num_generations * args.epochs
    print(json.dumps({"train_s": round(train_s, 3),
                      "num_tokens": int(trainer.state.num_input_tokens_seen),
                      "samples": replies, "steps": result.global_step,
                      "loss": result.training_loss}))


if __name__ == "__main__":
    main()
