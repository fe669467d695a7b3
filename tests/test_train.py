"""Real training of the demo model on CPU through `tunebench train`.

Each test runs the CLI as a subprocess, exactly as the Train tab does, and then
checks the run directory, the contract between trainer and everything else.
"""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import runs

pytestmark = pytest.mark.train
REPO = Path(__file__).resolve().parents[1]
DATA = str(REPO / "data")
QUICK = ["dataset=identity", f"dataset_dir={DATA}", "max_samples=16", "batch_size=4",
         "epochs=1", "lora_rank=8", "lora_alpha=16", "learning_rate=1e-3"]


def train_cmd(model, run_dir, *overrides):
    return [sys.executable, "-m", "core", "train", f"model={model}", f"output_dir={run_dir}",
            *QUICK, *overrides]


def run_train(model, run_dir, *overrides, check=True):
    proc = subprocess.run(train_cmd(model, run_dir, *overrides), capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def start_train(model, run_dir, *overrides):
    return subprocess.Popen(train_cmd(model, run_dir, *overrides), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def wait_for(predicate, proc, timeout=300, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"training exited ({proc.returncode}) before {what}"
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_run_directory_contract(demo_model_path, tmp_path):
    run_dir = tmp_path / "run"
    run_train(demo_model_path, run_dir, "save_steps=2", "val_size=0.25")
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "command.txt", "status.json", "metrics.jsonl", "train.log", "final",
            "loss.png", "checkpoint-2"} <= names
    assert not any(n.startswith(".") for n in names), names  # no staging or temp leftovers

    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed" and status["exit_code"] == 0 and status["error"] is None
    assert set(status) >= {"state", "pid", "started_at", "ended_at", "exit_code", "error"}

    records = runs.read_metrics(run_dir)
    assert all({"step", "total_steps", "epoch", "elapsed_s"} <= set(r) for r in records)
    train_lines = [r for r in records if "loss" in r]
    assert train_lines and all({"loss", "learning_rate", "tokens_per_s"} <= set(r)
                               for r in train_lines)
    assert any("eval_loss" in r for r in records)
    assert any("eta_s" in r for r in records)
    assert records[-1]["step"] == records[-1]["total_steps"]

    final = run_dir / "final"
    assert (final / "adapter_config.json").is_file()
    assert (final / "adapter_model.safetensors").is_file()
    assert (final / "tokenizer.json").is_file()
    assert not list(final.glob("*.bin"))  # safetensors only

    # config.yaml reruns as it is
    assert (run_dir / "command.txt").read_text().split()[1:3] == ["-m", "core"]
    rerun = tmp_path / "rerun"
    text = (run_dir / "config.yaml").read_text().replace(str(run_dir), str(rerun))
    (tmp_path / "rerun.yaml").write_text(text)
    proc = subprocess.run([sys.executable, "-m", "core", "train", str(tmp_path / "rerun.yaml"),
                           "max_samples=4", "save_steps=1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_adapter_loads_with_peft_alone(demo_model_path, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_train(demo_model_path, tmp_path / "run", "epochs=0.5")
    base = AutoModelForCausalLM.from_pretrained(demo_model_path)
    model = PeftModel.from_pretrained(base, tmp_path / "run" / "final")
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.logits.shape[-1] == base.config.vocab_size


def test_kill9_then_resume_restores_step_and_lr(demo_model_path, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_train(demo_model_path, run_dir, "epochs=3", "save_steps=3", "max_samples=24")
    wait_for(lambda: (run_dir / "checkpoint-3").is_dir() and any(
        r.get("step", 0) >= 4 for r in runs.read_metrics(run_dir)), proc, what="checkpoint-3")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    status = runs.read_status(run_dir)
    assert status["state"] == "failed" and "disappeared" in status["error"]

    logged = [r for r in runs.read_metrics(run_dir) if "loss" in r]
    before = {r["step"]: r for r in logged}
    last = runs.last_checkpoint(run_dir)
    resumed_from = int(last.name.split("-")[1])
    run_train(demo_model_path, run_dir, "epochs=3", "save_steps=3", "max_samples=24",
              "resume=true")
    after = [r for r in runs.read_metrics(run_dir) if "loss" in r]
    # metrics.jsonl is append-only: the resumed run's lines are the ones after the old ones
    first_new = after[len(logged)]
    assert first_new["step"] == resumed_from + 1, (resumed_from, first_new)
    # the schedule continues where it was: same total, same lr for the same step
    assert first_new["total_steps"] == 18
    if resumed_from + 1 in before:
        assert first_new["learning_rate"] == pytest.approx(before[resumed_from + 1]["learning_rate"])
    assert runs.read_status(run_dir)["state"] == "completed"
    assert after[-1]["step"] == 18


def test_sigterm_aborts_and_keeps_a_checkpoint(demo_model_path, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_train(demo_model_path, run_dir, "epochs=5", "max_samples=24")
    wait_for(lambda: any(r.get("step", 0) >= 2 for r in runs.read_metrics(run_dir)),
             proc, what="two steps")
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert time.time() - t0 < 30
    status = runs.read_status(run_dir)
    assert status["state"] == "aborted"
    assert runs.last_checkpoint(run_dir) is not None  # the abort saved the current step
    assert not (run_dir / "final").exists()


@pytest.mark.parametrize("method, expect", [
    ("dora", "adapter_config.json"),
    ("qlora", "adapter_config.json"),
    ("full", "model.safetensors"),
    ("freeze", "model.safetensors"),
])
def test_methods_train_and_save(demo_model_path, tmp_path, method, expect):
    run_train(demo_model_path, tmp_path / "run", f"method={method}", "max_samples=8",
              "epochs=1", "freeze_layers=1")
    assert (tmp_path / "run" / "final" / expect).is_file()
    losses = [r["loss"] for r in runs.read_metrics(tmp_path / "run") if "loss" in r]
    assert losses and all(math.isfinite(l) for l in losses)  # not NaN, not infinite


def test_pretraining_stage_on_plain_text(demo_model_path, tmp_path):
    run_train(demo_model_path, tmp_path / "run", "stage=pt", "dataset=text_demo",
              "max_samples=8")
    assert runs.read_status(tmp_path / "run")["state"] == "completed"


def test_loss_falls_on_repeated_data(demo_model_path, tmp_path):
    run_train(demo_model_path, tmp_path / "run", "epochs=12", "max_samples=8", "batch_size=4",
              "learning_rate=3e-3", "lora_rank=16", "lora_alpha=32", "warmup_ratio=0")
    losses = [r["loss"] for r in runs.read_metrics(tmp_path / "run") if "loss" in r]
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("overrides, fragment", [
    (["epochs=-1"], "epochs"),
    (["bogus_key=1"], "unknown key 'bogus_key'"),
    (["dataset=no_such_dataset"], "no_such_dataset"),
    (["model=/no/such/model"], "model folder not found"),
    (["stage=ppo"], "use stage: grpo with reward_model"),
    (["stage=dpo", "dataset=identity"], "stage"),
])
def test_bad_input_exits_2_without_traceback(demo_model_path, tmp_path, overrides, fragment):
    proc = run_train(demo_model_path, tmp_path / "run", *overrides, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert fragment in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("cap_mb, loads", [(5, False), (400, True)])
def test_running_out_of_memory_fails_clearly(demo_model_path, tmp_path, cap_mb, loads):
    """A real allocation failure under the trainer's hard cap (TUNEBENCH_TRAIN_MEMORY_MB):
    5 MB fails while loading the 14 MB demo model; 400 MB loads it and fails in the first
    step, whose batch of 8 x 512 tokens needs over a gigabyte."""
    words = ("every token of this long answer keeps activations for the backward pass " * 40)
    long_rows = [{"instruction": f"Tell story {i}.", "output": " ".join(words.split()[:480])}
                 for i in range(16)]
    dataset = tmp_path / "long.jsonl"
    dataset.write_text("\n".join(json.dumps(r) for r in long_rows) + "\n")
    run_dir = tmp_path / "run"
    cmd = train_cmd(demo_model_path, run_dir, f"dataset={dataset}", "max_samples=0",
                    "batch_size=8", "cutoff_len=512")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={
        **os.environ, "HF_HUB_OFFLINE": "1", "TUNEBENCH_TRAIN_MEMORY_MB": str(cap_mb)})
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    status = runs.read_status(run_dir)
    assert status["state"] == "failed"
    assert status["error"].startswith("ran out of memory") and "batch_size" in status["error"]
    log = (run_dir / runs.LOG).read_text()
    assert "Traceback" not in log and "can't allocate memory" in log.lower().replace(
        "cannot allocate", "can't allocate")
    assert ("parameters, " in log) == loads  # the model line is printed once it has loaded
    assert (runs.read_metrics(run_dir) != []) == loads


def test_file_size_limit_mid_training_fails_clearly(demo_model_path, tmp_path):
    """A full disk, simulated with RLIMIT_FSIZE: writing a checkpoint fails with EFBIG."""
    import resource

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    run_dir = tmp_path / "run"
    proc = subprocess.run(train_cmd(demo_model_path, run_dir, "save_steps=1", "max_samples=8"),
                          capture_output=True, text=True, preexec_fn=limit_file_size,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 1
    status = runs.read_status(run_dir)
    assert status["state"] == "failed"
    assert "disk is full" in status["error"]
    assert runs.checkpoints(run_dir) == []  # nothing half-written is listed as a checkpoint


def test_unwritable_output_dir_is_bad_input(demo_model_path, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the run folder's parent should be")
    proc = run_train(demo_model_path, blocker / "run", check=False)
    assert proc.returncode == 2 and "cannot write the run folder" in proc.stderr


# The demo model's loss curve on one deterministic run (seed 42, 8 steps of LoRA on the
# first 16 identity records), pinned as torchtune pins its losses: a change in the data,
# the templates, the masking or the trainer shows up here. Re-pin only for a change meant
# to move it, and say why in the commit.
#
# One curve per demo-model build. The demo model is trained from scratch on first use, and
# the same recipe gives other weights on another CPU: on an AMD EPYC (Zen 4) the build
# differs from the one the first pins came from (the machine CI passed on at earlier
# stops); float sums in another order, carried through 12,800 rows of pretraining. Each
# build is identical from run to run on its own machine. The first loss is taken before
# any update, so it names the build; it depends on the data, template and masking too, so
# a change there matches no build and fails.
PINNED_LOSSES = {
    "first": [4.6384, 4.3257, 4.4562, 4.2227, 4.2561, 4.6245, 4.0830, 4.0358],
    "amd-zen4": [4.4920, 4.2217, 4.4480, 4.0716, 4.3053, 4.5083, 4.0157, 3.9244],
}


def test_the_demo_models_loss_curve_is_pinned(demo_model_path, tmp_path):
    run_train(demo_model_path, tmp_path / "run", "epochs=2", "warmup_ratio=0", "seed=42")
    losses = [r["loss"] for r in runs.read_metrics(tmp_path / "run") if "loss" in r]
    build = next((name for name, pinned in PINNED_LOSSES.items()
                  if losses[0] == pytest.approx(pinned[0], rel=0.005)), None)
    assert build, (f"first loss {losses[0]:.4f} matches no pinned demo-model build "
                   f"({', '.join(f'{n} {p[0]}' for n, p in PINNED_LOSSES.items())}): a change "
                   f"in the data, template or masking, or a new CPU family; curve {losses}")
    assert losses == pytest.approx(PINNED_LOSSES[build], rel=0.01), (build, losses)


def test_a_save_steps_beyond_the_run_writes_only_the_final_model(demo_model_path, tmp_path):
    """A large save_steps is how people ask for the final model only: accepted, and said."""
    run_dir = tmp_path / "run"
    run_train(demo_model_path, run_dir, "save_steps=100000", "max_samples=8")
    assert (run_dir / "final").is_dir() and runs.checkpoints(run_dir) == []
    log = (run_dir / runs.LOG).read_text(encoding="utf-8")
    assert "no checkpoint-N/ will be written, only final/" in log


def test_early_stopping_ends_a_run_whose_eval_loss_rises(demo_model_path, tmp_path):
    """A learning rate far too high makes the held-out loss climb after the first checkpoint;
    with patience 2 the run ends two evaluations later, completed, with the reason recorded,
    and final/ is the best checkpoint's adapter, not the last step's."""
    from safetensors.torch import load_file
    run_dir = tmp_path / "run"
    run_train(demo_model_path, run_dir, "epochs=40", "max_samples=24", "val_size=0.25",
              "save_steps=2", "learning_rate=0.3", "warmup_ratio=0",
              "early_stopping_patience=2")
    status = runs.read_status(run_dir)
    records = runs.read_metrics(run_dir)
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    last_step = records[-1]["step"]
    assert status["state"] == "completed"
    assert last_step < records[-1]["total_steps"], "the run went to its end"
    best_step, best = min(evals, key=lambda e: e[1])
    after_best = [step for step, _ in evals if step > best_step]
    assert after_best == [evals[-2][0], last_step]  # the second evaluation past the best
    assert f"step {best_step}" in status["stopped_early"] and f"{best:.4f}" in status["stopped_early"]
    final = load_file(run_dir / "final" / "adapter_model.safetensors")
    kept = load_file(run_dir / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    assert all((final[k] == kept[k]).all() for k in kept)


def test_early_stopping_without_held_out_records_is_refused(demo_model_path, tmp_path):
    proc = run_train(demo_model_path, tmp_path / "run", "early_stopping_patience=2",
                     check=False)
    assert proc.returncode == 2 and "set val_size above 0" in proc.stdout + proc.stderr


def test_tensorboard_logs_the_losses_the_run_folder_holds(demo_model_path, tmp_path):
    """report_to=tensorboard writes event files into the run folder, through transformers'
    own callback, and their training losses are the ones metrics.jsonl records."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = tmp_path / "run"
    run_train(demo_model_path, run_dir, "report_to=tensorboard", "epochs=2")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    recorded = {r["step"]: r["loss"] for r in runs.read_metrics(run_dir) if "loss" in r}
    assert len(recorded) >= 8 and logged.keys() == recorded.keys()
    assert all(math.isclose(logged[s], recorded[s], rel_tol=1e-6) for s in recorded)


def test_a_tracker_that_cannot_log_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """A missing package names the extra to install; wandb and swanlab without a login (no
    key, no offline mode, no netrc entry) name the ways to log in."""
    from core import config as cfg, trackers
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    for name in ("WANDB_API_KEY", "WANDB_MODE", "SWANLAB_API_KEY", "SWANLAB_MODE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    for name in ("wandb", "swanlab", "mlflow"):
        installed = importlib.util.find_spec(name) is not None
        expected = [] if installed and name == "mlflow" else [
            "needs a login" if installed else f"pip install 'tunebench[{name}]'"]
        found = trackers.problems(name)
        assert len(found) == len(expected) and all(e in str(f) for e, f in zip(expected, found))
    assert not trackers.TRACKERS["wandb"].ready() and not trackers.TRACKERS["swanlab"].ready()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password KEY\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert trackers.TRACKERS["wandb"].ready()
    monkeypatch.setenv("SWANLAB_MODE", "local")
    assert trackers.TRACKERS["swanlab"].ready()
    config = cfg.TrainConfig(report_to="mlflow")
    assert cfg.validate(config) == trackers.problems("mlflow")
