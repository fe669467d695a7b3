"""Training on several devices and machines: one `tunebench train` parent per machine
(node), each starting torchrun for its N workers.

Node 0's parent owns the run directory's status (it is the pid the UI watches and
signals); it writes the launch files into the run directory and starts
`torchrun -m core train <run_dir>/config.yaml`. Each worker runs the normal
training path; transformers' Trainer does the DDP/FSDP/DeepSpeed work from the
arguments built in core/trainer.py. Only global rank 0 writes metrics, checkpoints
and the final status.

Across machines (num_nodes > 1) every node runs `tunebench train CONFIG node_rank=K`.
The nodes meet in torchrun's static rendezvous on master_addr:master_port, which
node 0 hosts: it keeps global rank 0 on node 0 (torchrun's c10d rendezvous ignores
--node_rank and orders nodes by host name and pid, so rank 0 could land elsewhere).
The other nodes never write the run folder's own files; `run_other_node` writes
their launch files in a folder of their own and their log under `<run>/nodes/`
when the run folder is shared storage, locally otherwise. How a node knows: node 0
writes `nodes/node-0.json` before it starts torchrun, and a node that can read that
file for this master address sees the same storage.

When a rank dies, torchrun's agent on its node names the rank and the cause (the
worker's own error file, or the signal). Each other node writes that ending into
`nodes/node-K.json`; node 0 watches those files while it runs (FailureWatch), stops its
own workers once another node failed, and puts the failing node first in status.json's
error, ahead of the ranks that only lost their connection to it or were stopped.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from . import jobs, paths, runs
from .config import TrainConfig, to_yaml

DEEPSPEED_FILE, FSDP_FILE, LAUNCH_FILE = "deepspeed.json", "fsdp.json", "launch.json"
NODES_DIR = "nodes"  # in the run folder: node-K.json (how each node is doing), node-K.log
# Where a worker finds the launch files when they are not in the run folder (nodes > 0).
LAUNCH_DIR_ENV = "TUNEBENCH_LAUNCH_DIR"
# How long node 0 waits, after a failure, for the other nodes to report theirs (the
# agents notice a dead rank within seconds; a shared file system may take a few more).
REPORT_WAIT_S = 30
# Errors a rank meets when another rank, not itself, failed: its peer went away, or its
# agent (or FailureWatch) stopped it once another rank died.
SECONDARY = re.compile(r"stopped by|connection closed by peer|connection reset|"
                       r"broken pipe|econnreset|"
                       r"remote process exited|socket timeout|timed out|connection refused|"
                       r"communicator was aborted", re.IGNORECASE)
STOP_GRACE_S = 5  # for the workers to end once another node failed (see _stop)
TAIL_LINES = 400  # of torchrun's output, kept to read its root-cause block


WORKER_ENV = "TUNEBENCH_WORKER"  # set by launch_and_wait for the workers it starts


def is_worker() -> bool:
    """True inside a torchrun worker that tunebench launched (or any multi-process one)."""
    return os.environ.get(WORKER_ENV) == "1" or int(os.environ.get("WORLD_SIZE", "1")) > 1


def needs_launcher(config: TrainConfig) -> bool:
    """Whether the run goes through torchrun: more than one process, or a sharded engine
    (DeepSpeed, FSDP) even on one device, where it still offloads, shards optimizer state
    and is what a later multi-GPU run will use (bench/gpu_check.sh checks it on one GPU)."""
    return world_size(config) > 1 or config.distributed != "ddp"


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def world_size(config: TrainConfig) -> int:
    return config.num_devices * config.num_nodes


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


def torchrun_command(config: TrainConfig, config_file: Path) -> list[str]:
    """torchrun for this node's workers: on loopback for one node, else the static
    rendezvous on node 0 (see the module docstring)."""
    if config.num_nodes > 1:
        rendezvous = ["--nnodes", str(config.num_nodes), "--node_rank", str(config.node_rank),
                      "--rdzv_backend", "static", "--master_addr", config.master_addr,
                      "--master_port", str(config.master_port)]
    else:
        rendezvous = ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
            str(config.num_devices), *rendezvous, "-m", "core", "train", str(config_file)]


def write_launch_files(config: TrainConfig, run_dir: Path,
                       launch_dir: Path | None = None) -> list[str]:
    """Write the engine config for `distributed` into `launch_dir` (the run dir, or a node's
    own folder on nodes other than 0, with its config.yaml); return the torchrun command."""
    run_dir = Path(run_dir)
    launch_dir = Path(launch_dir or run_dir)
    if config.distributed.startswith("deepspeed"):
        runs.write_atomic(launch_dir / DEEPSPEED_FILE, json.dumps(deepspeed_config(config),
                                                                  indent=1))
    elif config.distributed == "fsdp":
        runs.write_atomic(launch_dir / FSDP_FILE, json.dumps(fsdp_config(config), indent=1))
    if launch_dir != run_dir:
        runs.write_atomic(launch_dir / runs.CONFIG, to_yaml(config))
    command = torchrun_command(config, launch_dir / runs.CONFIG)
    runs.write_atomic(launch_dir / LAUNCH_FILE, json.dumps(
        {"distributed": config.distributed, "num_devices": config.num_devices,
         "num_nodes": config.num_nodes, "node_rank": config.node_rank,
         "command": command}, indent=1))
    return command


def trainer_kwargs(config: TrainConfig, run_dir: Path) -> dict:
    """Extra SFTConfig arguments for the distributed engine (read from the launch files)."""
    if not needs_launcher(config):
        return {}
    import torch

    launch_dir = Path(os.environ.get(LAUNCH_DIR_ENV) or run_dir)
    kwargs = {"ddp_find_unused_parameters": False}
    if not torch.cuda.is_available():
        kwargs.update(use_cpu=True, ddp_backend="gloo")  # accelerate only goes multi-CPU when told
    if config.distributed.startswith("deepspeed"):
        kwargs["deepspeed"] = str(launch_dir / DEEPSPEED_FILE)
    elif config.distributed == "fsdp":
        kwargs.update(json.loads((launch_dir / FSDP_FILE).read_text()))
    return kwargs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def record_worker_error(error: str) -> None:
    """Tell torchrun's agent why this worker is about to exit, through its error-file
    protocol: it prints the message in its root-cause block, where the launchers read it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or not is_worker():
        return
    message = f"rank {rank()} on node {os.environ.get('GROUP_RANK', '0')}: {error}"[:2000]
    # The agent prints py_callstack as the failure's "traceback": here, the message itself.
    report = {"message": {"message": message, "extraInfo": {
        "py_callstack": message, "timestamp": str(int(time.time()))}}}
    try:
        Path(path).write_text(json.dumps(report))
    except (OSError, MemoryError):  # a process at its memory cap may not even write this
        pass  # the agent then reports the exit code alone


