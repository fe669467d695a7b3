"""The embedded demo model: a tiny Qwen2-style chat model tunebench builds locally.

A first-time user may have no weights and no internet, so `ensure_demo_model`
trains a byte-level BPE tokenizer and a ~3M-parameter model on the generated
corpus in `demo_corpus` (about a minute on a 2-core CPU) and caches the result.
The folder is an ordinary transformers model: `AutoModelForCausalLM` and
`AutoTokenizer` load it without tunebench.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from . import demo_corpus, locks
from .errors import BadInput
from .templates import CHATML

VERSION = 1  # the cache folder name carries it; recipe_id() catches smaller changes
SEED = 1234
META_FILE = "tunebench_demo.json"
VOCAB_SIZE = 2048
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
N_ROWS = 12800  # pre-training conversations, each seen once (800 steps)
SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048)
PRETRAIN = dict(epochs=1, batch_size=16, learning_rate=2e-3, warmup_ratio=0.05, adam_beta2=0.95,
                max_len=128)

# The training settings the demo model recommends, per stage and method ("*": every
# method of the stage), written beside its config.json as recommended_training.json and
# read by core/config.py `resolve` (schema default < these < YAML < KEY=VALUE). Measured
# with bench/recommend.py on a 2-core CPU (bench/results/recommend.json): each taught the
# model a made-up identity from data/identity.json, asked in English and in Chinese. The
# 2e-4 / 3 epochs that suit billion-parameter models leave this 3.5M model unchanged.
RECOMMENDED = {
    "sft": {
        "*": dict(learning_rate=2e-3, epochs=20, batch_size=8),
        "lora": dict(lora_rank=32, lora_alpha=64),
        "qlora": dict(lora_rank=32, lora_alpha=64),
        "dora": dict(lora_rank=32, lora_alpha=64),
        "full": dict(learning_rate=5e-4, epochs=10),  # every weight moves: a gentler, shorter run
        "freeze": dict(freeze_layers=2),  # lr 1e-3 for 15 epochs misspelt the author
        # oft: the "*" values (lr 5e-3 also learned; 2e-3 matches the other adapters)
    },
    # Plain text (data/text_demo.jsonl): full tuning took the loss from 8.7 to 2.9; LoRA
    # plateaus higher (8.7 to 5.7 at its best), as adapters do on new text.
    "pt": {
        "*": dict(learning_rate=1e-3, epochs=30, batch_size=8),
        "lora": dict(lora_rank=32, lora_alpha=64, learning_rate=3e-3),
    },
    # Preference and RL stages on the bundled identity sets (identity_pref, identity_kto,
    # identity_rl), measured on held-out prompts (tests/test_stages.py, bench/RESULTS.md).
    "rm": {"*": dict(learning_rate=1e-3, epochs=4, batch_size=8),
           "lora": dict(lora_rank=32, lora_alpha=64)},
    # DPO alone pushes both replies down until this small model babbles; the SFT term
    # (pref_ftx) keeps the chosen ones fluent: held-out margin -79 -> +5, "I am Tuney, ...".
    "dpo": {"*": dict(learning_rate=2e-3, epochs=10, batch_size=8, pref_ftx=1.0),
            "lora": dict(lora_rank=32, lora_alpha=64)},
    "kto": {"*": dict(learning_rate=2e-3, epochs=10, batch_size=8),
            "lora": dict(lora_rank=32, lora_alpha=64)},
    "grpo": {"*": dict(learning_rate=3e-3, epochs=4, batch_size=16, reward_funcs=["answer_f1"]),
             "lora": dict(lora_rank=32, lora_alpha=64)},
}

Progress = Callable[[str], None]


def default_path() -> Path:
    """`$TUNEBENCH_CACHE/demo-model-v<VERSION>`, the cache defaulting to ~/.cache/tunebench."""
    cache = os.environ.get("TUNEBENCH_CACHE") or Path.home() / ".cache" / "tunebench"
    return Path(cache).expanduser() / f"demo-model-v{VERSION}"


def recipe_id() -> str:
    """A fingerprint of everything that shapes the model: settings and the corpus source.

    A cached build whose fingerprint differs is rebuilt, so changing the recipe can
    never leave an old model in use under the same version number.
    """
    settings = json.dumps([VERSION, SEED, VOCAB_SIZE, N_ROWS, SHAPE, PRETRAIN, CHATML],
                          sort_keys=True)
    corpus_source = Path(demo_corpus.__file__).read_bytes()
    return hashlib.sha256(settings.encode() + corpus_source).hexdigest()[:16]


def is_complete(path: Path) -> bool:
    """True when `path` holds a finished demo model built by this recipe."""
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return meta.get("recipe") == recipe_id() and (path / "model.safetensors").is_file()


def ensure_demo_model(out: str | Path | None = None, force: bool = False,
                      progress: Progress = print) -> Path:
    """Return the demo model's folder, building it first if it is missing (or if `force`).

    The build happens in a temporary sibling folder renamed into place at the end,
    so an interrupted build never looks complete; a lock file makes a second
    process wait for the first and then reuse its result.
    """
    out = Path(out).expanduser().resolve() if out else default_path()
    if not force and is_complete(out):
        write_recommendations(out)  # re-measured values reach a cached build without a rebuild
        return out
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with locks.held(out.parent / f".{out.name}.lock"):
        if not force and is_complete(out):  # another process built it while we waited
            return out
        _remove_leftovers(out)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        try:
            build(tmp, progress)
            _replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    progress(f"demo model ready: {out}")
    return out


def write_recommendations(folder: Path) -> None:
    """Write RECOMMENDED beside config.json (only when it differs, so a read-only cache
    that is up to date is never written)."""
    from .config import RECOMMENDED_FILE
    from .runs import write_atomic

    path = Path(folder) / RECOMMENDED_FILE
    text = json.dumps(RECOMMENDED, indent=1) + "\n"
    try:
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return
        write_atomic(path, text)
    except OSError:
        pass  # a cache we cannot write: config.py falls back to RECOMMENDED itself


def _check_target(out: Path) -> None:
    """Refuse to replace a folder with someone else's files in it."""
    if out.exists() and not out.is_dir():
        raise BadInput("expected a folder for the demo model, found a file", file=str(out))
    if out.is_dir() and any(out.iterdir()) and not (out / META_FILE).exists():
        raise BadInput("folder is not empty and is not a tunebench demo model; choose another "
                       "--out or empty it", file=str(out))


