"""Multi-process training: a real 2-process DDP run on CPU (gloo), and launch files."""

import json

import pytest

from core import config as cfg
from core import distributed, runs

from test_train import run_train

pytestmark = pytest.mark.train


def test_two_process_ddp_matches_single_process(demo_model_path, tmp_path):
    common = ["max_samples=32", "epochs=2", "learning_rate=2e-3", "warmup_ratio=0"]
    run_train(demo_model_path, tmp_path / "single", *common, "batch_size=8")
    run_train(demo_model_path, tmp_path / "ddp", *common, "batch_size=4", "num_devices=2",
              "save_steps=4")
    ddp_dir = tmp_path / "ddp"
    assert runs.read_status(ddp_dir)["state"] == "completed"
    launch = json.loads((ddp_dir / "launch.json").read_text())
    assert launch["num_devices"] == 2 and "torch.distributed.run" in " ".join(launch["command"])

    single = [r for r in runs.read_metrics(tmp_path / "single") if "loss" in r]
    ddp = [r for r in runs.read_metrics(ddp_dir) if "loss" in r]
    # one consistent run directory: rank 0 alone wrote metrics, one line per step
    assert [r["step"] for r in ddp] == list(range(1, len(ddp) + 1))
    assert len(ddp) == len(single) == ddp[-1]["total_steps"]
    assert sorted(p.name for p in runs.checkpoints(ddp_dir)) == ["checkpoint-4", "checkpoint-8"]
    assert (ddp_dir / "checkpoint-4" / "rng_state_1.pth").is_file()  # both ranks saved state
    assert (ddp_dir / "final" / "adapter_model.safetensors").is_file()
    mean = lambda rows: sum(r["loss"] for r in rows) / len(rows)
    assert mean(ddp) == pytest.approx(mean(single), rel=0.1)


@pytest.mark.parametrize("engine, expected_file, key", [
    ("deepspeed_zero2", distributed.DEEPSPEED_FILE, "zero_optimization"),
    ("deepspeed_zero3", distributed.DEEPSPEED_FILE, "zero_optimization"),
    ("fsdp", distributed.FSDP_FILE, "fsdp"),
])
def test_engine_config_files(tmp_path, engine, expected_file, key):
    config = cfg.TrainConfig(num_devices=4, distributed=engine)
    command = distributed.write_launch_files(config, tmp_path)
    written = json.loads((tmp_path / expected_file).read_text())
    assert key in written
    if engine == "deepspeed_zero3":
        assert written["zero_optimization"]["stage"] == 3
    assert command[command.index("--nproc_per_node") + 1] == "4"
    assert command[-1] == str(tmp_path / runs.CONFIG)


def test_gpu_engines_are_refused_on_cpu():
    from core.device import detect
    if detect().kind == "cuda":
        pytest.skip("this machine has a GPU")
    with pytest.raises(Exception, match="needs GPUs"):
        cfg.load(None, ["num_devices=2", "distributed=fsdp"])
    with pytest.raises(Exception, match="needs GPUs"):  # one device: not silently plain
        cfg.load(None, ["num_devices=1", "distributed=deepspeed_zero2"])


@pytest.mark.parametrize("engine, launched", [("ddp", False), ("fsdp", True),
                                              ("deepspeed_zero3", True)])
def test_sharded_engines_go_through_torchrun_on_one_device(tmp_path, engine, launched):
    """DeepSpeed and FSDP on one GPU still run under torchrun with their config files
    (bench/gpu_check.sh checks them there); plain training on one device does not."""
    config = cfg.TrainConfig(num_devices=1, distributed=engine)
    assert distributed.needs_launcher(config) is launched
    if launched:
        command = distributed.write_launch_files(config, tmp_path)
        assert command[command.index("--nproc_per_node") + 1] == "1"
        assert distributed.trainer_kwargs(config, tmp_path)  # the engine's arguments
