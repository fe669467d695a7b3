"""core/serve_launch.py: the page's way to run `tunebench serve` in the background."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from core import runs, serve_launch
from core.errors import BadInput


def test_adapter_names_come_from_the_run_folder():
    assert serve_launch.adapter_name("saves/identity/final") == "identity"
    assert serve_launch.adapter_name("saves/identity/checkpoint-40") == "identity-ckpt-40"
    assert serve_launch.adapter_name("saves/my run!/final") == "my-run-"
    assert serve_launch.adapter_name("saves/.x/final") == "x"
    picked = serve_launch.adapter_names(["a/identity/final", "b/identity/final"])
    assert list(picked) == ["identity", "identity-2"]


def test_the_serve_folder_is_hidden_from_the_runs_list(tmp_path):
    folder = serve_launch.job_dir(tmp_path)
    folder.mkdir()
    runs.write_status(folder, "completed", kind="serve")
    assert runs.run_dirs(tmp_path) == []
    assert runs.loadable_checkpoints(tmp_path) == []


def test_adapters_outside_the_allowed_folders_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInput, match="outside the allowed folders"):
        serve_launch.start_server("demo", {"x": "/etc"}, tmp_path / "saves")
    with pytest.raises(BadInput, match="not valid"):
        serve_launch.start_server("demo", {"bad name": str(tmp_path)}, tmp_path / "saves")
    assert serve_launch.find_server(tmp_path / "saves") is None


def test_start_find_refuse_and_stop(tmp_path, demo_model_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saves = tmp_path / "saves"
    folder = serve_launch.start_server(str(demo_model_path), {}, saves)
    try:
        assert folder == saves / ".serve"
        first = serve_launch.find_server(saves)
        assert first and first["kind"] == "serve" and first["state"] == "running"
        status = serve_launch.wait_answering(saves, timeout=40)
        url = status["url"]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        assert status["models"] == [demo_model_path.name] or status["models"]
        with urllib.request.urlopen(url + "/models", timeout=5) as reply:
            ids = [m["id"] for m in json.load(reply)["data"]]
        assert ids == status["models"]
        with pytest.raises(BadInput, match=url.replace(".", r"\.")):
            serve_launch.start_server(str(demo_model_path), {}, saves)
    finally:
        final = serve_launch.stop_server(saves)
    assert final["state"] == "completed"
    assert serve_launch.find_server(saves) is None
    assert not serve_launch.answering(final)
    assert runs.read_status(folder)["state"] == "completed"
    assert final["url"] == url and "serve" in (folder / runs.COMMAND).read_text()


def _model_ids(url: str) -> list[str]:
    with urllib.request.urlopen(url + "/models", timeout=5) as reply:
        return [m["id"] for m in json.load(reply)["data"]]


def test_adapters_change_on_a_running_server(tmp_path, demo_model_path: Path, monkeypatch):
    """The page's Apply: the running server serves the adapters picked now, added and
    removed through its API while the base stays loaded (the same process answers)."""
    from test_multi_lora import _adapter
    monkeypatch.chdir(tmp_path)
    saves = tmp_path / "saves"
    alpha, beta = (_adapter(demo_model_path, saves / name / "final", r=4, lora_alpha=8,
                            target_modules=["q_proj", "v_proj"]) for name in ("alpha", "beta"))
    with pytest.raises(BadInput, match="no API server is answering"):
        serve_launch.apply_adapters(saves, {"alpha": alpha})
    serve_launch.start_server(str(demo_model_path), {"alpha": alpha}, saves)
    try:
        status = serve_launch.wait_answering(saves, timeout=40)
        url, base, pid = status["url"], status["models"][0], status["pid"]
        picked = serve_launch.adapter_names([alpha, beta])
        assert serve_launch.apply_adapters(saves, picked) == (["beta"], [])
        assert _model_ids(url) == [base, "alpha", "beta"]
        assert serve_launch.find_server(saves)["models"] == [base, "alpha", "beta"]
        assert serve_launch.apply_adapters(saves, {"beta": beta}) == ([], ["alpha"])
        assert _model_ids(url) == [base, "beta"]
        assert serve_launch.apply_adapters(saves, {"beta": beta}) == ([], [])
        # the same name from another folder: replaced
        assert serve_launch.apply_adapters(saves, {"beta": alpha}) == (["beta"], ["beta"])
        assert serve_launch.find_server(saves)["adapters"] == {"beta": alpha}
        with pytest.raises(BadInput, match="outside the allowed folders"):
            serve_launch.apply_adapters(saves, {"x": "/etc"})
        (saves / "empty" / "final").mkdir(parents=True)
        with pytest.raises(BadInput, match="refused adapter 'empty': .*not a checkpoint"):
            serve_launch.apply_adapters(saves, {"beta": alpha,
                                                "empty": str(saves / "empty" / "final")})
        # all or nothing: a refused pick that also adds, replaces and removes changes nothing
        assert serve_launch.apply_adapters(saves, {"beta": alpha, "gamma": beta}) == \
            (["gamma"], [])
        with pytest.raises(BadInput, match="refused adapter 'empty'"):
            serve_launch.apply_adapters(saves, {"beta": beta, "delta": alpha,
                                                "empty": str(saves / "empty" / "final")})
        assert _model_ids(url) == [base, "beta", "gamma"]
        with pytest.raises(BadInput, match="refused adapter 'beta'"):  # a refused replacement
            serve_launch.apply_adapters(saves, {"beta": str(saves / "empty" / "final")})
        assert sorted(_model_ids(url)) == sorted([base, "beta", "gamma"])
        assert serve_launch.find_server(saves)["adapters"] == {"beta": alpha, "gamma": beta}
        body = json.dumps({"model": "beta", "prompt": "Hello", "max_tokens": 3}).encode()
        request = urllib.request.Request(url + "/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert json.load(reply)["usage"]["completion_tokens"] >= 1
        assert serve_launch.find_server(saves)["pid"] == pid  # never restarted
    finally:
        serve_launch.stop_server(saves)
