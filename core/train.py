"""`tunebench train`: one run of any stage (sft, pt, rm, dpo, kto, grpo).

Reads top to bottom: load the config, prepare the run directory, then set up
(tokenizer, data, model), fit with the stage's TRL trainer (core/stages.py), and save. Everything the
outside world learns about the run goes through the run directory (core/runs.py).
"""

from __future__ import annotations

import errno
import math
import os
import random
import shlex
import shutil
import signal
import sys
import traceback
from dataclasses import replace
from pathlib import Path

from . import config as cfg
from . import data, distributed, jobs, memory, models, paths, runs, stages
from .errors import BadInput
from .i18n import Msg, msg

MEMORY_CAP_ENV = "TUNEBENCH_TRAIN_MEMORY_MB"  # optional hard cap; see memory.cap_from_env
TRAINING_LIBRARIES = ("core.trainer", "peft", "transformers.modeling_utils", "safetensors.torch",
                      "matplotlib.pyplot")
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# torch.save hides the errno of a failed write behind these RuntimeError texts.
TORCH_WRITE_FAILED = ("unexpected pos", "PytorchStreamWriter failed writing", "file write failed")


class Aborted(Exception):
    """Raised when SIGTERM/SIGINT arrives outside the training loop."""


class AbortSignal:
    """Turns SIGTERM/SIGINT into a graceful stop.

    Inside the training loop the trainer finishes the current step, saves a
    checkpoint and stops (see RunDirCallback); before it, we stop at once.
    """

    def __init__(self):
        self.requested = False
        self.in_loop = False
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        print(f"received {signal.Signals(signum).name}: stopping", flush=True)
        # Ranks of a multi-process run could stop at different steps and deadlock in a
        # collective, so they stop at once and keep the last saved checkpoint.
        if not self.in_loop or distributed.is_worker():
            raise Aborted()


def main(config_path: str | None, overrides: list[str]) -> int:
    # Before torch loads OpenMP: idle worker threads sleep instead of spinning. Spinning
    # threads on a 2-core CPU that is doing anything else run ~3x slower than one thread;
    # sleeping ones match one thread then, and are ~1.7x faster when both cores are free
    # (measured with the demo model; see bench/RESULTS.md and models.pick_cpu_threads).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    resolved = cfg.load_resolved(config_path, overrides)  # bad input fails here, early
    config = resolved.config
    if paths.confined():  # started by the page: every path it names passes the gate again
        paths.confine_config(config)
    if distributed.is_worker():  # the parent prepared the run dir and owns status and log
        return run(config, Path(config.output_dir))
    if config.node_rank > 0:  # another machine of a multi-node run: node 0 owns the run dir
        return distributed.run_other_node(config)
    config, run_dir = prepare_run_dir(config, config_path)
    # Registered while it runs, wherever its folder is, so no second trainer starts beside it.
    with runs.TeeLog(run_dir / runs.LOG), jobs.own_pid_entry(run_dir):
        print(settings_origin(resolved), flush=True)
        if distributed.needs_launcher(config):
            return distributed.launch_and_wait(config, run_dir)
        return run(config, run_dir)


def settings_origin(resolved: cfg.Resolved) -> str:
    """One log line saying which values the model recommended (the rest are the schema's
    defaults, the YAML's or the command line's; config.yaml records them all)."""
    config, chosen = resolved.config, resolved.from_layer("model")
    if not chosen:
        return f"settings: no recommendations from {config.model}; schema defaults apply " \
               "where the config sets nothing"
    values = ", ".join(f"{k}={cfg.format_value(v)}" for k, v in chosen.items())
    return f"settings recommended by {config.model} for {config.stage}/{config.method}: {values}"


def prepare_run_dir(config: cfg.TrainConfig,
                    config_file: str | None = None) -> tuple[cfg.TrainConfig, Path]:
    """Create the run folder (picked by runs.pick_run_dir) and write config.yaml and
    command.txt. `config_file` is the config being trained, which may be the folder's own."""
    run_dir = runs.pick_run_dir(config, "saves", config_file).resolve()
    name = config.run_name or run_dir.name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(run_dir / ".staging", ignore_errors=True)  # a save cut short earlier
        config = replace(config, output_dir=str(run_dir), run_name=name)
        runs.write_atomic(run_dir / runs.CONFIG, cfg.to_yaml(config))
        command = runs.started_as() + sys.argv[1:]
        runs.write_atomic(run_dir / runs.COMMAND, shlex.join(command) + "\n")
    except OSError as err:
        raise BadInput(msg("job.run.cannot_write", reason=err.strerror), file=str(run_dir),
                       field="output_dir") from None
    return config, run_dir


