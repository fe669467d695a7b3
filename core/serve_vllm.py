"""`tunebench serve --backend vllm`: hand the same models to vLLM's own OpenAI server.

vLLM serves LoRA adapters under names given as `--lora-modules NAME=PATH`, the same names
tunebench uses, and reads its API key from VLLM_API_KEY (so it stays out of `ps` here too).
Nothing falls back silently: without vLLM or a GPU the command is refused and says why.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from . import config as cfg
from . import models
from .errors import BadInput


def vllm_argv(model: str, adapters: dict[str, str], settings: cfg.ServeConfig) -> list[str]:
    """The `vllm serve` command line for the base and its adapters."""
    argv = ["vllm", "serve", models.resolve_model(model), "--host", settings.host,
            "--port", str(settings.port), "--served-model-name", model]
    if adapters:
        ranks = [_rank(Path(p)) for p in adapters.values()]
        argv += ["--enable-lora", "--max-loras", str(len(adapters)),
                 "--max-lora-rank", str(max(ranks)), "--lora-modules",
                 *[f"{n}={Path(p).expanduser().resolve()}" for n, p in adapters.items()]]
    return argv


def _rank(folder: Path) -> int:
    import json
    try:
        return int(json.loads((folder / "adapter_config.json").read_text())["r"])
    except (OSError, ValueError, KeyError):
        raise BadInput("not a LoRA adapter folder (no readable adapter_config.json)",
                       file=str(folder)) from None


def exec_vllm(model: str, adapters: dict[str, str], settings: cfg.ServeConfig,
              api_key: str | None) -> int:
    """Replace this process with vLLM's server (refused, with the reason, when it can't)."""
    if importlib.util.find_spec("vllm") is None or shutil.which("vllm") is None:
        raise BadInput("--backend vllm needs vLLM, which is not installed: pip install "
                       "'tunebench[vllm]' (on a machine with an NVIDIA GPU), or use the default "
                       "backend (transformers)", field="--backend")
    import torch
    if not torch.cuda.is_available():
        raise BadInput("--backend vllm needs a CUDA GPU and none is visible; use the default "
                       "backend (transformers), which also runs on CPU", field="--backend")
    argv = vllm_argv(model, adapters, settings)
    env = dict(os.environ)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    print("starting: " + " ".join(argv), flush=True)
    os.execvpe(argv[0], argv, env)
    return 1  # not reached