# --- the parent on each node ------------------------------------------------------

def _start(command: list[str], env: dict, **popen_args) -> subprocess.Popen:
    """Start torchrun in its own session; SIGTERM/SIGINT to us go to all its processes."""
    proc = subprocess.Popen(command, start_new_session=True, stdin=subprocess.DEVNULL,
                            env={**os.environ, **env}, **popen_args)

    def forward(signum, frame):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return proc


def torchrun_failure(output: str) -> str | None:
    """The cause of a failed torchrun, from the failure report its agent prints: the worker
    that failed by itself (its own message, "rank R on node K: ...", see
    record_worker_error; or its rank and signal or exit code), before those that only
    followed it, whatever their order in the report."""
    if "Root Cause" not in output:  # torchrun itself failed (e.g. a node never joined)
        errors = re.findall(r"^[\w.]*(?:Error|Exception): .+$", output, re.MULTILINE)
        return "torchrun: " + re.sub(r"^[\w.]*\.", "", errors[-1]) if errors else None
    report = output[output.rfind("Failures:"):]
    entries = re.findall(r"\brank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+).*?traceback\s*:"
                         r"\s*([^\n]*)", report, re.DOTALL)
    causes = [_describe_failure(*entry) for entry in entries]
    if not causes:
        return "a worker failed"
    first = causes[-1]  # the root cause comes last
    return first if not SECONDARY.search(first) else next(
        (c for c in causes if not SECONDARY.search(c)), first)


