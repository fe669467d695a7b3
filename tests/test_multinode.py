"""Training across machines, on this one: two `tunebench train` nodes (node_rank 0 and 1)
meet in torchrun's rendezvous on 127.0.0.1, one CPU process each, gloo."""

import contextlib
import json
import os
import subprocess
from pathlib import Path

import psutil
import pytest

from core import config as cfg
from core import distributed, runs

from test_train import run_train, train_cmd, wait_for

pytestmark = pytest.mark.train
# One thread per process: the two nodes share this machine's cores.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
STEPS = ["max_samples=32", "batch_size=4", "learning_rate=2e-3", "warmup_ratio=0",
         "save_steps=2"]


def start_node(model, run_dir, node_rank, port, *overrides, log=None, env=None):
    command = train_cmd(model, run_dir, *STEPS, "num_nodes=2", f"node_rank={node_rank}",
                        "master_addr=127.0.0.1", f"master_port={port}", *overrides)
    return subprocess.Popen(command, env={**ENV, **(env or {})}, stdout=log or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(*procs, timeout=240):
    try:
        return [proc.wait(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:  # a failed assertion must not leave a node behind
            if proc.poll() is None:  # torchrun runs in a session of its own: kill the tree
                tree = psutil.Process(proc.pid)
                for each in [*tree.children(recursive=True), tree]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        each.kill()
                proc.wait()


def losses(run_dir):
    return [r["loss"] for r in runs.read_metrics(run_dir) if "loss" in r]


def test_two_nodes_train_like_two_processes_on_one(demo_model_path, tmp_path):
    run_dir = tmp_path / "two-nodes"
    port = distributed._free_port()
    node1 = start_node(demo_model_path, run_dir, 1, port, log=open(tmp_path / "n1.out", "wb"))
    node0 = start_node(demo_model_path, run_dir, 0, port, log=open(tmp_path / "n0.out", "wb"))
    assert finish(node0, node1) == [0, 0], (tmp_path / "n0.out").read_text()[-3000:] + \
        (tmp_path / "n1.out").read_text()[-3000:]

    status = runs.read_status(run_dir)
    assert status["state"] == "completed" and status["pid"] == node0.pid
    launch = json.loads((run_dir / "launch.json").read_text())
    assert launch["num_nodes"] == 2 and "--node_rank" in launch["command"]
    # rank 0 alone wrote the run folder: one metrics line per step, its checkpoints, final/
    rows = [r for r in runs.read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) == \
        list(range(1, rows[-1]["total_steps"] + 1))
    assert sorted(p.name for p in runs.checkpoints(run_dir)) == ["checkpoint-2", "checkpoint-4"]
    assert (run_dir / "checkpoint-2" / "rng_state_1.pth").is_file()  # node 1's rank saved too
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    node_log = (run_dir / "nodes" / "node-1.log").read_text()
    assert "shared with node 0" in node_log and "node 1 done" in node_log
    assert json.loads((run_dir / "nodes" / "node-1.json").read_text())["state"] == "completed"
    assert "node 1 of 2" not in (run_dir / "train.log").read_text()  # node 1 logs apart

    # Reference: the same two ranks as two processes of one node.
    single = tmp_path / "one-node"
    proc = run_train(demo_model_path, single, *STEPS, "num_devices=2")
    assert proc.returncode == 0
    # Same world size, ranks, seed and data order: the same computation, so the losses
    # agree step by step. Measured: equal to the last bit (a 2-way all-reduce adds the same
    # two numbers). 1e-5 leaves room only for float32 rounding, should the all-reduce split
    # its sums differently across machines. Different batches' losses differ by ~1e-1
    # (4.70, 4.14, 4.33, 4.26 here), so a wrong shard or rank order would show.
    assert losses(run_dir) == pytest.approx(losses(single), rel=1e-5), \
        (losses(run_dir), losses(single))


def _kill_rank(node):
    """SIGKILL node 1's worker: its torchrun agent sees the rank die and reports it."""
    workers = [p for p in psutil.Process(node.pid).children(recursive=True)
               if "torch.distributed.run" not in " ".join(p.cmdline())]
    assert len(workers) == 1
    workers[0].kill()


def _kill_node(node):
    """SIGKILL all of node 1 (parent, agent, worker), as a machine that goes down."""
    parent = psutil.Process(node.pid)
    for proc in [parent, *parent.children(recursive=True)]:
        proc.kill()


# How node 1 fails, and how node 0 must name the cause.
FAILURES = {
    "rank": (_kill_rank, "rank 1 was killed by signal 9 (SIGKILL)"),
    "node": (_kill_node, "stopped without a report"),
    # A rank that fails before its first collective (here: a memory cap hit while loading
    # the model) leaves rank 0 waiting for it: node 0 must stop on node 1's report.
    "error": (None, "rank 1 on node 1: ran out of memory"),
}


@pytest.mark.parametrize("how", FAILURES)
def test_a_dying_rank_fails_the_run_naming_its_node(demo_model_path, tmp_path, how):
    kill, cause = FAILURES[how]
    run_dir = tmp_path / "run"
    port = distributed._free_port()
    node1 = start_node(demo_model_path, run_dir, 1, port, "max_samples=64", "epochs=4",
                       # 8 MB past what it holds: far too little for the model, enough
                       # for the report of the failure (with 1 MB that report itself
                       # failed now and then under load)
                       env={} if kill else {"TUNEBENCH_TRAIN_MEMORY_MB": "8"})
    node0 = start_node(demo_model_path, run_dir, 0, port, "max_samples=64", "epochs=4")
    try:
        if kill:
            wait_for(lambda: losses(run_dir), node0, timeout=180, what="the first step")
            kill(node1)
    finally:
        codes = finish(node0, node1, timeout=120)
    assert codes[0] == 1 and codes[1] != 0
    status = runs.read_status(run_dir)
    assert status["state"] == "failed"
    assert status["error"].startswith(f"node 1 failed: {cause}"), status["error"]
    assert "; then node 0: " in status["error"]  # it only lost its peer, or was stopped
    assert len(losses(run_dir)) < 32  # it did not train on to the end


def test_a_node_without_the_shared_folder_logs_locally(demo_model_path, tmp_path):
    # Node 1 names another folder: as if the run folder were on node 0's own disk.
    run_dir, elsewhere = tmp_path / "run", tmp_path / "node1-disk" / "run"
    port = distributed._free_port()
    node1 = start_node(demo_model_path, elsewhere, 1, port, "max_samples=16")
    node0 = start_node(demo_model_path, run_dir, 0, port, "max_samples=16")
    assert finish(node0, node1) == [0, 0]
    assert runs.read_status(run_dir)["state"] == "completed"
    assert not (run_dir / "nodes" / "node-1.log").exists()
    assert not (elsewhere / runs.STATUS).exists() and not (elsewhere / "metrics.jsonl").exists()
    config = cfg.load(None, [f"output_dir={elsewhere}", "num_nodes=2", "node_rank=1",
                             "master_addr=127.0.0.1"])
    local = distributed.local_node_dir(config, elsewhere.resolve())
    log = (local / "node-1.log").read_text()
    assert "is not shared with node 0" in log and "node 1 done" in log
    assert json.loads((local / "node-1.json").read_text())["state"] == "completed"


@pytest.mark.parametrize("overrides, field", [
    (["num_nodes=2", "master_addr=10.0.0.1"], "output_dir"),
    (["num_nodes=2", "output_dir=/tmp/x"], "master_addr"),
    (["num_nodes=2", "node_rank=2", "master_addr=h", "output_dir=/tmp/x"], "node_rank"),
    (["master_port=70000"], "master_port"),
    (["master_addr=http://node0:29500"], "master_addr"),
])
def test_multinode_settings_are_checked(overrides, field):
    with pytest.raises(cfg.BadInput, match=f"{field}:"):
        cfg.load(None, overrides)


def test_slurm_launcher_gives_each_node_its_rank(tmp_path):
    """The sbatch script's per-node command lines, with stand-ins for Slurm's commands and
    for tunebench (which records its arguments), then checked as configs."""
    repo = Path(__file__).resolve().parents[1]
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    stubs = {
        "scontrol": "printf 'gpu-a\\ngpu-b\\n'",
        # srun: run the task once per node, as Slurm would, with that node's SLURM_NODEID
        "srun": 'while [ "${1#--}" != "$1" ]; do shift; done\n'
                'for id in 0 1; do SLURM_NODEID=$id "$@"; done',
        "tunebench": f'printf "%s\\n" "$*" >> {calls}',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_JOB_ID": "1234",
           "SLURM_JOB_NAME": "tunebench"}
    env.pop("MASTER_PORT", None), env.pop("RUN_DIR", None)
    proc = subprocess.run(["bash", str(repo / "examples/slurm/train_multinode.sbatch"),
                           "examples/ddp_cpu.yaml", "epochs=1"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = calls.read_text().splitlines()
    assert len(lines) == 2
    for node_rank, line in enumerate(lines):
        config_file, *overrides = line.split()
        assert config_file == "train"
        config = cfg.load(repo / overrides[0], overrides[1:])
        assert (config.num_nodes, config.node_rank) == (2, node_rank)
        assert (config.master_addr, config.master_port) == ("gpu-a", 21234)
        assert config.epochs == 1 and config.num_devices == 1
        assert config.output_dir == str(repo / "saves" / "tunebench-1234")
