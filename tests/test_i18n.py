"""The catalogues (core/locales): complete in each language, parameters that match, and
messages that survive status.json in a language-neutral form."""

import json
import string

import pytest

from core import config as cfg, i18n, schema
from core.errors import BadInput, Problems
from core.i18n import msg


def fields_of(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def in_scope(key: str, lang: str) -> bool:
    covered = i18n.scope(lang)
    return covered is None or any(key == p or key.startswith(p) for p in covered)


LANGS = [lang for lang in i18n.languages() if lang != i18n.ENGLISH]


def test_there_is_chinese_and_a_third_language():
    assert {"en", "zh", "ja"} <= set(i18n.languages())
    assert i18n.scope("zh") is None  # complete


@pytest.mark.parametrize("lang", LANGS)
def test_each_english_id_is_translated(lang):
    english, other = i18n.catalogue("en"), i18n.catalogue(lang)
    missing = sorted(k for k in english if in_scope(k, lang) and k not in other)
    assert not missing, f"{lang} lacks {len(missing)} ids, such as {missing[:10]}"
    extra = sorted(k for k in other if k not in english)
    assert not extra, f"{lang} has ids English does not: {extra[:10]}"


@pytest.mark.parametrize("lang", LANGS)
def test_translations_take_the_same_parameters(lang):
    english, other = i18n.catalogue("en"), i18n.catalogue(lang)
    wrong = [k for k in other if k in english and fields_of(other[k]) != fields_of(english[k])]
    assert not wrong, f"{lang}: parameters differ from English in {wrong[:10]}"


def test_every_setting_has_a_label_and_help_in_english():
    english = i18n.catalogue("en")
    for short, settings in cfg.SCHEMAS.items():
        for name in schema.fields(settings):
            assert english[f"field.{short}.{name}.label"]
            assert english[f"field.{short}.{name}.help"]


def test_a_message_renders_in_each_language_and_survives_its_record():
    err = BadInput(msg("where.field", field="rank"), file="data/x.json", record=3, field="output")
    assert err.text("en") == "data/x.json, record 3, field 'output': field 'rank'"
    assert "第 3 条记录" in err.text("zh") and "字段“output”" in err.text("zh")
    again = BadInput.from_record(err.record_of())
    assert again.text("zh") == err.text("zh") and again.text("en") == err.text("en")


def test_several_problems_keep_one_per_line_in_each_language():
    err = Problems([msg("where.record", record=1), "plain text"], file="a.yaml")
    assert err.text("en") == "a.yaml: \n  - record 1\n  - plain text"
    assert "第 1 条记录" in BadInput.from_record(err.record_of()).text("zh")


def test_the_language_comes_from_the_environment(monkeypatch):
    for name in ("TUNEBENCH_LANG", "LC_ALL", "LC_MESSAGES", "LANG"):
        monkeypatch.delenv(name, raising=False)
    assert i18n.current() == "en"
    monkeypatch.setenv("LANG", "zh_CN.UTF-8")
    assert i18n.current() == "zh"
    monkeypatch.setenv("TUNEBENCH_LANG", "en")
    assert i18n.current() == "en"
    assert i18n.supported("fr-FR") is None


class FakeRequest:
    def __init__(self, cookie=None, accept=""):
        self.cookies = {"tunebench_lang": cookie} if cookie else {}
        self.headers = {"accept-language": accept}


@pytest.mark.parametrize("cookie, accept, default, expected", [
    (None, "zh-CN,zh;q=0.9,en;q=0.8", None, "zh"),   # the first visit follows the browser
    (None, "fr-FR,ja;q=0.8", None, "ja"),
    (None, "fr-FR", None, "en"),
    ("en", "zh-CN", None, "en"),                     # the visitor's choice wins
    (None, "en-US", "zh", "zh"),                     # tunebench webui --lang zh
    ("ja", "en-US", "zh", "ja"),
])
def test_the_page_speaks_the_visitors_language(monkeypatch, cookie, accept, default, expected):
    from gradio.context import LocalContext

    from webui import i18n as page_i18n
    for name in ("TUNEBENCH_LANG", "LC_ALL", "LC_MESSAGES", "LANG"):
        monkeypatch.delenv(name, raising=False)
    page_i18n.install(default)
    token = LocalContext.request.set(FakeRequest(cookie, accept))
    try:
        assert i18n.current() == expected
        assert i18n.t("app.tab.train") == i18n.t("app.tab.train", expected)
    finally:
        LocalContext.request.reset(token)
        page_i18n.install(None)
        i18n.set_resolver(None)
    assert i18n.current() == "en"  # outside a page event: the environment's language


def test_the_bundled_font_holds_every_character_of_the_catalogues():
    """Chinese and Japanese render with webui/assets/tunebench-cjk.woff2 on a machine with
    no CJK font: a catalogue text with a character it lacks would show an empty box there
    (rebuild the font with scripts/make_cjk_font.py)."""
    from fontTools.ttLib import TTFont

    from webui import app
    held = set(map(chr, TTFont(app.ASSETS / "tunebench-cjk.woff2").getBestCmap()))
    for lang in LANGS:
        shown = {c for text in i18n.catalogue(lang).values() for c in text if ord(c) > 0x2E7F}
        assert not shown - held, f"{lang}: the font lacks {''.join(sorted(shown - held))}"


def test_a_switch_relabels_the_page_in_the_browser():
    """The switch's relabelling runs in the browser, from texts rendered once per language,
    not as a server event: Gradio's frontend then tracks a loading status for each output
    of an event and walks them all on every later event, and ~200 labelled components made
    every open tab's timer ticks cost several times more (a form edit, with five tabs
    watching a run, took 7-8 s to show instead of 2.5-3 s)."""
    from webui import app
    config = app.build_app().get_config_file()
    ids = {c["props"].get("elem_id"): c["id"] for c in config["components"]}
    tabs = {c["id"] for c in config["components"] if c["type"] == "tabitem"}
    on_switch = [d for d in config["dependencies"] if [ids["lang"], "change"] in
                 [list(t) for t in d["targets"]]]
    relabel = [d for d in on_switch if tabs <= set(d["outputs"])]
    assert len(relabel) == 1 and not relabel[0]["backend_fn"]
    for lang in i18n.languages():
        assert json.dumps(i18n.t("app.tab.train", lang), ensure_ascii=False) in relabel[0]["js"]
    assert not [d for d in config["dependencies"] if d["backend_fn"] and tabs & set(d["outputs"])]
    # The server's redraws (status, progress, tables) follow it, told the language.
    redraws = [d for d in config["dependencies"]
               if d["backend_fn"] and d.get("trigger_after") == relabel[0]["id"]]
    assert len(on_switch) == 1 and len(redraws) >= 5
