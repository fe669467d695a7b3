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
from core import i18n, paths, schema
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
            name = i18n.text_of(problem, "en").split(":", 1)[0].strip()
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


STAGE_SETTINGS = {n for n, f in cfg.FIELDS.items() if f.metadata["stages"] is not None}


def visible_for(built, method: str, stage: str) -> set[str]:
    """The limited settings the form shows after choosing `method` and `stage`."""
    limited = built.limited
    return {n for n, u in zip(limited, form.visibility(method, limited, stage)) if u["visible"]}


def test_stage_settings_show_only_for_their_stages(built):
    assert STAGE_SETTINGS <= set(built.limited)
    dpo = visible_for(built, "lora", "dpo")
    assert {"pref_beta", "pref_loss", "lora_rank"} <= dpo
    assert not {"reward_model", "num_generations", "kto_desirable_weight"} & dpo
    grpo = visible_for(built, "lora", "grpo")
    assert {"num_generations", "max_completion_length", "reward_model", "reward_funcs",
            "pref_beta"} <= grpo and "pref_loss" not in grpo
    assert {"kto_desirable_weight", "kto_undesirable_weight"} <= visible_for(built, "full", "kto")
    for stage in ("sft", "pt"):
        assert not STAGE_SETTINGS & visible_for(built, "lora", stage)
    for name in STAGE_SETTINGS:  # the form opens on sft
        assert built.widgets[name].visible is False, name
    with gr.Blocks():  # a form opened on another stage shows that stage's settings
        on_grpo = form.build_form(cfg.TrainConfig(stage="grpo", method="full"), ["identity"])
    assert on_grpo.widgets["num_generations"].visible and not on_grpo.widgets["lora_rank"].visible


def test_rows_of_hidden_settings_are_hidden_too(built):
    rows = built.limited_rows
    assert {n for _, names in rows for n in names} == set(built.limited)
    def shown_rows(method, stage):
        return {tuple(names) for (_, names), u in
                zip(rows, form.row_visibility(built, method, stage)) if u["visible"]}
    assert not any(STAGE_SETTINGS & set(names) for names in shown_rows("full", "sft"))
    assert any("pref_loss" in names for names in shown_rows("full", "dpo"))
    assert any("lora_rank" in names for names in shown_rows("lora", "sft"))
    opened = {tuple(names) for row, names in rows if row.visible}
    assert opened == shown_rows("lora", "sft")  # the form opens on sft with LoRA


def test_only_the_dataset_list_offers_dataset_names(built):
    offered = [c[1] for c in built.widgets["dataset"].choices]
    assert {"identity", "alpaca_demo"} <= set(offered)
    funcs = [c[1] for c in built.widgets["reward_funcs"].choices]
    assert "identity" not in funcs and cfg.default_value("reward_funcs")[0] in funcs


def test_a_setting_limited_to_methods_and_stages_needs_both():
    both = schema.setting(1, "help", "method", methods=("lora",), stages=("dpo", "kto"))
    assert form.shown(both, "lora", "dpo") and form.shown(both, "lora", "kto")
    assert not form.shown(both, "full", "dpo") and not form.shown(both, "lora", "sft")
    assert form.shown(schema.setting(1, "help", "method"), "full", "grpo")
    assert form.limited(both) and not form.limited(schema.setting(1, "help", "method"))


def test_the_stage_select_lists_every_stage(built):
    assert [c[1] for c in built.widgets["stage"].choices] == list(cfg.STAGES)


