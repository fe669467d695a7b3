"""Training on several devices: one `tunebench train` parent, N torchrun workers.

The parent owns the run directory's status (it is the pid the UI watches and
signals); it writes the launch files into the run directory and starts
`torchrun -m core train <run_dir>/config.yaml`. Each worker runs the normal
training path; transformers' Trainer does the DDP/FSDP/DeepSpeed work from the
arguments built in core/trainer.py. Only rank 0 writes metrics, checkpoints
and the final status.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from . import runs
from .config import TrainConfig

DEEPSPEED_FILE, FSDP_FILE, LAUNCH_FILE = "deepspeed.json", "fsdp.json", "launch.json"


def is_worker() -> bool:
    """True inside a torchrun worker of a multi-process run."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def deepspeed_config(config: TrainConfig) -> dict:
    """A DeepSpeed ZeRO config; "auto" values are filled by transformers from SFTConfig."""
    stage = 3 if config.distributed == "deepspeed_zero3" else 2
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": True,
            "contiguous_gradients": True,
            **({"stage3_gather_16bit_weights_on_model_save": True} if stage == 3 else {}),
        },
    }


def fsdp_config(config: TrainConfig) -> dict:
    return {"fsdp": "full_shard auto_wrap",
            "fsdp_config": {"use_orig_params": True, "activation_checkpointing":
                            config.gradient_checkpointing}}


def write_launch_files(config: TrainConfig, run_dir: Path) -> list[str]:
    """Write the engine config for `distributed` into the run dir; return the torchrun command."""
    run_dir = Path(run_dir)
    if config.distributed.startswith("deepspeed"):
        runs.write_atomic(run_dir / DEEPSPEED_FILE, json.dumps(deepspeed_config(config), indent=1))
    elif config.distributed == "fsdp":
        runs.write_atomic(run_dir / FSDP_FILE, json.dumps(fsdp_config(config), indent=1))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
               str(config.num_devices), "--master_addr", "127.0.0.1", "--master_port",
               str(_free_port()), "-m", "core", "train", str(run_dir / runs.CONFIG)]
    runs.write_atomic(run_dir / LAUNCH_FILE, json.dumps(
        {"distributed": config.distributed, "num_devices": config.num_devices,
         "command": command}, indent=1))
    return command


def trainer_kwargs(config: TrainConfig, run_dir: Path) -> dict:
    """Extra SFTConfig arguments for the distributed engine (read from the run dir's files)."""
    if config.num_devices < 2:
        return {}
    import torch

    kwargs = {"ddp_find_unused_parameters": False}
    if not torch.cuda.is_available():
        kwargs.update(use_cpu=True, ddp_backend="gloo")  # accelerate only goes multi-CPU when told
    if config.distributed.startswith("deepspeed"):
        kwargs["deepspeed"] = str(Path(run_dir) / DEEPSPEED_FILE)
    elif config.distributed == "fsdp":
        kwargs.update(json.loads((Path(run_dir) / FSDP_FILE).read_text()))
    return kwargs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_and_wait(config: TrainConfig, run_dir: Path) -> int:
    """Run the workers; forward SIGTERM/SIGINT to all of them; settle the final status."""
    command = write_launch_files(config, run_dir)
    print(f"starting {config.num_devices} processes ({config.distributed}): "
          f"{' '.join(command)}", flush=True)
    runs.write_status(run_dir, "running", pid=os.getpid(), phase="starting workers")
    proc = subprocess.Popen(command, start_new_session=True, stdin=subprocess.DEVNULL)

    def forward(signum, frame):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = proc.wait()
    status = runs.read_status_raw(run_dir) or {}
    if status.get("state") == "running":  # the workers died before rank 0 could report
        runs.write_status(run_dir, "failed", exit_code=code or 1,
                          error=f"a training process exited with code {code}")
    return (runs.read_status_raw(run_dir) or {}).get("exit_code") or code
