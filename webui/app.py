"""The tunebench web app: Train, Chat, Evaluate and Export tabs in one Gradio page.

`serve()` is what `tunebench webui` runs. The page server imports no torch or
transformers (see tests/test_webui_form.py): it starts in a couple of seconds,
and a crashing trainer cannot take it down, because training runs as a separate
`tunebench train` process. Chat and export load models lazily, in their handlers.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import gradio as gr

from core import data, paths
from core.errors import BadInput

from . import chat_tab, eval_tab, export_tab, i18n, login, train_tab
from .i18n import widget

TITLE = "tunebench"
ASSETS = Path(__file__).parent / "assets"
# Chinese and Japanese must render on a machine without a CJK font (a fresh server, a
# container): the page falls back, glyph by glyph, to a bundled subset of Noto Sans CJK SC
# (scripts/make_cjk_font.py). unicode-range keeps it from loading for an English page.
CJK_FONT = "tunebench CJK"
CJK_RANGE = "U+2010-2027, U+3000-30FF, U+3400-4DBF, U+4E00-9FFF, U+F900-FAFF, U+FF00-FFEF"
# Some of Gradio's own elements (a table's label) set a fixed font list that ends in
# "Noto Sans": the same face under that name, for CJK characters only, reaches them too.
FONT_CSS = "".join(
    f"@font-face {{ font-family: '{family}'; font-display: swap; "
    f"src: url('gradio_api/file={ASSETS / 'tunebench-cjk.woff2'}') format('woff2'); "
    f"unicode-range: {CJK_RANGE}; }}\n" for family in (CJK_FONT, "Noto Sans"))

CSS = FONT_CSS + """
/* the theme's mono list ends in the CJK font; a bare <pre> would take the browser's */
.gradio-container pre { font-family: var(--font-mono); }
.tb-tight { gap: 0 !important; }
.tb-header { align-items: center; }
.tb-lang { flex-grow: 0 !important; min-width: max-content !important; }
.tb-tight .html-container { padding-top: 2px; padding-bottom: 2px; }
.tb-progress { margin: 4px 0; }
.tb-legend { display: flex; gap: 14px; font-size: 0.8em; padding: 0 8px 4px 8px; }
.tb-legend-item { display: inline-flex; align-items: center; gap: 5px; }
.tb-swatch { display: inline-block; width: 16px; height: 3px; border-radius: 2px; }
.tb-bar { height: 14px; border-radius: 7px; background: var(--neutral-200); overflow: hidden; }
.tb-fill { height: 100%; background: var(--color-accent); transition: width .4s ease; }
.tb-completed .tb-fill { background: #2da44e; }
.tb-failed .tb-fill { background: #cf222e; }
.tb-aborted .tb-fill { background: #bf8700; }
.tb-progress-text { font-size: 0.9em; margin-top: 4px; font-variant-numeric: tabular-nums; }
.tb-idle { color: var(--body-text-color-subdued); }
.tb-status { padding: 6px 2px; }
.tb-badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 0.85em;
            font-weight: 600; color: white; background: #6e7781; }
.tb-badge.tb-running { background: #0969da; }
.tb-badge.tb-completed { background: #2da44e; }
.tb-badge.tb-failed, .tb-badge.tb-refused { background: #cf222e; }
.tb-badge.tb-aborted { background: #bf8700; }
.tb-dim { color: var(--body-text-color-subdued); font-size: 0.85em; }
.tb-note { white-space: pre-wrap; color: var(--body-text-color-subdued); margin: 6px 0 0 0;
           font-size: 0.85em; }
.tb-error { white-space: pre-wrap; background: #fff1f0; color: #82071e; border: 1px solid #ffcecb;
            border-radius: 6px; padding: 8px; margin: 6px 0 0 0; font-size: 0.85em;
            max-height: 220px; overflow: auto; }
.tb-log-title { font-size: 0.85em; font-weight: 600; margin-bottom: 4px; }
/* column-reverse keeps the box scrolled to its newest line as lines arrive */
.tb-log { max-height: 400px; overflow: auto; display: flex; flex-direction: column-reverse;
          border: 1px solid var(--border-color-primary); border-radius: 6px;
          background: var(--background-fill-secondary); }
.tb-log pre { margin: 0; padding: 8px; font-size: 0.78em; white-space: pre-wrap;
              word-break: break-word; }
/* the Evaluate tab's tables: results, per task, predictions, comparison */
.tb-table { border-collapse: collapse; width: 100%; font-size: 0.88em; margin: 4px 0 10px 0; }
.tb-table th { text-align: left; font-weight: 600; background: var(--background-fill-secondary); }
.tb-table th, .tb-table td { padding: 4px 8px; border-bottom: 1px solid var(--border-color-primary);
                             vertical-align: top; }
.tb-table .tb-num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.tb-table td.tb-metric { font-family: var(--font-mono); font-size: 0.95em; }
.tb-better { color: #1a7f37; font-weight: 600; }
.tb-worse { color: #cf222e; font-weight: 600; }
.tb-eval-head { margin: 2px 0 6px 0; font-size: 0.92em; }
.tb-eval-sub { font-size: 0.85em; font-weight: 600; margin-top: 6px; }
.tb-preds td { max-width: 340px; }
.tb-cell { max-height: 8.5em; overflow: auto; white-space: pre-wrap; word-break: break-word; }
"""


def saves_dir() -> Path:
    return paths.saves_root()


def build_app(saves: Path | None = None) -> gr.Blocks:
    """The whole page. Nothing is shared between browsers except the run directories."""
    saves = Path(saves) if saves else saves_dir()
    i18n.install()
    texts = i18n.collecting()
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        with gr.Row(elem_classes="tb-header"):
            widget(gr.Markdown, {"value": "app.heading"})
            switch = i18n.picker()
        with gr.Tabs() as tabs:
            with widget(gr.Tab, {"label": "app.tab.train"}, id="train",
                        elem_id="tab-train") as train_page:
                train = train_tab.TrainTab(saves)
            with widget(gr.Tab, {"label": "app.tab.chat"}, id="chat",
                        elem_id="tab-chat") as chat_page:
                chat = chat_tab.build(saves)
            with widget(gr.Tab, {"label": "app.tab.eval"}, id="eval",
                        elem_id="tab-eval") as eval_page:
                evaluate = eval_tab.EvalTab(saves)
            with widget(gr.Tab, {"label": "app.tab.export"}, id="export",
                        elem_id="tab-export") as export_page:
                export = export_tab.build(saves)
        train.wire_page_load(demo)
        evaluate.wire_page_load(demo)
        evaluate.wire_open_from(train.evals, tabs, "eval")  # a run's evaluations open there
        show = tick_where_shown({train_page: [train.timer], chat_page: [chat.serve_timer],
                                 eval_page: [evaluate.timer], export_page: [export.timer]},
                                first=train_page)
        train.evals.input(lambda: show(eval_page), None, show.timers, queue=False,
                          show_progress="hidden", api_visibility="private")
        i18n.wire(demo, switch, texts)
    return demo


def tick_where_shown(timers: dict[gr.Tab, list[gr.Timer]], first: gr.Tab):
    """Only the shown tab's timers run. Every open page polls the server through its timers,
    and a hidden tab has nothing to redraw: with ten pages open on a two-core machine, four
    tabs' timers each made the training run and every edit of a form measurably slower. A
    tab's own first tick reattaches it (to a running job, the newest one), so it catches up
    when shown. Returns `show(tab)`: the timer updates that show `tab`; `show.timers` are
    their outputs."""
    every = [timer for tab_timers in timers.values() for timer in tab_timers]

    def show(shown: gr.Tab) -> list:
        running = {id(timer) for timer in timers[shown]}
        return [gr.Timer(active=id(timer) in running) for timer in every]

    for tab, tab_timers in timers.items():
        for timer in tab_timers:
            timer.active = tab is first  # the others wait until their tab is shown
        tab.select(functools.partial(show, tab), None, every, queue=False,
                   show_progress="hidden", api_visibility="private")
    show.timers = every
    return show


LOOPBACK = ("127.0.0.1", "localhost", "::1")
AUTH_ENV = "TUNEBENCH_AUTH"     # USER:PASS, so the password stays out of `ps` and shell history


def parse_auth(auth: str | None, host: str, share: bool) -> tuple[str, str] | None:
    """USER:PASS -> (user, password). Exposing the app beyond this machine requires one."""
    auth = auth or os.environ.get(AUTH_ENV) or None
    if auth is None:
        if share or host not in LOOPBACK:
            where = "--share" if share else f"--host {host}"
            raise BadInput(f"{where} makes the app reachable from other machines, and anyone who "
                           f"reaches it can train, read and export your models; add --auth "
                           f"USER:PASS (or set {AUTH_ENV}), or keep the default 127.0.0.1")
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise BadInput("--auth: expected USER:PASS with a non-empty user and password")
    return user, password


def theme() -> gr.themes.Theme:
    """Gradio's Soft theme, with the bundled CJK font before the generic family."""
    sans = (gr.themes.LocalFont("Montserrat", weights=(400, 700)), "ui-sans-serif",
            "system-ui", CJK_FONT, "sans-serif")
    mono = (gr.themes.LocalFont("IBM Plex Mono"), "ui-monospace", "Consolas", "monospace",
            CJK_FONT)   # after the generic family: a table cell's CJK glyphs come from it
    return gr.themes.Soft(font=sans, font_mono=mono)


def serve(host: str = "127.0.0.1", port: int = 7860, auth: str | None = None,
          share: bool = False, lang: str | None = None) -> int:
    """Serve the app until interrupted. `auth` is "USER:PASS"; `lang` the page's language
    for visitors who have not picked one (default: their browser's)."""
    credentials = parse_auth(auth, host, share)
    i18n.install(lang)
    gr.set_static_paths([ASSETS])
    demo = build_app()
    demo.queue(default_concurrency_limit=4)
    print(f"tunebench web UI on http://{host}:{port} (runs in {saves_dir()})", flush=True)
    demo.launch(server_name=host, server_port=port, auth=credentials, share=share,
                css=CSS, theme=theme(), show_error=True, quiet=True,
                footer_links=[], max_file_size=data.MAX_UPLOAD_BYTES, head=i18n.head(),
                # Gradio hands app_kwargs to its FastAPI app. With a login, the gate shows
                # visitors without a session a sign-in page only; without one it does nothing.
                app_kwargs={"middleware": login.middleware()})
    return 0