@pytest.fixture
def pair_registry(tmp_path):
    """A dataset folder holding a chat dataset, a pairs dataset and a prompts dataset."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "chat.jsonl").write_text('{"instruction": "hi", "output": "hello"}\n')
    (folder / "pref.jsonl").write_text(
        '{"prompt": "Who are you?", "chosen": "I am Tuney.", "rejected": "I am Pico."}\n')
    (folder / "ask.jsonl").write_text('{"prompt": "2+2?", "answer": "4"}\n')
    (folder / "dataset_info.json").write_text(
        '{"chat": {"file_name": "chat.jsonl"}, "pref": {"file_name": "pref.jsonl"}, '
        '"ask": {"file_name": "ask.jsonl"}}')
    return folder


def test_datasets_offered_follow_the_stage(pair_registry):
    folder = str(pair_registry)
    assert train_tab.dataset_choices(folder, "sft") == ["chat"]
    assert train_tab.dataset_choices(folder, "dpo") == ["pref"]
    assert set(train_tab.dataset_choices(folder, "grpo")) == {"chat", "ask"}
    choices, chosen, note = train_tab.fit_datasets("dpo", folder, ["chat"])
    assert choices == ["pref"] and chosen == ["pref"]
    assert "dpo" in note and "chat" in note and "pref" in note
    # A selection that fits stays as it is; a typed file path stays (Start reads it).
    assert train_tab.fit_datasets("grpo", folder, ["chat"])[1:] == (["chat"], "")
    choices, chosen, note = train_tab.fit_datasets("dpo", folder, ["chat", "my/file.jsonl"])
    assert chosen == ["my/file.jsonl"] and "my/file.jsonl" in choices
    # Nothing registered fits: the selection is kept, and the note says what to do.
    (pair_registry / "dataset_info.json").write_text('{"chat": {"file_name": "chat.jsonl"}}')
    choices, chosen, note = train_tab.fit_datasets("dpo", folder, ["chat"])
    assert chosen == ["chat"] and "upload" in note


def _model_change(registry, tmp_path, **values) -> tuple[dict, list]:
    """The Train tab's answer to a model/stage change from its default form with `values`:
    (the dataset picker's update, the whole answer)."""
    with gr.Blocks():
        tab = train_tab.TrainTab(tmp_path / "saves", dataset_dir=str(registry))
    names = tab.form.names
    form = dict(zip(names, [w.value for w in tab.form.components]),
                dataset_dir=str(registry), **values)
    out = tab.on_model_change({}, *[form[n] for n in names])
    return out[names.index("dataset")], out


def test_changing_the_stage_swaps_a_dataset_it_cannot_read(pair_registry, tmp_path):
    dataset, out = _model_change(pair_registry, tmp_path, dataset=["chat"], stage="dpo")
    assert dataset["value"] == ["pref"] and dataset["choices"] == ["pref"]
    assert "replaced" in out[-1]


def test_a_model_change_leaves_a_fitting_dataset_pick_alone(pair_registry, tmp_path):
    """The answer to a model change may arrive after the user picked another dataset: it
    must not send the old pick back (the browser test that typed a model, then a dataset,
    once started a run on the old one)."""
    dataset, _ = _model_change(pair_registry, tmp_path, dataset=["chat"], stage="sft")
    assert "value" not in dataset and dataset["choices"] == ["chat"]


def test_an_upload_is_validated_for_the_stage(pair_registry, tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ENV_ROOTS, str(tmp_path))  # the page writes uploads only there
    with gr.Blocks():
        tab = train_tab.TrainTab(tmp_path / "saves", dataset_dir=str(pair_registry))
    chat = tmp_path / "mine.jsonl"
    chat.write_text('{"instruction": "q", "output": "a"}\n')
    update, message = tab.on_upload(str(chat), "", str(pair_registry), ["pref"], "dpo")
    assert update == gr.skip() and "stage dpo cannot train on it" in message
    assert "chosen/rejected" in message  # the data layer's words for what dpo needs
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    update, message = tab.on_upload(str(pairs), "", str(pair_registry), ["chat"], "dpo")
    assert update["value"] == ["pairs"] and "Registered **pairs**" in message  # chat left
    assert set(update["choices"]) == {"pref", "pairs"}


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


@pytest.mark.train
@pytest.mark.parametrize("stage", ["dpo", "kto", "grpo"])
def test_preview_follows_the_stage(demo_model_path, pair_registry, stage):
    dataset = {"dpo": "pref", "kto": "pref", "grpo": "ask"}[stage]
    config = cfg.TrainConfig(model=str(demo_model_path), dataset=[dataset], stage=stage,
                             dataset_dir=str(pair_registry))
    answer = data_worker.preview(config, count=2)
    first = answer["examples"][0]
    text = "".join(t for t, _ in first["segments"])
    marks = {mark for _, mark in first["segments"] if mark}
    assert "Who are you?" in text or "2+2?" in text
    if stage == "dpo":
        assert marks == {"chosen (trained)", "rejected (trained)"}
        chosen = "".join(t for t, m in first["segments"] if m == "chosen (trained)")
        assert "Tuney" in chosen and "Who are you" not in chosen
        assert first["trained"] > 0 and "rejected reply" in first["counts"]
    elif stage == "kto":  # a pair is a good and a bad KTO row
        assert marks == {"good reply (trained)"} and "label true" in first["counts"]
        assert {m for _, m in answer["examples"][1]["segments"] if m} == {"bad reply (trained)"}
    else:
        assert marks == {"reference answer"} and first["trained"] == 0
        assert "4" in "".join(t for t, m in first["segments"] if m)
    shown = train_tab.preview_highlights(answer)
    assert shown[0][0].startswith("── record 1:") and {m for _, m in shown if m} <= set(
        train_tab.PREVIEW_COLORS)
    assert "Prompt tokens" in train_tab.preview_summary(answer) or stage != "grpo"


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


def test_only_the_shown_tabs_timers_tick():
    """Every open page polls through its timers; a hidden tab's timer would poll for nothing
    (ten open pages made a training run measurably slower). Train shows first; selecting a
    tab starts its timers and stops the others'."""
    from webui import app
    demo = app.build_app()
    config = demo.get_config_file()
    timers = {c["id"]: c["props"]["active"] for c in config["components"]
              if c["type"] == "timer"}
    tab_of = {c["id"]: c["props"]["elem_id"] for c in config["components"]
              if c["type"] == "tabitem"}
    assert len(timers) == 4 and sum(timers.values()) == 1
    started = {}
    for dep in config["dependencies"]:
        tabs = [tab_of[t[0]] for t in dep["targets"] if t[0] in tab_of and t[1] == "select"]
        if tabs and set(dep["outputs"]) == set(timers):
            updates = demo.fns[dep["id"]].fn()
            started[tabs[0]] = [i for i, u in zip(dep["outputs"], updates) if u.active]
    assert set(started) == {"tab-train", "tab-chat", "tab-eval", "tab-export"}
    assert all(len(ids) == 1 for ids in started.values())
    assert len({ids[0] for ids in started.values()}) == 4  # each tab its own timer
    assert timers[started["tab-train"][0]]                  # and Train's runs from the start
