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
