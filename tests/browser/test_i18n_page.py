"""The page in Chinese (and the Train tab in Japanese), in a real browser.

A visitor switches the language in the page header: the whole page changes at once, the
form keeps its values, the choice survives a reload. In Chinese, the identity fine-tune
runs from start to finish; its status, progress and a bad-data error read in Chinese; and
no tab shows an English word outside the names that stay as they are. Chinese renders
with the bundled CJK font (this machine has no CJK font installed), so every Chinese
character on the page must be one the font holds.
"""

from __future__ import annotations

import re
import subprocess

import pytest
from fontTools.ttLib import TTFont
from page_helpers import choose, fill, open_tab, shot, start_run, status_text, wait_until

from core import config as cfg
from core import i18n, schema
from webui import app

pytestmark = [pytest.mark.browser, pytest.mark.train]

# English words a Chinese page may show: names of things, units and formats, and data.
ALLOWED = {
    # names
    "tunebench", "lora", "qlora", "dora", "oft", "gguf", "yaml", "json", "jsonl", "csv",
    "parquet", "api", "gpu", "cpu", "cuda", "url", "http", "https", "trl", "peft", "vllm",
    "ollama", "llama", "cpp", "safetensors", "bitsandbytes", "deepspeed", "fsdp", "dpo", "kto",
    "grpo", "sft", "orpo", "simpo", "ema", "eta", "token", "tokens", "id", "ids", "curl",
    "python", "openai", "rslora", "pissa", "olora", "rope", "yarn", "hf", "hub", "ram",
    "vram", "bf", "fp", "int", "nf", "mb", "gb", "tb", "kb", "ms", "min", "rouge", "bleu",
    "em", "mmlu", "gsm", "hellaswag", "arc", "adamw", "sgd", "cosine", "linear", "constant",
    "tensorboard", "mlflow", "wandb", "swanlab", "slurm", "torchrun", "lm", "eval", "harness",
    "chatml", "qwen", "mistral", "alpaca", "auto", "demo", "identity", "tuney", "zed",
    "sharegpt", "openai", "utf", "xlsx", "bos", "eos", "pad", "moe", "flash", "attn", "sdpa",
    "liger", "unsloth", "kernels", "cuda", "mps", "xpu", "nccl", "gloo", "ipv", "localhost",
    "sigmoid", "ipo", "hinge", "exact", "match", "answer", "format", "length", "f", "ps",
    "lr", "pt", "rm", "full", "freeze", "none", "true", "false", "q", "k", "m", "s", "h",
    "alpha", "english",   # LoRA alpha; the language switch names each language in its own
    "transformers", "dtype", "bnb", "modelfile", "question",   # a library, a term, data columns
}
# Names of more than one word.
NAMES = ["Hugging Face", "LM Studio", "lm-evaluation-harness"]


def option_values() -> set[str]:
    """The settings' option values (a task, a format, a method): data, written as the user
    writes them in a config, in every language."""
    found = set()
    for settings in cfg.SCHEMAS.values():
        for f in schema.fields(settings).values():
            for choice in f.metadata.get("choices") or ():
                found.update(w.lower() for w in re.findall(r"[A-Za-z]+", str(choice)))
    return found - {"with", "default"}  # parts of values, and words a sentence would use
# Elements that show data (a config's YAML, a log, run names in a table), not page text.
DATA = ["#train-command", ".tb-log", "code", "pre", "input", "textarea",
        "[data-testid='textbox']", ".token", ".options", "#train-preview"]

WORDS_JS = """(skip) => {
  const out = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const node = walker.currentNode, el = node.parentElement;
    if (!el || !node.textContent.trim()) continue;
    if (skip.some(sel => el.closest(sel))) continue;
    const box = el.getBoundingClientRect();
    const style = getComputedStyle(el);
    if (box.width <= 1 || box.height <= 1 || style.visibility === 'hidden') continue;
    out.push(node.textContent);
  }
  return out.join('\\n');
}"""


# Elements showing CJK text whose font list reaches no family that maps to the bundled font:
# on a machine without a CJK font, those draw empty boxes.
UNREACHED_JS = """(families) => {
  const out = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const el = walker.currentNode.parentElement;
    if (!el || !/[\\u3040-\\u30ff\\u4e00-\\u9fff]/.test(walker.currentNode.textContent)) continue;
    const font = getComputedStyle(el).fontFamily;
    if (!families.some(f => font.includes(f))) out.push(el.tagName + ': ' + font);
  }
  return out;
}"""


def visible_text(page) -> str:
    return page.evaluate(WORDS_JS, DATA)


def english_words(text: str) -> set[str]:
    """Words of two or more Latin letters that are not allowed names; paths, file names and
    config keys (a dot, slash or underscore inside) are data."""
    found, allowed = set(), ALLOWED | option_values()
    for name in NAMES:
        text = text.replace(name, " ")
    for token in re.findall(r"[A-Za-z0-9_./:\-{}'’]+", text):
        if re.search(r"[./_{}:]", token) or re.search(r"\d", token):
            continue
        for word in re.findall(r"[A-Za-z]{2,}", token):
            if word.lower() not in allowed:
                found.add(word)
    return found - {"with", "default"}  # parts of values, and words a sentence would use


PENDING_JS = "document.querySelectorAll('.pending, .progress-text, .meta-text').length"


def settled(page) -> None:
    """Wait until the page's load-time events have answered (Gradio marks a component that
    awaits one as pending): a person switches after the page has drawn, and an answer to a
    request sent before the switch is in the language it was asked in."""
    quiet = 0
    for _ in range(60):
        quiet = quiet + 1 if page.evaluate(PENDING_JS) == 0 else 0
        if quiet >= 4:
            return
        page.wait_for_timeout(250)


