"""Generation and export settings: declared once, in core/config.py, and the Chat and
Export tabs, `tunebench chat`/`tunebench export` and YAML all built from that declaration.

A round trip (form -> YAML -> config -> flags -> config) proves that nothing is lost."""

from __future__ import annotations

import dataclasses

import gradio as gr
import pytest
import yaml

from core import cli
from core import config as cfg
from core import schema
from core.errors import BadInput
from webui import form

NON_DEFAULT = {
    cfg.GenConfig: cfg.GenConfig(system="Answer briefly.\nUse English.", temperature=0.7,
                                 top_p=0.9, top_k=40, max_new_tokens=77,
                                 repetition_penalty=1.15, seed=7),
    cfg.ExportConfig: cfg.ExportConfig(format="bnb-8bit", gguf_type="q4_k_m", shard_size="300MB",
                                      dtype="bf16"),
}
BUILD = {cfg.GenConfig: cfg.gen_config, cfg.ExportConfig: cfg.export_config}
COMMAND = {cfg.GenConfig: ["chat", "--model", "demo"],
           cfg.ExportConfig: ["export", "--model", "demo", "--out", "x"]}


@pytest.mark.parametrize("settings", [cfg.GenConfig, cfg.ExportConfig], ids=lambda s: s.__name__)
def test_every_setting_round_trips_form_yaml_config_and_flags(settings):
    original = NON_DEFAULT[settings]
    assert all(getattr(original, f.name) != schema.default_value(settings, f.name)
               for f in dataclasses.fields(settings) if f.name != "format")  # all exercised
    with gr.Blocks():
        built = form.build_settings(settings, original, "t")
    from_form = form.settings_of(settings, built.names, [w.value for w in built.components],
                                 "the form")
    assert from_form == original
    from_yaml = BUILD[settings](yaml.safe_load(schema.to_yaml(from_form)))
    assert from_yaml == original
    argv = list(COMMAND[settings])
    for name, value in schema.to_dict(from_yaml).items():
        argv += [schema.fields(settings)[name].metadata["flag"], str(value)]
    args = cli.build_parser().parse_args(argv)
    assert BUILD[settings](schema.from_flags(args, settings)) == original


def test_the_tabs_take_their_widgets_from_the_schemas():
    from webui import chat_tab, export_tab
    with gr.Blocks():
        with gr.Tab("Chat"):
            chat = chat_tab.ChatTab("saves")
        with gr.Tab("Export"):
            export = export_tab.ExportTab("saves")
    assert chat.gen.names == list(schema.fields(cfg.GenConfig))
    assert export.settings.names == list(schema.fields(cfg.ExportConfig))
    ids = [w.elem_id for w in export.settings.components]
    assert {"export-shard-size", "export-dtype", "export-format"} <= set(ids)  # SPEC ids


def test_bad_generation_settings_name_the_field():
    with pytest.raises(BadInput, match="temperature: must be at most 2"):
        cfg.gen_config({"temperature": 5})
    with pytest.raises(BadInput, match="shard_size"):
        cfg.export_config({"shard_size": "lots"})
    with pytest.raises(BadInput, match="system"):
        cfg.gen_config({"system": "x" * 200_000})


def test_unset_flags_keep_the_defaults():
    args = cli.build_parser().parse_args(["chat", "--model", "demo", "--temperature", "0.5"])
    assert cfg.gen_config(schema.from_flags(args, cfg.GenConfig)) == cfg.GenConfig(
        temperature=0.5)
