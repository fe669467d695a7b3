"""The page's language: which one each visitor reads, and switching it in place.

The texts live in core/locales (core/i18n.py). Here:

- `visitor_lang()` answers core.i18n's "which language now?" inside a page event: the
  visitor's choice (a cookie the switch sets, so it outlives a reload), else the server's
  default (`tunebench webui --lang`, TUNEBENCH_LANG), else the browser's Accept-Language,
  else English. Every handler that renders text (status lines, progress, errors) therefore
  renders it in the visitor's language without passing the language around.
- `widget(gr.Button, {"value": "train.start"}, ...)` builds a component and records which
  catalogue id each text property shows (`tr` records a component built otherwise);
  `redraw(fn, inputs, outputs)` records a handler that renders server-made text (HTML,
  Markdown). A switch relabels the recorded texts in the browser and runs the redraws on
  the server, so the form, the chart and the conversation keep their values: only texts
  change, no reload.

The page is built once, in English; a visitor who reads another language gets the same
relabelling when the page loads.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import gradio as gr
from gradio.blocks import postprocess_update_dict
from gradio.context import LocalContext

from core import i18n

COOKIE = "tunebench_lang"
BUILT_IN = i18n.ENGLISH              # the language the components are built with
_server_default: str | None = None   # tunebench webui --lang


def install(default: str | None = None) -> None:
    """Make core.i18n ask the current page event for its visitor's language."""
    global _server_default
    _server_default = i18n.supported(default) if default else None
    i18n.set_resolver(visitor_lang)


def visitor_lang() -> str | None:
    request = LocalContext.request.get(None)
    if request is None:
        return None  # not inside a page event: the environment's language
    try:
        return lang_of(request.cookies, request.headers)
    except (AttributeError, KeyError):
        return _server_default


def lang_of(cookies, headers) -> str:
    """A visitor's language from a request's cookies and headers: the switch's cookie, else
    the server's default (--lang, TUNEBENCH_LANG or a Chinese locale), else the browser's
    Accept-Language, else English. The sign-in page (webui/login.py) asks the same."""
    chosen = i18n.supported(cookies.get(COOKIE))
    if chosen:
        return chosen
    environment = i18n.environment_lang()
    if _server_default or environment != i18n.ENGLISH:
        return _server_default or environment
    for tag in headers.get("accept-language", "").split(","):
        found = i18n.supported(tag.split(";")[0])
        if found:
            return found
    return i18n.ENGLISH


# --- what a switch redraws --------------------------------------------------------------

Text = "str | tuple[str, dict] | Callable[[], Any]"


@dataclasses.dataclass
class Texts:
    """The components whose texts come from the catalogue, and the handlers that redraw
    server-made text, for one page."""
    static: list[tuple[gr.components.Component, dict[str, Any]]] = dataclasses.field(
        default_factory=list)
    dynamic: list[tuple[Callable, list, list]] = dataclasses.field(default_factory=list)
    transient: list = dataclasses.field(default_factory=list)

    def relabel_js(self) -> str:
        """The browser's relabelling: each static component's update, in every language."""
        by_lang = {lang: self._updates_in(lang) for lang in i18n.languages()}
        return ("(lang) => { const byLang = %s; document.documentElement.lang = lang; "
                "return byLang[lang] || byLang['%s']; }"
                % (json.dumps(by_lang, ensure_ascii=False), BUILT_IN))

    def _updates_in(self, lang: str) -> list[dict]:
        with i18n.speaking(lang):
            return [_update(block, {prop: _text(spec) for prop, spec in props.items()})
                    for block, props in self.static]

    def cleared_js(self) -> str:
        """The JavaScript value that clears each transient output."""
        return json.dumps([{"__type__": "update", "value": None} for _ in self.transient])


def _update(block, props: dict) -> dict:
    """`gr.update(**props)` for `block` as Gradio's server sends it: the new properties
    passed through the component's constructor (choices with labels, say, become pairs)."""
    kwargs = {**block.constructor_args, **props, "render": False}
    kwargs.pop("value", None)
    return postprocess_update_dict(block.__class__(**kwargs), dict(props))


_building: Texts | None = None


def collecting() -> Texts:
    """Start collecting the texts of a page being built (app.build_app)."""
    global _building
    _building = Texts()
    return _building


def tr(component, **props: Any):
    """Record that `component`'s properties show these catalogue texts. A property's spec
    is an id, (id, params), or a function returning the value (choices with labels, a
    field's help). Returns the component, so it wraps a constructor call."""
    if _building is not None:
        _building.static.append((component, props))
    return component


def widget(cls, texts: dict[str, Any], *args, **kwargs):
    """Build `cls(*args, **kwargs)` with its text properties (`texts`: property -> spec, as
    `tr` takes them) rendered in the page's language, and record them for a switch: each id
    written once."""
    return tr(cls(*args, **{prop: _text(spec) for prop, spec in texts.items()}, **kwargs),
              **texts)


