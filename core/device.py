"""What accelerator this machine has, found without importing torch.

The web UI validates forms and estimates memory with this, and it must stay
light: importing torch costs seconds and hundreds of MB in the page server.
The trainer confirms the same facts with torch once it runs.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from dataclasses import dataclass

import psutil

from .i18n import t


@dataclass(frozen=True)
class Device:
    kind: str                # "cuda" or "cpu"
    name: str
    count: int
    memory_gb: float         # per device
    bf16: bool

    def describe(self) -> str:
        if self.kind == "cpu":
            return t("config.device.cpu", cores=psutil.cpu_count(),
                     gb=f"{self.memory_gb:.0f}")
        return t("config.device.gpus", count=self.count, name=self.name,
                 gb=f"{self.memory_gb:.0f}")


@functools.lru_cache(maxsize=1)
def detect() -> Device:
    gpus = _nvidia_gpus()
    if gpus:
        name, mem_gb, cap = gpus[0]
        return Device("cuda", name, len(gpus), mem_gb, bf16=cap >= 8.0)
    ram_gb = psutil.virtual_memory().total / 2**30
    return Device("cpu", "cpu", 1, ram_gb, bf16=False)


def _nvidia_gpus() -> list[tuple[str, float, float]]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, mem_mib, cap = (part.strip() for part in line.split(","))
        gpus.append((name, float(mem_mib) / 1024, float(cap)))
    return gpus
