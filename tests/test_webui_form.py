"""The Train tab's form is generated from core.config and loses nothing on the way to YAML."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import gradio as gr
import pytest

from core import config as cfg
from core.errors import BadInput
from webui import configs, data_worker, form, train_tab

REPO = Path(__file__).resolve().parent.parent
SPEC_IDS = ["train-model", "train-dataset", "train-method", "train-epochs", "train-lr",
            "train-output", "identity-name", "identity-author"]
TYPES = typing.get_type_hints(cfg.TrainConfig)


@pytest.fixture(scope="module")
def built():
    with gr.Blocks():
        built = form.build_form(cfg.TrainConfig(), ["identity", "alpaca_demo"])
    return built


def other_value(f: dataclasses.Field):
    """A valid value different from the default, for every field (so each one is exercised)."""
    meta, default, kind = f.metadata, cfg.default_value(f.name), TYPES[f.name]
    if meta["choices"] is not None:
        return next(c for c in meta["choices"] if c != default)
    if kind is bool:
        return not default
    if kind == (bool | str):
        return True
    if kind == list[str]:
        return ["identity", "alpaca_demo"]
    if kind in (int, float):
        hi = meta["max"] if meta["max"] is not None else default + 10
        value = (default + hi) / 2 if kind is float else int(default + 1)
        return min(value, hi)
    return f"some-{f.name}"


def non_default_config() -> cfg.TrainConfig:
    """Every field off its default, except those a cross-field rule refuses on this machine."""
    values = {name: other_value(f) for name, f in cfg.FIELDS.items()}
    values.update(resume=False, lora_target="q_proj,v_proj", run_name="a-run")
    for _ in range(len(values)):
        problems = cfg.validate(cfg.TrainConfig(**values))
        if not problems:
            return cfg.TrainConfig(**values)
        for problem in problems:  # "field: why" -> put that field back to its default
            name = problem.split(":", 1)[0].strip()
            values[name] = cfg.default_value(name)
    raise AssertionError(f"could not build a valid config: {problems}")


def test_every_field_has_one_widget_with_its_elem_id(built):
    assert built.names == list(cfg.FIELDS)
    ids = [w.elem_id for w in built.components]
    assert len(set(ids)) == len(ids)
    assert set(SPEC_IDS) <= set(ids)
    assert built.widgets["learning_rate"].elem_id == "train-lr"
    assert built.widgets["lora_rank"].elem_id == "train-lora-rank"


def test_widget_kinds_follow_the_schema(built):
    for name, widget in built.widgets.items():
        meta, kind = cfg.FIELDS[name].metadata, TYPES[name]
        if kind == list[str]:
            assert isinstance(widget, gr.Dropdown) and widget.multiselect
        elif meta["choices"] is not None:
            assert isinstance(widget, gr.Dropdown) and not widget.multiselect
            assert [c[1] for c in widget.choices] == list(meta["choices"])
        elif kind is bool:
            assert isinstance(widget, gr.Checkbox)
        elif kind in (int, float):
            assert isinstance(widget, (gr.Number, gr.Slider)), name
        else:
            assert isinstance(widget, gr.Textbox), name
        assert cfg.FIELDS[name].metadata["help"] in widget.info


def test_defaults_on_the_form_are_the_schema_defaults(built):
    values = [w.value for w in built.components]
    assert form.to_config(built.names, values) == cfg.TrainConfig()


@pytest.mark.parametrize("make", [cfg.TrainConfig, non_default_config], ids=["defaults", "all"])
def test_form_to_yaml_to_config_loses_nothing(tmp_path, built, make):
    config = make()
    if make is non_default_config:
        changed = cfg.changed(config)
        assert len(changed) >= len(cfg.FIELDS) - 6, f"too few fields exercised: {changed}"
    values = form.values_of(config, built.names)          # what the form shows
    from_form = form.to_config(built.names, values)       # what Start reads back
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml(from_form))
    assert cfg.load(path) == from_form == config


def test_saved_config_loads_back_into_the_same_form_values(tmp_path, built):
    config = non_default_config()
    path = configs.save(config, "mine", tmp_path)
    assert path == tmp_path / "configs" / "mine.yaml"
    assert str(path) in configs.available(tmp_path)
    loaded = configs.load(path, configs.available(tmp_path))
    assert form.values_of(loaded, built.names) == form.values_of(config, built.names)
    with pytest.raises(BadInput, match="not one of the listed"):
        configs.load(tmp_path / "elsewhere.yaml", configs.available(tmp_path))
    with pytest.raises(BadInput, match="config name"):
        configs.save(config, "../escape", tmp_path)


def test_bad_values_are_all_reported_with_field_names(built):
    values = dict(zip(built.names, [w.value for w in built.components]))
    values.update(lora_rank=0, epochs=None, dataset=[], learning_rate=5)
    with pytest.raises(BadInput) as err:
        form.to_config(built.names, list(values.values()))
    text = str(err.value)
    for expected in ("lora_rank: must be at least 1", "epochs:", "dataset:",
                     "learning_rate: must be at most 1"):
        assert expected in text


def test_method_settings_show_only_for_their_methods(built):
    limited = built.method_limited
    assert {"lora_rank", "quant_bits", "freeze_layers"} <= set(limited)
    shown = dict(zip(limited, form.visibility("freeze", limited)))
    assert shown["freeze_layers"]["visible"] and not shown["lora_rank"]["visible"]
    assert built.widgets["quant_bits"].visible is False  # the default method is lora


def test_command_box_is_a_runnable_snippet(tmp_path):
    text = train_tab.command_text(cfg.TrainConfig(run_name="x"), tmp_path)
    assert text.splitlines()[-1] == f"tunebench train {tmp_path / 'x' / 'config.yaml'}"
    script = tmp_path / "snippet.sh"
    script.write_text(text.replace("tunebench train", "true"))
    subprocess.run(["bash", str(script)], check=True)
    assert cfg.load(tmp_path / "x" / "config.yaml").output_dir == str(tmp_path / "x")


def test_the_page_server_imports_no_torch():
    code = ("import sys, webui.app as a; a.build_app(); "
            "bad = [m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.train
def test_preview_marks_the_trained_tokens(demo_model_path):
    config = cfg.TrainConfig(model=str(demo_model_path), dataset=["identity"],
                             dataset_dir=str(REPO / "data"), identity_name="Zorblax")
    answer = data_worker.preview(config, count=2)
    assert len(answer["examples"]) == 2
    first = answer["examples"][0]
    trained = "".join(text for text, is_trained in first["segments"] if is_trained)
    untrained = "".join(text for text, is_trained in first["segments"] if not is_trained)
    assert 0 < first["trained"] < first["tokens"]
    assert trained and untrained and "{{name}}" not in trained + untrained
    assert answer["summary"]["records"] > 10 and answer["summary"]["max"] >= first["tokens"]
    shown = train_tab.preview_highlights(answer)
    assert any(label == "trained" for _, label in shown)


def test_preview_reports_bad_input_without_a_traceback(tmp_path):
    config = cfg.TrainConfig(dataset=[str(tmp_path / "missing.jsonl")])
    with pytest.raises(BadInput, match="missing.jsonl"):
        data_worker.preview(config)


def test_exposing_the_app_requires_a_login(monkeypatch):
    from webui import app
    monkeypatch.delenv(app.AUTH_ENV, raising=False)
    assert app.parse_auth(None, "127.0.0.1", share=False) is None
    for host, share in (("0.0.0.0", False), ("127.0.0.1", True)):
        with pytest.raises(BadInput, match="--auth"):
            app.parse_auth(None, host, share)
    assert app.parse_auth("ann:s3cret", "0.0.0.0", share=False) == ("ann", "s3cret")
    monkeypatch.setenv(app.AUTH_ENV, "bob:pw")
    assert app.parse_auth(None, "0.0.0.0", share=True) == ("bob", "pw")
    with pytest.raises(BadInput, match="USER:PASS"):
        app.parse_auth("nopassword", "127.0.0.1", share=False)