def _describe_failure(rank_text: str, code_text: str, trace: str) -> str:
    trace, code = trace.strip(), int(code_text)
    if trace and not trace.startswith(("Signal ", "To enable traceback")):
        return trace  # the worker said what went wrong
    if code < 0:
        try:
            return f"rank {rank_text} was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"rank {rank_text} was killed by signal {-code}"
    return f"rank {rank_text} exited with code {code}"


def _run_torchrun(command: list[str], env: dict, on_output=None,
                  on_start=None) -> tuple[int, str | None]:
    """Run torchrun to the end; return its exit code and what it says failed. Its output
    (the workers' too) passes through here, to `on_output` or our stdout; `on_start` gets
    its process."""
    write = on_output or (lambda data: (sys.stdout.buffer.write(data), sys.stdout.buffer.flush()))
    tail = collections.deque(maxlen=TAIL_LINES)
    proc = _start(command, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if on_start:
        on_start(proc)
    for line in proc.stdout:
        write(line)
        tail.append(line)
    code = proc.wait()
    if not code:
        return 0, None
    return code, torchrun_failure(b"".join(tail).decode("utf-8", "replace"))


def launch_and_wait(config: TrainConfig, run_dir: Path) -> int:
    """Node 0 (or the only node): run the workers, settle the final status."""
    command = write_launch_files(config, run_dir)
    where = f" on node 0 of {config.num_nodes}" if config.num_nodes > 1 else ""
    print(f"starting {config.num_devices} processes{where} ({config.distributed}): "
          f"{' '.join(command)}", flush=True)
    runs.write_status(run_dir, "running", pid=os.getpid(), phase="starting workers")
    nodes = Path(run_dir) / NODES_DIR
    if config.num_nodes > 1:  # also the mark that tells the other nodes the folder is shared
        nodes.mkdir(exist_ok=True)
        _clear_old_endings(nodes)
        _write_report(nodes, config, "running")
    watch = FailureWatch(config, nodes)
    code, failure = _run_torchrun(command, {WORKER_ENV: "1"}, on_start=watch.start)
    watch.stop()
    if config.num_nodes > 1:
        _write_report(nodes, config, "completed" if code == 0 else "failed", code, failure)
    status = runs.read_status_raw(run_dir) or {}
    # The workers died before rank 0 could report, rank 0 only saw a peer go away, or
    # another node's failure made us stop them.
    if code and (status.get("state") == "running" or watch.failed is not None
                 or status.get("state") == "failed"
                 and SECONDARY.search(status.get("error") or "")):
        own = (f"stopped by tunebench once node {watch.failed} failed"
               if watch.failed is not None else failure or status.get("error") or
               f"a training process exited with code {code}")
        runs.write_status(run_dir, "failed", exit_code=status.get("exit_code") or code,
                          error=_run_error(config, nodes, own))
    return (runs.read_status_raw(run_dir) or {}).get("exit_code") or code


class FailureWatch:
    """Node 0: stops its workers as soon as another node reports a failure of its own in
    nodes/. Without it, a rank that dies before its first collective (while loading the
    model, say) leaves rank 0 waiting for it until the collective timeout, 30 minutes."""

    def __init__(self, config: TrainConfig, nodes: Path):
        self.config, self.nodes = config, nodes
        self.failed: int | None = None  # the node whose report stopped us
        self.done = threading.Event()

    def start(self, proc: subprocess.Popen) -> None:
        if self.config.num_nodes > 1:
            threading.Thread(target=self._watch, args=(proc,), daemon=True).start()

    def stop(self) -> None:
        self.done.set()

    def _watch(self, proc: subprocess.Popen) -> None:
        # Another machine's file on shared storage: polling is all there is (no inotify).
        while not self.done.wait(1):
            for k in range(1, self.config.num_nodes):
                report = _read_json(self.nodes / f"node-{k}.json") or {}
                if report.get("state") == "failed" and \
                        not SECONDARY.search(report.get("error") or ""):
                    print(f"node {k} failed ({report.get('error')}): stopping this node's "
                          "workers", flush=True)
                    self.failed = k
                    _stop(proc)
                    return


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM torchrun's processes, then SIGKILL them after STOP_GRACE_S: a rank waiting
    for a dead peer inside a collective cannot run its signal handler, and torchrun's own
    grace before SIGKILL is 30 seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=STOP_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def _run_error(config: TrainConfig, nodes: Path, own: str) -> str:
    """The run's error: the node whose rank failed first, then those that only lost it."""
    if config.num_nodes == 1:
        return own
    failures = [(0, own)] + _other_node_failures(config, nodes)
    causes = [f for f in failures if not SECONDARY.search(f[1])]
    followers = [f for f in failures if SECONDARY.search(f[1])]
    if not causes:
        followers.append((None, "no node reported a failure of its own: see the other nodes' "
                                "logs (nodes/node-K.log here, or the folder each log names)"))
    first, *rest = causes + followers
    text = (f"node {first[0]} failed: " if first[0] is not None else "") + first[1][:500]
    if rest:
        text += "; then " + "; ".join(
            (f"node {n}: " if n is not None else "") + cause[:300] for n, cause in rest)
    return text


def _other_node_failures(config: TrainConfig, nodes: Path) -> list[tuple[int, str]]:
    """Failures the other nodes reported in nodes/ (waiting up to REPORT_WAIT_S for the ones
    still running). A node that never wrote there does not share the folder: not waited for."""
    deadline = time.monotonic() + REPORT_WAIT_S
    while True:
        reports = {k: _read_json(nodes / f"node-{k}.json") for k in range(1, config.num_nodes)}
        pending = [k for k, r in reports.items() if r and r.get("state") == "running"
                   and not _node_process_gone(r)]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # another machine's file: nothing to wait on but the file system
    failures = []
    for k, report in reports.items():
        if not report:
            continue
        if report.get("state") == "running":
            failures.append((k, "stopped without a report: its processes were killed, or its "
                                "machine or network went down"))
        elif report.get("state") == "failed":
            failures.append((k, report.get("error") or
                             f"torchrun exited with code {report.get('exit_code')}"))
    return failures


def _clear_old_endings(nodes: Path) -> None:
    """Drop how the nodes ended an earlier start of this run (before a resume), so that
    they are not read as this start's."""
    for path in nodes.glob("node-*.json"):
        report = _read_json(path)
        if report and report.get("state") != "running":
            path.unlink(missing_ok=True)


def _node_process_gone(report: dict) -> bool:
    """True when the node's parent ran on this machine and is gone (a killed node)."""
    return report.get("host") == socket.gethostname() and \
        not runs.pid_alive(report.get("pid"), report.get("started_at"))


def _write_report(folder: Path, config: TrainConfig, state: str, code: int | None = None,
                  error: str | None = None) -> None:
    path = Path(folder) / f"node-{config.node_rank}.json"
    old = _read_json(path) or {}
    report = {"node_rank": config.node_rank, "state": state, "host": socket.gethostname(),
              "pid": os.getpid(), "master": f"{config.master_addr}:{config.master_port}",
              "started_at": old.get("started_at") if state != "running" else runs.now_iso(),
              "ended_at": None if state == "running" else runs.now_iso(),
              "exit_code": code, "error": error}
    runs.write_atomic(path, json.dumps(report, indent=1))


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


# --- nodes other than 0 -----------------------------------------------------------

def node_run_dir(config: TrainConfig) -> Path:
    """The run folder every node names (config validation requires output_dir or run_name)."""
    folder = config.output_dir or str(Path("saves") / config.run_name)  # as train.py picks it
    return Path(folder).expanduser().resolve()


def local_node_dir(config: TrainConfig, run_dir: Path) -> Path:
    """This node's own folder: its launch files, and its log when the run folder is not
    shared. Under the cache, named after the run (and a hash of its path, as names repeat)."""
    key = hashlib.sha256(str(run_dir).encode()).hexdigest()[:8]
    return paths.cache_root() / NODES_DIR / f"{run_dir.name}-{key}" / f"node-{config.node_rank}"


def shares_run_folder(config: TrainConfig, run_dir: Path) -> bool:
    """True when node 0's mark for this rendezvous is readable here: same storage."""
    mark = _read_json(run_dir / NODES_DIR / "node-0.json")
    return bool(mark) and mark.get("master") == f"{config.master_addr}:{config.master_port}"


class NodeLog:
    """This node's log: in its own folder until the run folder shows to be shared, then
    moved to <run>/nodes/node-K.log. Everything also goes to our stdout."""

    def __init__(self, local: Path, shared: Path):
        self.path, self.shared_path, self.shared = local, shared, False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "ab")

    def write(self, data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        self.file.write(data)
        self.file.flush()

    def say(self, text: str) -> None:
        self.write((text + "\n").encode())

    def move_to_shared(self) -> None:
        self.file.close()
        self.shared_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.shared_path, "ab") as out:
            out.write(self.path.read_bytes())
        self.path.unlink()
        self.path, self.shared, self.file = self.shared_path, True, open(self.shared_path, "ab")

    def close(self) -> None:
        self.file.close()