def _remove_leftovers(out: Path) -> None:
    """Delete half-built folders of builds that were killed; only call holding the lock.

    A live builder holds the lock, so any temporary folder found now is an orphan.
    """
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for leftover in out.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished build to `out`; an old copy is moved aside first, then deleted."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def build(folder: Path, progress: Progress = print) -> dict:
    """Build the demo model into `folder` (created): tokenizer, model, pre-training, metadata."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(_build_threads(previous))
    try:
        return _build(folder, progress)
    finally:
        torch.set_num_threads(previous)


def _build_threads(default: int) -> int:
    """One thread when other processes keep the cores busy, else torch's default.

    Measured on a shared 2-core machine: with the cores already loaded, two
    threads ran this model 2-3x slower than one (the threads wait on each other).
    """
    free = (os.cpu_count() or 1) - os.getloadavg()[0]
    return max(1, min(default, round(free)))


def _build(folder: Path, progress: Progress) -> dict:
    import torch
    import transformers

    start = time.monotonic()
    folder.mkdir(parents=True)
    transformers.set_seed(SEED)
    rows = demo_corpus.build_corpus(N_ROWS, seed=SEED)
    progress(f"demo model: generated {len(rows)} pre-training conversations")
    tokenizer = train_tokenizer(rows)
    progress(f"demo model: trained a byte-level BPE tokenizer of {len(tokenizer)} tokens")
    model = new_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    progress(f"demo model: {n_params / 1e6:.2f}M parameters, pre-training")
    loss = pretrain(model, tokenizer, rows, folder / "trainer", progress)
    shutil.rmtree(folder / "trainer", ignore_errors=True)
    model.config.use_cache = True  # the Trainer turns the KV cache off; generation wants it
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    meta = dict(version=VERSION, recipe=recipe_id(), seed=SEED, params=n_params,
                vocab_size=len(tokenizer), pretrain_rows=len(rows), pretrain_loss=round(loss, 4),
                build_seconds=round(time.monotonic() - start, 1),
                threads=torch.get_num_threads(), transformers=transformers.__version__)
    write_recommendations(folder)
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    progress(f"demo model: pre-training loss {loss:.3f}, built in {meta['build_seconds']} s")
    return meta


def train_tokenizer(rows: list[list[dict]]):
    """A byte-level BPE tokenizer trained on the rendered corpus, wrapped for transformers.

    Byte-level means any text (any script, emoji) encodes without unknown tokens;
    Qwen's pre-tokenizer splits digits one by one, so arithmetic stays learnable.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # The same normalizer and pre-tokenizer as transformers' Qwen2Tokenizer, which is
    # what AutoTokenizer rebuilds for a qwen2 model folder: training and loading agree.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  special_tokens=[PAD, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [m["content"] for row in rows for m in row] + ["system", "user", "assistant"]
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD,
                                   chat_template=CHATML, model_max_length=2048,
                                   padding_side="right", clean_up_tokenization_spaces=False)


