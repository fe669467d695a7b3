"""bench/gpu_check.sh: the MFU arithmetic, the skip and budget logic, the watched process,
and the `--cpu` run that CI can do (real training and serving of the demo model)."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402
from gpu_check import Check, Context, Machine  # noqa: E402

H200 = Machine(cuda=True, gpus=1, gpu_name="NVIDIA H200")


def test_mfu_is_six_flops_per_parameter_and_token_over_the_peak():
    # 20,000 tokens/s on 0.5B parameters: 6e13 FLOP/s, a 989 TFLOP/s H200 is 6.07% used
    assert gpu_check.mfu(20_000, 500_000_000, 989e12) == pytest.approx(6e13 / 989e12)
    assert gpu_check.mfu(20_000, 500_000_000, None) is None
    assert gpu_check.mfu(0.0, 500_000_000, 989e12) is None


def test_peak_flops_by_gpu_name():
    assert gpu_check.peak_flops("NVIDIA H200") == 989e12
    assert gpu_check.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_check.peak_flops("Some Future Accelerator") is None


def test_mfu_figures_read_the_parameter_count_from_the_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)))
    # per layer: q, k, v, o 64x64 and gate, up, down 64x128; tied 1000x64 embedding;
    # two norms per layer and the final one
    params = 2 * (4 * 64 * 64 + 3 * 64 * 128) + 1000 * 64 + 2 * 2 * 64 + 64
    figures = gpu_check.mfu_figures(tmp_path, 1000.0, H200)
    assert figures["params"] == params
    assert figures["mfu"] == pytest.approx(1000 * 6 * params / 989e12, abs=1e-4)
    unknown = gpu_check.mfu_figures(tmp_path, 1000.0, Machine(True, 1, "Mystery GPU"))
    assert "mfu" not in unknown and "Mystery GPU" in unknown["mfu_note"]


def test_every_row_uses_real_settings():
    from core import config as cfg
    from core import memory

    for check in gpu_check.CHECKS:
        if check.kind == "serve":  # flags of `tunebench serve`
            flags = dict(zip(check.overrides[::2], check.overrides[1::2]))
            assert set(flags) == {"--backend"}
            cfg.serve_config({"backend": flags["--backend"]})
            continue
        base = gpu_check.DEMO_RUN if check.model == "demo" else ()
        for pair in gpu_check.merged(base, check.overrides):
            key, _, value = pair.partition("=")
            assert key in cfg.FIELDS, (check.name, key)
            cfg.coerce(key, value)  # raises on a value the setting cannot take
    shape = memory.shape_of({**gpu_check.SHAPES["0.5b"], "vocab_size": 2048})
    assert 0.45e9 < memory.count_params(shape)[0] < 0.55e9  # "a 0.5B-parameter model"


def test_skip_reasons_name_what_is_missing():
    cuda_row = Check("x", "x", "gpu", needs=("cuda",), gpus=1)
    cpu = Machine(cuda=False, gpus=0, gpu_name="cpu", no_cuda="no CUDA device here")
    assert gpu_check.missing(cuda_row, cpu) == "needs CUDA: no CUDA device here"
    assert gpu_check.missing(cuda_row, H200) is None
    package = Check("x", "x", "gpu", needs=("cuda", "package:tunebench_no_such_package"))
    assert "tunebench_no_such_package package" in gpu_check.missing(package, H200)
    command = Check("x", "x", "gpu", needs=("command:tunebench-no-such-command",))
    assert "tunebench-no-such-command" in gpu_check.missing(command, H200)
    assert gpu_check.missing(Check("x", "x", "gpu", gpus=2), H200) == \
        "needs 2 GPU(s); 1 visible"


def test_no_row_starts_once_the_budget_is_spent(tmp_path):
    ctx = Context(Machine(False, 0, "cpu", "none"), tmp_path, cpu_mode=True, budget_s=0)
    rows = [c for c in gpu_check.CHECKS if c.mode == "cpu"]
    results = gpu_check.run_all(rows, ctx)
    assert [r.result for r in results] == ["skipped"] * len(rows)
    assert all("time budget" in r.reason for r in results)
    assert list(tmp_path.iterdir()) == []  # nothing was started


def test_a_row_past_its_timeout_is_stopped_with_its_children(tmp_path):
    watched = gpu_check.Watched(["bash", "-c", "sleep 60 & sleep 60"], {}, tmp_path / "out",
                                gpu=False)
    time.sleep(0.5)
    children = psutil.Process(watched.proc.pid).children(recursive=True)
    assert watched.wait(timeout=0.1) is None
    watched.close()
    assert children and not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE
                                for c in children)
    assert watched.peak and watched.peak > 0  # the tree's RSS was sampled


@pytest.mark.train
def test_failures_are_rows_with_the_cause(demo_model_path, tmp_path):
    ctx = Context(Machine(False, 0, "cpu", "none"), tmp_path, cpu_mode=True, budget_s=300)
    # the vLLM backend, forced past its skip: core refuses it on this machine, and says why
    refused = gpu_check.run_check(Check("vllm-here", "x", "cpu", ("--backend", "vllm"),
                                        kind="serve", timeout_s=60), ctx)
    assert refused.result == "failed" and "exited" in refused.reason
    assert "vllm" in refused.reason.split("its last output:")[1].lower(), refused.reason
    slow = gpu_check.run_check(Check("slow", "x", "cpu", ("compute_type=fp32",),
                                     timeout_s=1), ctx)
    assert slow.result == "failed" and slow.reason == "still running after 1 s (stopped)"


@pytest.mark.train
def test_cpu_mode_runs_the_cpu_rows_and_skips_the_gpu_rows(demo_model_path, tmp_path):
    out = tmp_path / "gpu-check.json"
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu", "--out",
                           str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    rows = {r["name"]: r for r in record["rows"]}
    assert record["mode"] == "cpu" and set(rows) == {c.name for c in gpu_check.CHECKS}
    for name in ("cpu-fp32", "cpu-bf16", "config-model-tiny"):
        row, figures = rows[name], rows[name]["figures"]
        assert row["result"] == "passed", row
        assert figures["steps"] == 4 and figures["steps_per_s"] > 0
        assert figures["tokens_per_s"] > 0 and figures["peak_rss_mib"] > 100
        assert math.isfinite(figures["final_loss"])
    tiny = rows["config-model-tiny"]["figures"]
    assert tiny["model_tflops"] == pytest.approx(tiny["tokens_per_s"] * 6 * tiny["params"]
                                                 / 1e12, abs=1e-3)
    assert "mfu" not in tiny and "CPU" in tiny["mfu_note"]
    serve = rows["cpu-serve"]
    assert serve["result"] == "passed" and serve["figures"]["reply"].strip(), serve
    for check in gpu_check.CHECKS:
        if check.mode == "gpu":
            assert rows[check.name]["result"] == "skipped"
            assert rows[check.name]["reason"].startswith("needs CUDA"), rows[check.name]
    table = done.stdout
    assert "| check | result | steps/s | tokens/s | peak memory |" in table
    assert "| cpu-fp32 | passed |" in table and "| vllm-serve | skipped |" in table
    assert record["total_s"] < record["budget_s"]