def quiet_library_noise() -> None:
    """Silence messages that fill the page's log tail without telling the user anything:
    bitsandbytes' optional CPU-kernel notice and deprecation warnings from inside libraries."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars are \r-noise in train.log
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")


def run(config: cfg.TrainConfig, run_dir: Path) -> int:
    """Set up, fit, save; record the outcome in status.json whatever happens."""
    quiet_library_noise()
    import torch

    if not distributed.is_worker():
        runs.write_status(run_dir, "running", pid=os.getpid(), phase="starting")
    abort = AbortSignal()
    try:
        trainer, resume_from = setup(config, run_dir, abort)
        _phase(run_dir, "training")
        abort.in_loop = True
        trainer.train(resume_from_checkpoint=resume_from)
        abort.in_loop = False
        if abort.requested:
            raise Aborted()
        _phase(run_dir, "saving")
        save_final(trainer, run_dir)
        from .trainer import early_stop_reason
        return _finish(run_dir, "completed", 0, stopped_early=early_stop_reason(trainer))
    except Aborted:
        return _finish(run_dir, "aborted", 1, msg("job.stopped_by_user"))
    except BadInput as err:
        print(f"error: {err}", flush=True)
        return _finish(run_dir, "failed", 2, err)
    except (torch.OutOfMemoryError, MemoryError) as err:
        return _out_of_memory(run_dir, err)
    except OSError as err:
        if err.errno not in DISK_FULL:
            traceback.print_exc()
            return _finish(run_dir, "failed", 1, f"{type(err).__name__}: {err}")
        where = err.filename or msg("job.disk.the_run_folder")
        return _finish(run_dir, "failed", 1, msg("job.disk.full_writing", file=where))
    except RuntimeError as err:
        if memory.is_out_of_memory(err):
            return _out_of_memory(run_dir, err)
        if any(sign in str(err) for sign in TORCH_WRITE_FAILED):
            return _finish(run_dir, "failed", 1, msg("job.disk.full_saving"))
        traceback.print_exc()
        return _finish(run_dir, "failed", 1, f"{type(err).__name__}: {err}")
    except BaseException as err:  # a bug, or a Rust library's panic (no Exception either):
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        traceback.print_exc()  # keep the traceback in train.log, show the gist
        return _finish(run_dir, "failed", 1, f"{type(err).__name__}: {err}")


def _out_of_memory(run_dir: Path, err: BaseException) -> int:
    """Record an out-of-memory failure, after freeing what the failed step still holds.

    The traceback keeps every frame of the failed step alive, activations included;
    clearing their locals gives back enough memory to write the ending and the chart.
    """
    import gc

    import torch

    traceback.clear_frames(err.__traceback__)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"error: {type(err).__name__}: {str(err)[:300]}", flush=True)
    return _finish(run_dir, "failed", 1, msg("job.oom"))


def _phase(run_dir: Path, phase: str) -> None:
    if distributed.is_main_process():
        runs.update_status(run_dir, phase=phase)


def _finish(run_dir: Path, state: str, code: int, cause: "BadInput | Msg | str | None" = None,
            stopped_early: Msg | None = None) -> int:
    """Record the ending: `cause` (a BadInput, a message of fixed wording or a bug's text)
    in English as `error` and, when it has one, as the language-neutral `error_msg`."""
    from .plot import plot_loss

    fields = runs.error_fields(cause)
    error = fields["error"]
    if code:  # torchrun's agent passes it on, so the launchers can name rank, node and cause
        distributed.record_worker_error(error or state)
    if not distributed.is_main_process():
        return code
    try:
        plot_loss(run_dir)
    except Exception as err:  # a missing chart must not hide the run's real outcome
        print(f"warning: could not draw loss.png: {err}", flush=True)
    try:
        early = {"stopped_early": stopped_early.text("en"),
                 "stopped_early_msg": stopped_early.record()} if stopped_early else {}
        runs.write_status(run_dir, state, exit_code=code, **fields, **early)
    except OSError as err:  # e.g. the disk is full: say so on the console at least
        print(f"warning: could not write status.json: {err}", flush=True)
    said = error or (stopped_early and stopped_early.text("en"))
    print(f"run {state}" + (f": {said}" if said else "") + f" ({run_dir})", flush=True)
    return code


# --- set up ---------------------------------------------------------------------

def setup(config: cfg.TrainConfig, run_dir: Path, abort: AbortSignal):
    from .trainer import RunDirCallback, build_trainer

    resume_from = resume_checkpoint(config, run_dir)
    _phase(run_dir, "loading data")
    tokenizer = models.load_tokenizer(config.model, config.template, config.trust_remote_code)
    train_rows, eval_rows = build_dataset(config, tokenizer)
    steps = estimate_total_steps(len(train_rows), config)
    if config.save_steps == 0:  # "automatic": about five checkpoints, not one per epoch
        config = replace(config, save_steps=max(1, math.ceil(steps / 5)))
    elif config.save_steps > steps and not config.packing:  # packing's step count is a guess
        print(f"save_steps {config.save_steps} is beyond the run's {steps} steps: no "
              "checkpoint-N/ will be written, only final/", flush=True)
    _phase(run_dir, "loading model")
    memory.cap_from_env(MEMORY_CAP_ENV, TRAINING_LIBRARIES)  # from here on: model and training
    attention = models.pick_attention(config.booster)
    from transformers import set_seed

    set_seed(config.seed)  # adapters are initialised before the trainer would seed anything
    model = models.apply_method(models.load_base_model(config, attention, tokenizer), config)
    trainable, total = models.count_parameters(model)
    models.pick_cpu_threads(total, generates=config.stage == "grpo")
    print(f"model {config.model}: {total:,} parameters, {trainable:,} trainable "
          f"({100 * trainable / max(total, 1):.2f}%), method {config.method}, attention "
          f"{attention}, precision {models.compute_dtype(config.compute_type)}", flush=True)
    callback = RunDirCallback(run_dir, abort)
    trainer = build_trainer(config, model, tokenizer, train_rows, eval_rows, run_dir, callback)
    return trainer, resume_from


def resume_checkpoint(config: cfg.TrainConfig, run_dir: Path) -> str | None:
    if config.resume is False:
        return None
    if config.resume is True:
        last = runs.last_checkpoint(run_dir)
        if last is None:
            raise BadInput(msg("job.resume.nothing"), file=str(run_dir), field="resume")
        print(f"resuming from {last}", flush=True)
        return str(last)
    return str(Path(config.resume).resolve())


def build_dataset(config: cfg.TrainConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    """dataset -> template -> tokens and labels (the stage's encoding), then the eval split."""
    encode = stages.STAGES[config.stage].encode
    records = data.load_records(config)
    rows = [row for row in (encode(r, tokenizer, config.cutoff_len) for r in records)
            if row is not None]
    dropped = len(records) - len(rows)
    if dropped:
        print(f"warning: {dropped} records had nothing to train on after truncation to "
              f"cutoff_len {config.cutoff_len}", flush=True)
    if not rows:
        raise BadInput(msg("job.data.no_trainable", cutoff_len=config.cutoff_len),
                       field="dataset")
    lengths = [_row_length(r) for r in rows]
    print(f"data: {len(rows)} records for stage {config.stage} "
          f"({stages.STAGES[config.stage].what}), {sum(lengths):,} tokens, length "
          f"{min(lengths)}..{max(lengths)} (mean {sum(lengths) / len(rows):.0f})", flush=True)
    return split_eval(rows, config.val_size, config.seed)


def _row_length(row: dict) -> int:
    """Tokens in a row of any stage (a pair counts both sequences; a GRPO prompt, its
    messages' characters / 4, a rough figure for the log only)."""
    if "input_ids" in row:
        return len(row["input_ids"])
    if "prompt" in row:
        return sum(len(m["content"]) for m in row["prompt"]) // 4
    return sum(len(v) for k, v in row.items() if k.endswith("_ids") and k != "KL_completion_ids")


def split_eval(rows: list[dict], val_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    if val_size <= 0:
        return rows, []
    n_eval = max(1, round(len(rows) * val_size))
    if n_eval >= len(rows):
        raise BadInput(msg("job.data.val_size_all", val_size=val_size), field="val_size")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return ([r for i, r in enumerate(rows) if i not in held],
            [r for i, r in enumerate(rows) if i in held])


def estimate_total_steps(n_rows: int, config: cfg.TrainConfig) -> int:
    sequences = n_rows * stages.rows_per_record(config)
    per_epoch = math.ceil(math.ceil(sequences / config.batch_size) / config.grad_accum)
    return max(1, math.ceil(per_epoch * config.epochs))


# --- save -----------------------------------------------------------------------

def write_card(folder: Path, run_dir: str) -> None:
    """final/README.md: what the run trained and how to load it without tunebench (in place
    of PEFT's empty template). A reward model needs the sequence-classification class."""
    config = cfg.load(Path(run_dir) / runs.CONFIG)
    adapter = (folder / "adapter_config.json").is_file()
    kind = "SequenceClassification" if config.stage == "rm" else "CausalLM"
    loader = f"AutoPeftModelFor{kind}" if adapter else f"AutoModelFor{kind}"
    extra = ", num_labels=1" if config.stage == "rm" and adapter else ""
    module = "peft" if adapter else "transformers"
    what = stages.STAGES[config.stage].what
    use = ("Its output is one score per sequence (prompt and reply rendered with the chat "
           "template): higher means a better reply." if config.stage == "rm" else
           "Chat with it through its tokenizer's chat template.")
    card = (f"# {config.run_name or Path(run_dir).name}\n\nTrained with tunebench, stage "
            f"`{config.stage}` ({what}), method `{config.method}`, from `{config.model}` on "
            f"{', '.join(config.dataset)}. The run's config.yaml records every setting.\n\n"
            f"```python\nfrom {module} import {loader}\n"
            f"model = {loader}.from_pretrained(\"final\"{extra})\n"
            f"```\n\n{use}\n")
    (folder / "README.md").write_text(card, encoding="utf-8")


def save_final(trainer, run_dir: Path) -> Path:
    """Write final/ atomically: a temp folder renamed into place once complete."""
    final, tmp = run_dir / "final", run_dir / ".final.tmp"
    if distributed.is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))  # every rank takes part (FSDP/DeepSpeed gather the weights)
    trainer.accelerator.wait_for_everyone()
    if not distributed.is_main_process():
        return final
    trainer.processing_class.save_pretrained(str(tmp))
    (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; final/ holds safetensors only
    write_card(tmp, trainer.args.output_dir)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    print(f"saved {final}", flush=True)
    return final