def redraw(fn: Callable, inputs: list, outputs: list) -> None:
    """Record a handler that re-renders server-made text into `outputs` in the current
    language (called on a switch, and on load for a visitor who does not read English)."""
    if _building is not None:
        _building.dynamic.append((fn, list(inputs), list(outputs)))


def transient(*outputs) -> None:
    """Record outputs that answer one click ("Saved.", an upload's note, a preview): a switch
    clears them rather than leave them in the old language; the next click answers anew."""
    if _building is not None:
        _building.transient.extend(outputs)


def _text(spec: Any) -> Any:
    if callable(spec):
        return spec()
    if isinstance(spec, tuple):
        key, params = spec
        return i18n.t(key, **params)
    return i18n.t(spec)


# A visitor's choice, kept in a cookie for every later tick and reload; the answers to
# one click, cleared (%s: their cleared values).
SET_COOKIE_JS = ("(lang) => { document.cookie = '" + COOKIE + "=' + lang + "
                 "'; path=/; max-age=31536000; SameSite=Lax'; return %s; }")


# Gradio draws a file box's own words ("Drop File Here - or - Click to Upload") in its
# locale, which follows the browser and does not change with the page's switch. This script,
# in the page's head, writes them from the catalogue in the page's language (<html lang>,
# which the switch and each load set) whenever Gradio draws such a box.
UPLOAD_TEXTS = {"drop": "gradio.drop_file", "or": "gradio.or", "click": "gradio.click_to_upload"}
UPLOAD_JS = """
(() => {
  const TEXTS = %s;
  function relabel() {
    const t = TEXTS[document.documentElement.lang];
    if (!t) return;
    document.querySelectorAll('[data-testid=upload-text]').forEach(box => {
      const words = [...box.childNodes].filter(n => n.nodeType === 3 && n.textContent.trim());
      const set = (node, text) => { if (node && node.textContent.trim() !== text) node.textContent = text; };
      if (words.length >= 2) { set(words[0], t.drop); set(words[words.length - 1], t.click); }
      set(box.querySelector('.or'), t.or);
    });
  }
  new MutationObserver(relabel).observe(document.documentElement, {subtree: true,
    childList: true, characterData: true, attributes: true, attributeFilter: ['lang']});
})();
"""


def head() -> str:
    """The page's <head> addition: Gradio's own upload words in each language."""
    texts = {lang: {k: i18n.t(key, lang) for k, key in UPLOAD_TEXTS.items()}
             for lang in i18n.languages()}
    return "<script>%s</script>" % (UPLOAD_JS % json.dumps(texts, ensure_ascii=False))


LANG_JS = "(lang) => { document.documentElement.lang = lang; return lang; }"


def picker() -> gr.Radio:
    """The language switch for the page header: each language named in its own, and its
    (screen readers') label in all of them, since it is how a visitor finds their own."""
    languages = i18n.languages()
    return gr.Radio(choices=[(name, code) for code, name in languages.items()],
                    value=BUILT_IN, label=" / ".join(i18n.t("app.language", c) for c in languages),
                    show_label=False, container=False, elem_id="lang", elem_classes="tb-lang",
                    interactive=True)


def wire(demo: gr.Blocks, switch: gr.Radio, texts: Texts) -> None:
    """A switch relabels everything; so does a page load for a visitor who reads another
    language than the one the page was built in (the load sets the switch, which changes).

    The labels change in the browser, from texts rendered here once per language: no
    request, and, unlike a server event, no Gradio loading status for each labelled
    component. The page's frontend walks every component that was ever an event's output on
    every status message of every later event (each tick's), so relabelling ~200 components
    through the server made every open tab slower for as long as it stayed open."""
    hidden = dict(show_progress="hidden", api_visibility="private")
    demo.load(i18n.current, None, [switch], queue=False, **hidden).then(
        None, [switch], None, js=LANG_JS, **hidden)   # <html lang>, for UPLOAD_JS
    switched = switch.change(None, [switch], [c for c, _ in texts.static],
                             js=texts.relabel_js(), **hidden)
    switch.input(None, [switch], texts.transient, js=SET_COOKIE_JS % texts.cleared_js(),
                 **hidden)
    # Each redraw follows on its own, not in a chain: one tab's slow redraw (a memory
    # estimate, a run's files) must not hold back the others'. Each is told the language:
    # the cookie the switch sets may not have reached the server before the change does.
    for fn, inputs, outputs in texts.dynamic:
        switched.then(_in_language(fn), [switch] + inputs, outputs, **hidden)


def _in_language(fn: Callable) -> Callable:
    def redraw_in(lang: str, *args):
        with i18n.speaking(i18n.supported(lang) or BUILT_IN):
            return fn(*args)
    return redraw_in
