"""Run one command and measure it: wall time and peak memory of its whole process tree.

Peak memory is the larger of two readings: the summed RSS of the process and
all its descendants, polled every 50 ms with psutil, and the kernel's own
high-water mark for the child (ru_maxrss from wait4, exact but per process).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass

import psutil


@dataclass
class Measured:
    returncode: int
    wall_s: float
    cpu_s: float            # user + system CPU time of the child and its waited-for descendants
    peak_rss_gb: float
    output: str


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_measured(cmd: list[str], env: dict | None = None, cwd: str | None = None,
                 timeout: float = 3600) -> Measured:
    """Run `cmd` to completion; its stdout and stderr are captured together."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=cwd)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(proc.stdout), daemon=True)
    reader.start()
    watched, peak = psutil.Process(proc.pid), 0
    deadline = start + timeout
    while True:
        # Poll for exit without reaping: wait4 below must collect the child's rusage.
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            peak = max(peak, _tree_rss(watched))
        except psutil.NoSuchProcess:
            pass
        if time.perf_counter() > deadline:
            proc.kill()
        time.sleep(0.05)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=10)
    peak = max(peak, usage.ru_maxrss * 1024)  # ru_maxrss is in KiB on Linux
    cpu = usage.ru_utime + usage.ru_stime
    return Measured(proc.returncode, wall, cpu, peak / 2**30, "".join(chunks))