def run_other_node(config: TrainConfig) -> int:
    """Node K > 0: run this machine's workers; log and report where node 0 can see them."""
    run_dir = node_run_dir(config)
    config = replace(config, output_dir=str(run_dir))
    local = local_node_dir(config, run_dir)
    local.mkdir(parents=True, exist_ok=True)
    name = f"node-{config.node_rank}"
    log = NodeLog(local / f"{name}.log", run_dir / NODES_DIR / f"{name}.log")
    checked = 0.0

    def on_output(line: bytes) -> None:
        nonlocal checked
        log.write(line)
        if not log.shared and time.monotonic() - checked > 1:
            checked = time.monotonic()
            _follow_shared_folder(config, run_dir, log)

    with jobs.own_pid_entry(local):  # keyed by this node's folder: node 0 may share the machine
        command = write_launch_files(config, run_dir, local)
        log.say(f"node {config.node_rank} of {config.num_nodes}: {config.num_devices} "
                f"processes joining node 0 at {config.master_addr}:{config.master_port} for "
                f"the run in {run_dir}: {' '.join(command)}")
        _follow_shared_folder(config, run_dir, log)
        code, failure = _run_torchrun(command, {LAUNCH_DIR_ENV: str(local), WORKER_ENV: "1"},
                                      on_output)
        _follow_shared_folder(config, run_dir, log)
        if not log.shared:
            log.say(f"the run folder {run_dir} is not shared with node 0 here (no "
                    f"{NODES_DIR}/node-0.json from it), so this node's log stays in {log.path}")
        _write_report(run_dir / NODES_DIR if log.shared else local, config,
                      "completed" if code == 0 else "failed", code,
                      failure or (f"torchrun exited with code {code}" if code else None))
        log.say(f"node {config.node_rank} " + ("done" if code == 0 else
                                                f"failed: {failure or f'exit code {code}'}"))
        log.close()
    return code


def _follow_shared_folder(config: TrainConfig, run_dir: Path, log: NodeLog) -> None:
    """Once node 0's mark shows the run folder is shared, log and report there."""
    if log.shared or not shares_run_folder(config, run_dir):
        return
    log.move_to_shared()
    _write_report(run_dir / NODES_DIR, config, "running")
    log.say(f"the run folder is shared with node 0: this node's log is {log.path}")