def new_model(tokenizer):
    """A randomly initialised Qwen2-style model sized for CPU, with generation defaults."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    pad_id, eos_id = tokenizer.convert_tokens_to_ids([PAD, IM_END])
    config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=True, rope_theta=10000.0,
                         bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id,
                         dtype="float32", **SHAPE)
    model = Qwen2ForCausalLM(config)
    # Chat replies end at <|im_end|>; greedy by default so answers are reproducible.
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id,
                                               do_sample=False, max_new_tokens=256)
    return model


def encode_rows(tokenizer, rows: list[list[dict]], max_len: int) -> list[dict]:
    """Token ids of each rendered conversation, every token a label.

    Pre-training on the whole text (prompts too) learned faster per step than
    training on the replies alone, measured on this corpus.
    """
    examples = []
    for row in rows:
        ids = tokenizer.apply_chat_template(row, tokenize=True, return_dict=True)["input_ids"]
        examples.append({"input_ids": ids[:max_len], "labels": ids[:max_len]})
    return examples


def pretrain(model, tokenizer, rows, scratch: Path, progress: Progress) -> float:
    """Brief pre-training with transformers' Trainer; returns the last logged loss."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    examples = encode_rows(tokenizer, rows, PRETRAIN["max_len"])
    steps = math.ceil(len(examples) / PRETRAIN["batch_size"]) * PRETRAIN["epochs"]
    losses: list[float] = []

    class Report(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                progress(f"demo model: pretrain step {state.global_step}/{state.max_steps} "
                         f"loss {logs['loss']:.3f}")

    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=_training_args(scratch, steps), train_dataset=examples,
                      data_collator=collator, callbacks=[Report()])
    trainer.remove_callback(PrinterCallback)  # Report prints a shorter line instead
    trainer.train()
    return losses[-1] if losses else float("nan")


def _training_args(scratch: Path, steps: int):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(scratch), num_train_epochs=PRETRAIN["epochs"],
        per_device_train_batch_size=PRETRAIN["batch_size"],
        learning_rate=PRETRAIN["learning_rate"], warmup_steps=PRETRAIN["warmup_ratio"],
        lr_scheduler_type="cosine", weight_decay=0.0,
        # beta2 0.95 (the usual choice for small-batch LM training) rather than 0.999
        adam_beta2=PRETRAIN["adam_beta2"],
        # rows of similar length share a batch: less padding, fewer wasted FLOPs
        train_sampling_strategy="group_by_length",
        logging_steps=max(1, min(50, steps // 10)), save_strategy="no", report_to="none",
        disable_tqdm=True, seed=SEED, data_seed=SEED, dataloader_pin_memory=False)
