"""Confinement of UI paths to the allowed roots."""

import os

import pytest

from core import paths
from core.errors import BadInput


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "saves" / "run" / "final").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(paths.ENV_ROOTS, raising=False)
    return tmp_path


def test_paths_inside_roots_are_allowed(project):
    assert paths.confine("saves/run/final") == project / "saves" / "run" / "final"
    assert paths.confine(str(project / "data" / "new.json")) == project / "data" / "new.json"


@pytest.mark.parametrize("raw", ["../etc/passwd", "/etc/passwd", "saves/../../outside",
                                 "data/../pyproject.toml", "~/.ssh/id_rsa", ""])
def test_escapes_are_refused(project, raw):
    with pytest.raises(BadInput):
        paths.confine(raw)


def test_symlink_out_of_a_root_is_refused(project, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    os.symlink(outside, project / "saves" / "sneaky")
    with pytest.raises(BadInput, match="outside the allowed folders"):
        paths.confine("saves/sneaky/model")


def test_extra_roots_from_the_environment(project, tmp_path_factory, monkeypatch):
    extra = tmp_path_factory.mktemp("models")
    with pytest.raises(BadInput):
        paths.confine(str(extra))
    monkeypatch.setenv(paths.ENV_ROOTS, str(extra))
    assert paths.confine(str(extra)) == extra.resolve()


def test_models_may_be_demo_or_hub_ids(project):
    assert paths.confine_model("demo") == "demo"
    assert paths.confine_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert paths.confine_model("saves/run/final") == str(project / "saves" / "run" / "final")
    with pytest.raises(BadInput):
        paths.confine_model("/etc")
    with pytest.raises(BadInput, match="does not exist"):
        paths.confine_model("saves/missing/model")
