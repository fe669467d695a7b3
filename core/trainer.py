"""TRL's trainers, one per stage (core/stages.py), configured from a TrainConfig, plus
what they lack for tunebench. Every stage's trainer is TRL's own class with
`RunFolderMixin` in front of it.

Added by hand, and why:
- `RunDirCallback` streams metrics.jsonl (throughput, ETA, padding share) and
  turns an abort request into "finish this step, checkpoint, stop".
- `RunDirCallback` also maps each stage's own signals (DPO's reward margin, GRPO's
  mean reward, ...) to stable names in metrics.jsonl (core/stages.signal_name).
- `RunFolderMixin._prepare_dataset`/`tokenize_row` hand TRL rows already tokenized
  through core/templates.py, so every stage applies the template once, the same way.
- `RunFolderMixin._save_checkpoint` writes each checkpoint into a staging
  folder and renames it into place, so a crash mid-save never leaves a
  checkpoint-N/ that looks complete but is not (transformers writes in place).
- `RunFolderMixin` counts real vs padded token positions per step, which the
  trainer does not report.
- `RunFolderMixin.create_optimizer` builds PEFT's LoRA+ optimizer (B matrices at
  a multiple of the learning rate) from the optimizer the `optim` setting names.
- `RunFolderMixin._save` converts a PiSSA adapter to plain LoRA on every save, so
  final/ and checkpoint-N/ load on the original base like any LoRA adapter, and
  `_load_from_checkpoint` resumes from that converted form.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import functools

import torch
from transformers import TrainerCallback

from . import attention, distributed, models, runs, stages, trackers
from .config import LORA_FAMILY, TrainConfig
from .i18n import Msg, msg

STAGING = ".staging"


def training_args(config: TrainConfig, run_dir: Path, has_eval: bool,
                  padding_free: bool = False):
    """The stage's TRL config. `padding_free`: the model's attention keeps examples apart
    inside one row (core/attention.py), so SFT batches put examples end to end instead of
    padding them."""
    precision = models.compute_dtype(config.compute_type)
    save_by_steps = config.save_steps > 0
    _, args_class = stages.trainer_classes(config)
    return args_class(
        output_dir=str(run_dir),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=min(config.warmup_ratio, 0.999),  # a float below 1 is a ratio of total steps
        max_grad_norm=config.max_grad_norm,
        weight_decay=config.weight_decay,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=config.gradient_checkpointing,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if save_by_steps else "epoch",
        save_steps=config.save_steps if save_by_steps else 500,
        eval_strategy=("steps" if save_by_steps else "epoch") if has_eval else "no",
        eval_steps=config.save_steps if save_by_steps else None,
        optim=config.optim,
        report_to=trackers.prepare(config.report_to, run_dir),  # they log on rank 0 only
        run_name=config.run_name or run_dir.name,
        **_early_stopping_args(config, has_eval),
        disable_tqdm=True,  # progress goes to metrics.jsonl and one line per log step instead
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # transformers refuses bf16 on a machine without a GPU unless told it is a CPU run.
        **{**({"use_cpu": True} if precision == "bf16" and not torch.cuda.is_available() else {}),
           **distributed.trainer_kwargs(config, run_dir),
           **(_sft_args(config, padding_free) if config.stage in ("sft", "pt")
              else stages.stage_args(config))},
    )


def _early_stopping_args(config: TrainConfig, has_eval: bool) -> dict:
    """transformers' EarlyStoppingCallback compares each eval loss with the best so far,
    which the trainer tracks only with a metric_for_best_model; the best checkpoint is
    then reloaded at the end, so final/ is the model that stopped improving last."""
    if not (config.early_stopping_patience and has_eval):
        return {}
    return dict(load_best_model_at_end=True, metric_for_best_model="eval_loss",
                greater_is_better=False)


def early_stopping(config: TrainConfig) -> list[TrainerCallback]:
    if not config.early_stopping_patience:
        return []
    from transformers import EarlyStoppingCallback
    return [EarlyStoppingCallback(config.early_stopping_patience,
                                  config.early_stopping_threshold)]


def early_stop_reason(trainer) -> Msg | None:
    """Why the run ended before its last step, when early stopping ended it; else None."""
    from transformers import EarlyStoppingCallback
    state = trainer.state
    stopper = next((c for c in trainer.callback_handler.callbacks
                    if isinstance(c, EarlyStoppingCallback)), None)
    if stopper is None or state.global_step >= state.max_steps or \
            stopper.early_stopping_patience_counter < stopper.early_stopping_patience:
        return None
    best = (msg("job.early.best", step=state.best_global_step,
                loss=f"{state.best_metric:.4f}") if state.best_global_step else "")
    by = (msg("job.early.by", threshold=f"{stopper.early_stopping_threshold:g}")
          if stopper.early_stopping_threshold else "")
    return msg("job.early.stopped", step=state.global_step, steps=state.max_steps, by=by,
               patience=stopper.early_stopping_patience, best=best)


def _sft_args(config: TrainConfig, padding_free: bool) -> dict:
    padded = not (config.packing or padding_free)
    return dict(
        # Rows are already cut to cutoff_len (templates.truncate keeps part of every reply);
        # TRL refuses max_length with padding-free batches that are not packed.
        max_length=config.cutoff_len if config.packing or padded else None,
        packing=config.packing,  # TRL's best-fit-decreasing packing, always padding-free
        padding_free=padding_free and not config.packing,
        # Padded batches: group examples of similar length so little compute goes to padding.
        # Padding-free batches have none, so keep the data order random.
        train_sampling_strategy="group_by_length" if padded else "random")


def build_trainer(config: TrainConfig, model, tokenizer, train_rows: list[dict],
                  eval_rows: list[dict], run_dir: Path, callback: TrainerCallback):
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()  # TRL's per-map bars would flood train.log; we print our own lines

    from transformers.trainer_callback import PrinterCallback

    # Only SFT's collator puts examples end to end; the preference and RL trainers pad.
    padding_free = attention.padding_free(model) and config.stage in ("sft", "pt")
    args = training_args(config, run_dir, has_eval=bool(eval_rows), padding_free=padding_free)
    booster = attention.describe(model) if padding_free or config.stage in ("sft", "pt") \
        else "sdpa (padded batches; TRL 1.16 has no padding-free batches for this stage)"
    print(f"booster: {booster}" + ("; packing examples into rows of "
                                  f"{config.cutoff_len} tokens" if config.packing else ""),
          flush=True)
    if distributed.is_main_process():
        runs.update_status(run_dir, booster=booster)
    loraplus = config.loraplus_lr_ratio if config.method in LORA_FAMILY else 0.0
    if loraplus:
        print(f"LoRA+: B matrices learn at learning_rate x {loraplus:g} ({config.optim})",
              flush=True)
    trainer_class = wrapped(stages.trainer_classes(config)[0])
    extra = {}
    if config.stage == "grpo":
        from . import rewards
        extra["reward_funcs"] = rewards.reward_functions(config)
    trainer = trainer_class(
        model=model, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        callbacks=[callback, *early_stopping(config)], loraplus_lr_ratio=loraplus, **extra)
    trainer.remove_callback(PrinterCallback)  # RunDirCallback prints one readable line instead
    drop_reference_adapter(trainer.model)
    return trainer


def drop_reference_adapter(model) -> None:
    """TRL's DPO and KTO copy an adapter they are handed into a second, frozen "ref"
    adapter, in case it was trained before. Ours is freshly initialised (or resumed from
    a run that started at the base), so the base with the adapter switched off is the
    exact reference: drop the copy, which TRL then uses (and final/ holds no ref/)."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config and "ref" in peft_config:
        model.delete_adapter("ref")
        model.set_adapter("default")