def switch_to(page, lang: str) -> None:
    settled(page)
    name = i18n.languages()[lang]
    page.locator("#lang label", has_text=name).click()
    wait_until(lambda: page.get_by_role("tab", name=i18n.t("app.tab.train", lang)).count(), 10,
               f"the tabs in {lang}")


def no_cjk_font_installed() -> bool:
    try:
        found = subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True,
                               timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return True
    return not found.strip()


def cjk_chars(text: str) -> set[str]:
    return {c for c in text if 0x3000 <= ord(c) <= 0x9FFF or 0xFF00 <= ord(c) <= 0xFFEF}


def test_chinese_page_trains_the_identity_model_and_speaks_chinese(page, server):
    zh = lambda key, **p: i18n.t(key, "zh", **p)
    fill(page, "identity-name", "Zed")            # typed before the switch: it must stay
    switch_to(page, "zh")
    assert page.locator("#identity-name input, #identity-name textarea").first.input_value() == "Zed"
    assert zh("field.train.epochs.label") in page.locator("#train-epochs").inner_text()
    page.click("#train-data")                     # Gradio's own words in a file box follow too
    wait_until(lambda: zh("gradio.drop_file") in page.locator("#train-upload").inner_text(), 10,
               "the file box's words in Chinese")

    # An error in Chinese: a dataset record without its reply.
    (server.project / "data" / "broken.jsonl").write_text(
        '{"instruction": "hi", "output": "hello"}\n{"instruction": "no output"}\n')
    fill(page, "train-model", server.model)
    choose(page, "train-dataset", "data/broken.jsonl")
    wait_until(lambda: "broken.jsonl" in page.locator("#train-command").inner_text(), 10,
               "the dataset to reach the form")
    page.click("#train-start")
    record = zh("where.record", record=2)
    try:
        wait_until(lambda: record in status_text(page), 30, "the data problem in Chinese")
    except AssertionError as err:
        raise AssertionError(f"{err}: the status says {status_text(page)!r}") from None
    assert "broken.jsonl" in status_text(page)
    shot(page, "zh-bad-data")
    page.locator("#train-dataset button[aria-label*='broken'], #train-dataset .token-remove") \
        .last.click()

    # The identity fine-tune, from Start to the end, read in Chinese.
    page.reload()                                 # the choice outlives a reload
    page.wait_for_selector("#train-start")
    wait_until(lambda: page.get_by_role("tab", name=zh("app.tab.train")).count(), 15,
               "the page in Chinese after a reload")
    run_dir = start_run(page, server, **{"train-epochs": 2, "identity-name": "Zed"})
    running = zh("ui.runs.state.running")
    wait_until(lambda: running in status_text(page) or zh("ui.runs.state.completed")
               in status_text(page), 60, "the run to show as running, in Chinese")
    done = zh("ui.runs.state.completed")
    wait_until(lambda: done in status_text(page) or zh("ui.runs.state.failed")
               in status_text(page), 300, "the run to finish", interval=1)
    assert done in status_text(page), status_text(page)
    progress = page.locator("#train-progress").inner_text()
    assert "100%" in progress and not english_words(progress), progress
    assert (run_dir / "final").is_dir()
    shot(page, "zh-train-completed")


def reload_in(page, lang: str) -> None:
    """Switch, then reload: the choice is remembered, and every answer the page asked for
    before the switch (a restored form's note, a tick) is asked again in `lang`."""
    switch_to(page, lang)
    page.reload()
    page.wait_for_selector("#train-start")
    wait_until(lambda: page.get_by_role("tab", name=i18n.t("app.tab.train", lang)).count(), 15,
               f"the page in {lang} after a reload")
    settled(page)


@pytest.mark.parametrize("tab", ["train", "chat", "eval", "export"])
def test_each_tab_in_chinese_shows_no_english_and_no_missing_glyph(page, tab):
    reload_in(page, "zh")
    open_tab(page, i18n.t(f"app.tab.{tab}", "zh"))
    try:  # the switch's redraws and the tab's first tick arrive within moments
        wait_until(lambda: not english_words(visible_text(page)), 15, "Chinese only")
    except AssertionError:
        pass  # the assertion below names what stayed English
    text = visible_text(page)
    found = english_words(text)
    lines = [line for line in text.splitlines() if english_words(line)]
    assert not found, f"English on the {tab} tab: {sorted(found)} in {lines[:8]}"
    path = shot(page, f"zh-tab-{tab}")
    assert path.exists()
    # Every Chinese character shown is in the bundled font, and the browser loaded it: on a
    # machine without a CJK font (this one) nothing else could draw them.
    held = set(map(chr, TTFont(app.ASSETS / "tunebench-cjk.woff2").getBestCmap()))
    assert not cjk_chars(text) - held, sorted(cjk_chars(text) - held)
    assert page.evaluate(f"document.fonts.check('16px \"{app.CJK_FONT}\"', '训练')")
    assert not page.evaluate(UNREACHED_JS, [app.CJK_FONT, "Noto Sans"])
    if no_cjk_font_installed():
        loaded = page.evaluate("[...document.fonts].filter(f => f.status === 'loaded')"
                               ".map(f => f.family)")
        assert any(app.CJK_FONT in family for family in loaded), loaded


def test_the_train_tab_in_japanese(page):
    reload_in(page, "ja")
    assert i18n.t("field.train.learning_rate.label", "ja") in \
        page.locator("#train-lr").inner_text()
    text = page.evaluate(WORDS_JS.replace("document.body", "document.querySelector('#tab-train')"),
                         DATA)
    assert not english_words(text), sorted(english_words(text))
    shot(page, "ja-train")
    switch_to(page, "en")                         # and back
    assert page.get_by_role("tab", name="Train").count()