@functools.cache
def wrapped(trl_class: type) -> type:
    """TRL's trainer class with tunebench's additions in front of it."""
    return type(f"Tunebench{trl_class.__name__}", (RunFolderMixin, trl_class), {})


class RunFolderMixin:
    def __init__(self, *args, loraplus_lr_ratio: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self._positions = self._real_tokens = 0
        self._eval_sum, self._eval_tokens = 0.0, 0
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self._initial_adapter = None
        if models.changes_base_weights(self.model):
            # PiSSA: keep the adapter as initialised, before any step and before a resume
            # loads a checkpoint; every save subtracts it to get a plain LoRA adapter.
            self._initial_adapter = tempfile.TemporaryDirectory(prefix="tunebench-pissa-")
            models.save_initial_adapter(self.model, self._initial_path)

    # Eval loss, token-weighted: the summed loss over every trained token of the eval set,
    # divided by their count. transformers averages per-batch means instead, a figure that
    # moves with the batch size and the order; this one is what `tunebench eval`'s loss
    # task reports on the same rows, however it batches them.
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        out = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        labels = inputs.get("labels") if isinstance(inputs, dict) else None
        if out[0] is not None and labels is not None and self.args.world_size == 1:
            n = int((labels[..., 1:] != -100).sum())
            self._eval_sum += float(out[0]) * n
            self._eval_tokens += n
        return out

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None,
                        ignore_keys=None, metric_key_prefix="eval"):
        self._eval_sum, self._eval_tokens = 0.0, 0
        output = super().evaluation_loop(dataloader, description, prediction_loss_only,
                                         ignore_keys, metric_key_prefix)
        if self._eval_tokens:
            output.metrics[f"{metric_key_prefix}_loss"] = self._eval_sum / self._eval_tokens
        return output

    @property
    def _initial_path(self) -> Path:
        return Path(self._initial_adapter.name) / "initial"

    def create_optimizer(self, model=None):
        """LoRA+ (when a ratio is set): PEFT's optimizer with the B matrices at
        learning_rate x ratio, built from the class and settings `optim` selects. Each
        group keeps its own rate under the scheduler, which scales them all alike."""
        if not self.loraplus_lr_ratio or self.optimizer is not None:
            return super().create_optimizer(model)
        from peft.optimizers import create_loraplus_optimizer

        opt_model = self.model if model is None else model
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        kwargs = dict(kwargs)
        lr = kwargs.pop("lr", self.args.learning_rate)
        self.optimizer = create_loraplus_optimizer(
            opt_model, optimizer_cls, lr=lr, loraplus_lr_ratio=self.loraplus_lr_ratio,
            loraplus_weight_decay=self.args.weight_decay, **kwargs)
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self._initial_adapter is not None and self.args.should_save:
            # Rewrite the adapter just saved (trained against PiSSA's residual base) as
            # plain LoRA for the original base: chat and export load it like any other.
            models.save_converted_adapter(self.accelerator.unwrap_model(self.model),
                                          Path(output_dir or self.args.output_dir),
                                          self._initial_path)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self._initial_adapter is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # The checkpoint holds the converted adapter (twice the rank), which the trainer's
        # own loader cannot put back into this adapter: restore its trained half instead.
        models.load_converted_adapter(self.accelerator.unwrap_model(model or self.model),
                                      Path(resume_from_checkpoint))

    def _prepare_dataset(self, dataset, *args, **kwargs):
        """Rows come tokenized by core/stages.py. DPO needs nothing more; KTO still pairs
        each reply with a mismatched one for its KL estimate, as TRL does."""
        if "prompt_ids" not in (dataset.column_names or []):
            return super()._prepare_dataset(dataset, *args, **kwargs)
        if getattr(self, "calculate_KL", False):
            batch_size = (args[1] if len(args) > 1 else kwargs["args"]).per_device_train_batch_size

            def shifted(batch):  # each reply is paired with the previous row's, cyclically
                return {"KL_completion_ids": batch["completion_ids"][-1:]
                        + batch["completion_ids"][:-1]}
            dataset = dataset.map(shifted, batched=True, batch_size=batch_size)
        return dataset

    def _get_train_sampler(self, train_dataset=None):
        """Length-grouped batches for the pair stages (rm, dpo): transformers measures rows by
        input_ids, which they do not have, so give it each row's padded length."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        names = getattr(dataset, "column_names", None) or []
        if self.args.train_sampling_strategy != "group_by_length" or not (
                {"chosen_ids", "completion_ids"} & set(names)):
            return super()._get_train_sampler(train_dataset)
        from transformers.trainer_pt_utils import LengthGroupedSampler
        wanted = [n for n in ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids")
                  if n in names]
        lengths = stages.padded_lengths({n: dataset[n] for n in wanted})
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return LengthGroupedSampler(batch, dataset=dataset, lengths=lengths)

    def tokenize_row(self, feature, model=None):
        """ORPO and CPO (SimPO) tokenize in this method: build their columns from ours."""
        prompt = feature["prompt_ids"]
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            reply = feature[f"{side}_ids"]
            row[f"{side}_input_ids"] = prompt + reply
            row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(reply))
            row[f"{side}_labels"] = [-100] * len(prompt) + reply
        return row

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and "input_ids" in inputs:
            self._positions += inputs["input_ids"].numel()
            mask = inputs.get("attention_mask")
            self._real_tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._positions:
            logs["nonpad_share"] = self._real_tokens / self._positions
            self._positions = self._real_tokens = 0
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        run_dir = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        self._get_output_dir = lambda trial=None: str(run_dir / STAGING)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()  # every rank has written its part (rng state)
        if not self.args.should_save:
            return
        target = run_dir / name
        if target.exists():
            shutil.rmtree(target)
        os.replace(run_dir / STAGING / name, target)
        (run_dir / STAGING).rmdir()
        if self.state.best_model_checkpoint == str(run_dir / STAGING / name):
            self.state.best_model_checkpoint = str(target)  # the trainer noted the staging path

    def create_model_card(self, *args, **kwargs):
        """No TRL model card in the run folder: config.yaml records the run, and
        `tunebench export` writes a card for the exported model."""


class RunDirCallback(TrainerCallback):
    """Appends one metrics.jsonl line per log, and prints a progress line."""

    def __init__(self, run_dir: Path, abort):
        self.run_dir = Path(run_dir)
        self.abort = abort
        self.start = time.time()
        self.elapsed_before = _previous_elapsed(self.run_dir)
        self.first_step = 0
        self.last_time, self.last_tokens = self.start, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last_time = time.time()
        self.first_step = state.global_step
        if state.is_world_process_zero:
            self._write(state, {})

    def on_step_end(self, args, state, control, **kwargs):
        if self.abort.requested:
            control.should_save = True  # keep this step's work: resume continues from here
            control.should_training_stop = True
        elif state.global_step >= state.max_steps and args.save_steps > state.max_steps:
            # transformers saves a checkpoint at the last step; a save_steps beyond the run
            # asks for the final model only, which final/ already is.
            control.should_save = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {}
        if "loss" in logs:
            record.update(loss=logs["loss"], learning_rate=logs.get("learning_rate"),
                          tokens_per_s=self._throughput(logs.get("num_tokens")))
            if logs.get("num_tokens") is not None:  # cumulative non-padding tokens trained on
                record["num_tokens"] = int(logs["num_tokens"])
            if "nonpad_share" in logs:
                record["nonpad_share"] = round(logs["nonpad_share"], 4)
            if "grad_norm" in logs:
                record["grad_norm"] = logs["grad_norm"]
        if "eval_loss" in logs:
            record["eval_loss"] = logs["eval_loss"]
        for key, value in logs.items():  # the stage's own signals, under stable names
            name = stages.signal_name(key)
            if name is not None and isinstance(value, (int, float)):
                record[name] = round(float(value), 6)
        if "train_runtime" in logs:  # the trainer's end-of-training summary (the benchmark reads it)
            record.update(train_runtime=logs["train_runtime"],
                          train_samples_per_second=logs.get("train_samples_per_second"),
                          num_tokens=self.last_tokens)
        if record:
            self._write(state, record)

    def _throughput(self, tokens_seen) -> float | None:
        now = time.time()
        if tokens_seen is None or now <= self.last_time:
            return None
        rate = (tokens_seen - self.last_tokens) / (now - self.last_time)
        self.last_time, self.last_tokens = now, tokens_seen
        return round(rate, 1)

    def _write(self, state, record: dict) -> None:
        ran = time.time() - self.start
        base = {"step": state.global_step, "total_steps": state.max_steps,
                "epoch": round(state.epoch or 0.0, 4),
                "elapsed_s": round(self.elapsed_before + ran, 2)}
        done = state.global_step - self.first_step
        if done > 0:
            base["eta_s"] = round(ran / done * (state.max_steps - state.global_step), 1)
        runs.append_metrics(self.run_dir, {**base, **record})
        _print_progress({**base, **record})


def _previous_elapsed(run_dir: Path) -> float:
    """On resume, elapsed time continues from where the earlier attempt stopped."""
    records = runs.read_metrics(run_dir)
    return float(records[-1].get("elapsed_s", 0.0)) if records else 0.0


def _print_progress(r: dict) -> None:
    parts = [f"step {r['step']}/{r['total_steps']}", f"epoch {r['epoch']:.2f}"]
    if r.get("loss") is not None:
        parts.append(f"loss {r['loss']:.4f}")
    if r.get("eval_loss") is not None:
        parts.append(f"eval_loss {r['eval_loss']:.4f}")
    if r.get("tokens_per_s"):
        parts.append(f"{r['tokens_per_s']:.0f} tok/s")
    if r.get("eta_s") is not None:
        parts.append(f"eta {int(r['eta_s'] // 60)}:{int(r['eta_s'] % 60):02d}")
    print("  ".join(parts), flush=True)
