"""The Chat tab: talk to a fine-tuned checkpoint, and to its base model side by side.

The model lives in a separate worker process (core.chat_worker): loading or an
out-of-memory error there cannot take this page server down, and Unload ends the
process so the memory really goes back. The server keeps one worker, shared by
all browser tabs (a workbench has one user and usually one model in memory).
Conversations live in each browser tab's gr.State, never in the server.

A reward model (the final/ of a stage rm run, or an export of one) writes no replies:
when one is chosen, Load loads it for scoring and the "Score a reply" panel scores
replies to a prompt with it, in the same worker process; a message sent to it gets the
core's refusal (the same words `tunebench chat` prints).
"""

from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path

import gradio as gr

from core import config as cfg
from core import limits, paths, runs, schema, serve_launch
from core.chat import (DEFAULT_PROBES, base_model_of, build_messages, is_reward_model,
                       probes_path, save_probes)
from core.chat_worker import ChatWorker, WorkerError
from core.errors import BadInput
from core.i18n import Msg, msg, t, text_of

from . import form
from .i18n import redraw, tr, widget

NO_CHECKPOINT = t("ui.chat.no_checkpoint", "en")  # the checkpoint picker's empty choice
PROBE_HEADERS = ["ui.chat.probe.col_prompt", "ui.chat.probe.col_after", "ui.chat.probe.col_before"]
WORKER = ChatWorker()  # one model process per server


# --- choices ------------------------------------------------------------------------

def checkpoint_choices(saves: Path) -> list[tuple[str, str]]:
    """(label, path) for every final/ and checkpoint-N/ under saves, newest run first."""
    out = [(t("ui.chat.no_checkpoint"), "")]  # the value "" is what the handlers read
    for path in runs.loadable_checkpoints(saves):
        out.append((f"{path.parent.name}/{path.name}", str(path)))
    return out


def model_pickers(saves: Path, tab: str) -> tuple[gr.Dropdown, gr.Dropdown]:
    """The base model and checkpoint pickers of the Chat and Export tabs (`tab`: their
    elem_id prefix and catalogue section, ui.<tab>.model, ui.<tab>.checkpoint)."""
    model = widget(gr.Dropdown, {"label": f"ui.{tab}.model", "info": f"ui.{tab}.model_info"},
                   choices=model_choices(saves), value="demo", allow_custom_value=True,
                   elem_id=f"{tab}-model", scale=3)
    checkpoint = widget(gr.Dropdown, {"label": f"ui.{tab}.checkpoint",
                                      "info": f"ui.{tab}.checkpoint_info",
                                      "choices": lambda: checkpoint_choices(saves)},
                        value="", allow_custom_value=True, elem_id=f"{tab}-checkpoint",
                        scale=3)
    return model, checkpoint


def model_choices(saves: Path) -> list[str]:
    """'demo' plus the exported models under saves/exports (they load as plain models);
    a folder there that is a link out of the allowed folders is not offered."""
    exports = Path(saves) / "exports"
    found = sorted((p for p in exports.iterdir() if (p / "config.json").is_file()
                    and paths.is_allowed(p.resolve())),
                   key=lambda p: p.stat().st_mtime, reverse=True) if exports.is_dir() else []
    return ["demo"] + [str(p) for p in found]


def adapter_choices(saves: Path) -> list[tuple[str, str]]:
    """(label, path) for every LoRA checkpoint the API server can serve (no reward models)."""
    return [(f"{p.parent.name}/{p.name}", str(p)) for p in runs.loadable_checkpoints(saves)
            if (p / "adapter_config.json").is_file() and not is_reward_model(p)]


def base_of_picked(checkpoint: str | None) -> str | None:
    """The base model of a checkpoint picked in the page; nothing is read from a folder
    outside the allowed ones (the picker accepts typed values)."""
    if not (checkpoint or "").strip():
        return None
    try:
        return base_model_of(paths.confine(checkpoint, "checkpoint", must_exist=True))
    except BadInput:
        return None


def reward_picked(checkpoint: str | None, model: str | None) -> bool:
    """Whether the picked checkpoint (else the model) is a reward model; its JSON files are
    read only inside the allowed folders."""
    try:
        if (checkpoint or "").strip():
            return is_reward_model(paths.confine(checkpoint, "checkpoint", must_exist=True))
        model = paths.confine_model(model or "")
    except BadInput:
        return False
    return model != "demo" and Path(model).is_dir() and is_reward_model(model)


def scores_markdown(scores: list[float]) -> str:
    """Reply A's score (and B's, with which one the model prefers and how surely: a reward
    model is trained so that sigmoid(score A - score B) is the chance A is the better)."""
    import math

    lines = [t("ui.chat.score.reply", name=name, score=f"{score:+.4f}")
             for name, score in zip("AB", scores)]
    if len(scores) == 2:
        margin = scores[0] - scores[1]
        better, worse = ("A", "B") if margin >= 0 else ("B", "A")
        odds = 1 / (1 + math.exp(-abs(margin)))
        lines.append(t("ui.chat.score.prefers", better=better, worse=worse,
                       margin=f"{abs(margin):.4f}", odds=f"{odds:.0%}"))
    return "  \n".join(lines)


# --- html ---------------------------------------------------------------------------

def progress_html(fraction: float, text: str, state: str = "running") -> str:
    return (f"<div class='tb-progress tb-{state}'><div class='tb-bar'><div class='tb-fill' "
            f"style='width:{fraction * 100:.0f}%'></div></div>"
            f"<div class='tb-progress-text'>{html.escape(text)}</div></div>")


def message_html(text: str, kind: str = "error") -> str:
    label = t(f"ui.chat.badge.{kind}") if kind in ("error", "completed", "idle") else kind
    body = (f"<pre class='tb-error'>{html.escape(text)}</pre>" if kind == "error"
            else f"<span class='tb-dim'>{html.escape(text)}</span>")
    return f"<div class='tb-status'><span class='tb-badge tb-{kind}'>{label}</span> {body}</div>"


def loaded_html() -> str:
    if WORKER.alive and WORKER.info:
        return message_html(WORKER.text, "completed")
    return message_html(t("ui.chat.no_model"), "idle")


def _after_label() -> str:
    """The left pane's label: "Model" while a plain model (no checkpoint) is loaded."""
    info = WORKER.info if WORKER.alive else None
    return t("ui.chat.pane_model") if info and not info.get("checkpoint") else t(
        "ui.chat.pane_after")


def _error_text(err: Exception) -> str:
    return str(err) if isinstance(err, (BadInput, WorkerError)) else f"{type(err).__name__}: {err}"


def _stats_note(side: str, stats: dict) -> Msg | None:
    """One side's generation statistics (`side`: "after" or "before"), rendered when shown."""
    if not stats:
        return None
    return msg("ui.chat.stats", side=msg(f"ui.chat.side.{side}"), tokens=stats["tokens"],
               seconds=f"{stats['seconds']:.1f}", rate=f"{stats['tokens_per_s']:.1f}",
               stopped=stats["stopped"])


def shown(note) -> str:
    """A note kept in a gr.State (a Msg, a list of them, or plain text) as text in the
    current language: the handler that made it and a language switch show it alike."""
    if isinstance(note, list):
        return " · ".join(shown(n) for n in note if n is not None)
    return text_of(note) if note is not None else ""


@dataclasses.dataclass(frozen=True)
class _Scores:
    """Scores kept as numbers, so their lines render in whichever language is shown."""
    scores: tuple

    def text(self, lang: str | None = None) -> str:
        return scores_markdown(list(self.scores))


_KEEP = object()  # a streamed update that leaves the stats line as it is


def _redrawn(note):
    """A stored note redrawn on a language switch; nothing stored: the shown text stays."""
    return shown(note) if note else gr.skip()


# --- the API server's panel ----------------------------------------------------------

SERVE_TICK_S = 2.0
SERVE_PROMPT = "Who are you?"
_answered: set[tuple] = set()  # servers seen answering /health: not asked again


def serve_snippets(url: str, model: str) -> str:
    """The curl and Python openai calls of the served API, as markdown code blocks."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": SERVE_PROMPT}]})
    return (f"```bash\ncurl {url}/chat/completions \\\n  -H 'Content-Type: application/json' \\\n"
            f"  -d '{body}'\n```\n\n"
            f"```python\nfrom openai import OpenAI\n\n"
            f"client = OpenAI(base_url={json.dumps(url)}, api_key=\"unused\")\n"
            f"reply = client.chat.completions.create(\n    model={json.dumps(model)},\n"
            f"    messages=[{{\"role\": \"user\", \"content\": {json.dumps(SERVE_PROMPT)}}}],\n)\n"
            f"print(reply.choices[0].message.content)\n```")


def serve_ready(status: dict) -> bool:
    """Whether the running server answers; asked over HTTP until it first does, then only
    status.json is read (a server that dies is caught by its pid)."""
    key = (status.get("pid"), status.get("started_at"), status.get("url"))
    if key in _answered:
        return True
    if serve_launch.answering(status):
        _answered.add(key)
        return True
    return False


def serve_markdown(saves: Path) -> str:
    """The serving panel's status: state, base URL, model ids and snippets (read from
    <saves>/.serve/status.json, so a reloaded page finds a running server again)."""
    status = serve_launch.server_status(saves)
    log = serve_launch.job_dir(saves) / serve_launch.LOG
    if status is None:
        return t("ui.chat.serve.idle")
    state = status.get("state")
    if state == "running" and not serve_ready(status):
        return t("ui.chat.serve.starting", pid=status.get("pid"),
                 port=status.get("port") or "…", log=log)
    if state == "running":
        adapters = list(status.get("adapters") or {})
        models = status.get("models") or []
        ids = t("list.sep").join(f"`{m}`" for m in models)
        first = adapters[0] if adapters else (models[0] if models else "")
        # The snippets are code: the same in every language.
        return (t("ui.chat.serve.running", url=status["url"], ids=ids)
                + serve_snippets(status["url"], first))
    if state == "completed":
        return t("ui.chat.serve.stopped", url=status.get("url") or "?")
    error = str(runs.error_text(status) or state).replace("~~~", "")
    return t("ui.chat.serve.failed", state=state, log=log, error=error)


# --- the tab ---------------------------------------------------------------------------

class ChatTab:
    """Builds the Chat tab inside the current gr.Tab and wires its events."""

    def __init__(self, saves: Path):
        self.saves = Path(saves)
        self._loader()
        self._settings()
        self._conversation()
        self._scoring()
        self._probes()
        self._serving()
        self._wire()
        self._wire_serving()

    def _loader(self):
        with gr.Row():
            self.model, self.checkpoint = model_pickers(self.saves, "chat")
            with gr.Column(scale=1, min_width=150):
                self.load = widget(gr.Button, {"value": "ui.chat.load"}, variant="primary",
                                   elem_id="chat-load")
                with gr.Row():
                    self.unload = widget(gr.Button, {"value": "ui.chat.unload"}, size="sm",
                                         elem_id="chat-unload")
                    self.refresh = widget(gr.Button, {"value": "ui.chat.refresh"}, size="sm",
                                          min_width=40, elem_id="chat-refresh")
        self.status = gr.HTML(loaded_html(), elem_id="chat-status")
        redraw(loaded_html, [], [self.status])

    def _settings(self):
        # Generated from core.config.GenConfig, as `tunebench chat`'s flags are.
        with widget(gr.Accordion, {"label": "ui.chat.settings"}, open=False,
                    elem_id="chat-settings"):
            self.gen = form.build_settings(cfg.GenConfig, cfg.GenConfig(), "chat")
            self.trust = widget(gr.Checkbox, {"label": "ui.chat.trust"}, False,
                                elem_id="chat-trust-remote-code")

    def _conversation(self):
        self.compare = widget(gr.Checkbox, {"label": "ui.chat.compare"}, False,
                              elem_id="chat-compare")
        self.hist_after = gr.State([])
        self.hist_before = gr.State([])
        with gr.Row():
            self.output = tr(gr.Chatbot(label=t("ui.chat.pane_after"), elem_id="chat-output",
                                        height=380, buttons=["copy"]), label=_after_label)
            self.before = widget(gr.Chatbot, {"label": "ui.chat.pane_before"},
                                 elem_id="chat-before", height=380, visible=False,
                                 buttons=["copy"])
        with gr.Row(equal_height=True):
            self.input = widget(gr.Textbox, {"placeholder": "ui.chat.input"}, lines=1,
                                show_label=False, elem_id="chat-input", scale=6)
            self.send = widget(gr.Button, {"value": "ui.chat.send"}, variant="primary",
                               elem_id="chat-send", scale=1)
            self.stop = widget(gr.Button, {"value": "ui.chat.stop"}, elem_id="chat-stop", scale=1)
            self.clear = widget(gr.Button, {"value": "ui.chat.clear"}, elem_id="chat-clear",
                                scale=1)
        self.stats = gr.Markdown("", elem_id="chat-stats")
        self.stats_note = gr.State(None)  # what stats shows, kept to redraw it on a switch
        redraw(_redrawn, [self.stats_note], [self.stats])

    def _scoring(self):
        # Shown when the picked checkpoint (or model) is a reward model.
        with gr.Group(visible=False, elem_id="chat-score") as self.score_panel:
            widget(gr.Markdown, {"value": "ui.chat.score.intro"})
            self.score_prompt = widget(gr.Textbox, {"label": "ui.chat.score.prompt"}, lines=2,
                                       elem_id="chat-score-prompt")
            with gr.Row():
                self.score_reply = widget(gr.Textbox, {"label": "ui.chat.score.reply_a"}, lines=3,
                                          elem_id="chat-score-reply")
                self.score_reply_b = widget(gr.Textbox, {"label": "ui.chat.score.reply_b"},
                                            lines=3, elem_id="chat-score-reply-b")
            self.score_start = widget(gr.Button, {"value": "ui.chat.score.start"},
                                      variant="primary", elem_id="chat-score-start")
            self.score_result = gr.Markdown("", elem_id="chat-score-result")
            self.score_note = gr.State(None)
            redraw(_redrawn, [self.score_note], [self.score_result])

    def _probes(self):
        with widget(gr.Accordion, {"label": "ui.chat.probe.title"}, open=False):
            # The probe prompts are data sent to the model: they stay as written.
            self.probe_text = widget(gr.Textbox, {"label": "ui.chat.probe.prompts"},
                                     "\n".join(DEFAULT_PROBES), lines=5,
                                     elem_id="chat-probe-prompts")
            self.probe_run = widget(gr.Button, {"value": "ui.chat.probe.run"},
                                    elem_id="chat-probe-run")
            self.probe_table = widget(gr.Dataframe,
                                      {"headers": lambda: [t(h) for h in PROBE_HEADERS]},
                                      value=[], wrap=True, interactive=False,
                                      elem_id="chat-probes",
                                      column_widths=["20%", "40%", "40%"])
            self.probe_status = gr.Markdown("", elem_id="chat-probe-status")
            self.probe_note = gr.State(None)
            redraw(_redrawn, [self.probe_note], [self.probe_status])

    def _serving(self):
        with widget(gr.Accordion, {"label": "ui.chat.serve.title"}, open=False,
                    elem_id="serve-panel"):
            widget(gr.Markdown, {"value": "ui.chat.serve.intro"})
            self.serve_adapters = widget(gr.Dropdown,
                                         {"label": "ui.chat.serve.adapters",
                                          "info": "ui.chat.serve.adapters_info"},
                                         adapter_choices(self.saves), value=[], multiselect=True,
                                         elem_id="serve-adapters")
            with gr.Row():
                self.serve_start = widget(gr.Button, {"value": "ui.chat.serve.start"},
                                          variant="primary", elem_id="serve-start")
                self.serve_apply = widget(gr.Button, {"value": "ui.chat.serve.apply"},
                                          elem_id="serve-apply")
                self.serve_stop = widget(gr.Button, {"value": "ui.chat.serve.stop"},
                                         elem_id="serve-stop")
            # A callable value is read on every page load: a reloaded page finds the server.
            self.serve_status = gr.Markdown(lambda: serve_markdown(self.saves),
                                            elem_id="serve-status")
            self.serve_shown = gr.State("")
            self.serve_timer = gr.Timer(SERVE_TICK_S)
            redraw(self.serve_redraw, [], [self.serve_status, self.serve_shown])

    def _wire_serving(self):
        self.serve_start.click(self.do_serve_start, [self.model, self.serve_adapters],
                               [self.serve_status, self.serve_shown])
        self.serve_apply.click(self.do_serve_apply, [self.serve_adapters],
                               [self.serve_status, self.serve_shown])
        self.serve_stop.click(self.do_serve_stop, None, [self.serve_status, self.serve_shown])
        self.serve_timer.tick(self.serve_tick, [self.serve_shown],
                              [self.serve_status, self.serve_shown], show_progress="hidden",
                              queue=False)
        self.checkpoint.change(self.preselect_adapter, [self.checkpoint, self.serve_adapters],
                               [self.serve_adapters])
        self.refresh.click(self.refresh_adapters, [self.serve_adapters], [self.serve_adapters])
        tab = gr.context.Context.block
        if hasattr(tab, "select"):
            tab.select(self.refresh_adapters, [self.serve_adapters], [self.serve_adapters])

    def _wire(self):
        self.refresh.click(self.refresh_choices, [self.model, self.checkpoint],
                           [self.model, self.checkpoint])
        self.checkpoint.change(self.pick_checkpoint, [self.checkpoint, self.model], [self.model])
        for picker in (self.checkpoint, self.model):
            picker.change(self.show_scoring, [self.checkpoint, self.model], [self.score_panel])
        self.score_start.click(self.score_event, [self.score_prompt, self.score_reply,
                                                  self.score_reply_b],
                               [self.score_result, self.score_note])
        clear = [self.output, self.before, self.hist_after, self.hist_before, self.stats]
        self.load.click(self.do_load, [self.model, self.checkpoint, self.trust],
                        [self.status] + clear + [self.stats_note])
        self.unload.click(self.do_unload, None, [self.status])
        self.compare.change(lambda on: gr.update(visible=on), [self.compare], [self.before])
        settings = self.gen.components
        args = [self.input, self.compare, self.hist_after, self.hist_before] + settings
        outs = [self.output, self.before, self.hist_after, self.hist_before, self.input,
                self.stats, self.stats_note]
        send = self.send.click(self.send_event, args, outs)
        submit = self.input.submit(self.send_event, args, outs)
        self.stop.click(lambda: WORKER.cancel(), None, None, cancels=[send, submit])
        self.clear.click(lambda: ([], [], [], [], "", None), None, clear + [self.stats_note])
        self.probe_run.click(self.probes_event, [self.probe_text] + settings,
                             [self.probe_table, self.probe_status, self.probe_note])
        tab = gr.context.Context.block  # the gr.Tab app.py opened: refresh lists on opening it
        if hasattr(tab, "select"):
            tab.select(self.refresh_choices, [self.model, self.checkpoint],
                       [self.model, self.checkpoint])
            tab.select(loaded_html, None, [self.status])

    # --- the API server's handlers -------------------------------------------------------

    def refresh_adapters(self, picked: list[str] | None):
        choices = adapter_choices(self.saves)
        known = {path for _, path in choices}
        return gr.update(choices=choices, value=[p for p in picked or [] if p in known])

    def preselect_adapter(self, checkpoint: str, picked: list[str] | None):
        """The checkpoint picked for chatting is the one to serve, unless some are picked."""
        choices = adapter_choices(self.saves)
        if picked or checkpoint not in {path for _, path in choices}:
            return gr.update(choices=choices)
        return gr.update(choices=choices, value=[checkpoint])

    def _serve_action(self, action, refused: str, answer) -> tuple[str, str]:
        """Run a start, apply or stop: the panel shows `answer(result)`, or why it was refused
        above the panel as it stands. The text twice: shown, and kept for the tick."""
        try:
            result = action()
        except BadInput as err:
            text = t(refused, error=err, panel=serve_markdown(self.saves))
        else:
            text = answer(result)
        return text, text

    def do_serve_start(self, model: str, picked: list[str] | None):
        return self._serve_action(
            lambda: serve_launch.start_server(model, serve_launch.adapter_names(picked or []),
                                              self.saves),
            "ui.chat.serve.not_started", lambda _: serve_markdown(self.saves))

    def do_serve_apply(self, picked: list[str] | None):
        """The running server serves the adapters picked now: added and removed through its
        API, without a restart."""
        return self._serve_action(
            lambda: serve_launch.apply_adapters(self.saves,
                                                serve_launch.adapter_names(picked or [])),
            "ui.chat.serve.not_applied", self._applied_text)

    def _applied_text(self, changes: tuple[list[str], list[str]]) -> str:
        added, removed = changes
        panel = serve_markdown(self.saves)
        if not added and not removed:
            return t("ui.chat.serve.unchanged", panel=panel)
        names = lambda found: t("list.sep").join(found) or t("ui.chat.serve.nothing")
        return t("ui.chat.serve.applied", added=names(added), removed=names(removed),
                 panel=panel)

    def do_serve_stop(self):
        return self._serve_action(
            lambda: serve_launch.stop_server(self.saves), "ui.chat.serve.not_stopped",
            lambda final: serve_markdown(self.saves) if final else t("ui.chat.serve.none_here"))

    def serve_tick(self, shown: str):
        """Every 2 s: status.json (and /health while starting); an unchanged text is not sent."""
        text = serve_markdown(self.saves)
        if shown.endswith(text):  # unchanged (a refusal shown above it stays)
            return gr.skip(), gr.skip()
        return text, text

    def serve_redraw(self):
        """On a language switch: the server's state in the new language (a refusal shown
        above it goes: it was about the last press)."""
        text = serve_markdown(self.saves)
        return text, text

    # --- handlers ---------------------------------------------------------------------

    def refresh_choices(self, model: str, checkpoint: str):
        return (gr.update(choices=model_choices(self.saves), value=model),
                gr.update(choices=checkpoint_choices(self.saves), value=checkpoint))

    def pick_checkpoint(self, checkpoint: str, model: str):
        """A checkpoint was chosen: select the base model its run was trained from."""
        base = base_of_picked(checkpoint)
        return gr.update(value=base) if base else gr.update(value=model)

    def show_scoring(self, checkpoint: str, model: str):
        return gr.update(visible=reward_picked(checkpoint, model))

    def do_score(self, prompt: str, reply_a: str, reply_b: str) -> str:
        """Score reply A (and B) to the prompt with the loaded reward model, in the worker."""
        return shown(self._score(prompt, reply_a, reply_b))

    def score_event(self, prompt: str, reply_a: str, reply_b: str):
        """do_score for the page: the result, and what it says kept to redraw it."""
        note = self._score(prompt, reply_a, reply_b)
        return shown(note), note

    def _score(self, prompt: str, reply_a: str, reply_b: str) -> "Msg | _Scores":
        try:
            for text, what in ((prompt, "prompt"), (reply_a, "reply A"), (reply_b, "reply B")):
                limits.check_text(text or "", what, limits.MAX_MESSAGE_CHARS, multiline=True)
            replies = [r.strip() for r in (reply_a or "", reply_b or "") if r.strip()]
            if not (prompt or "").strip() or not (reply_a or "").strip():
                raise BadInput(msg("ui.chat.score.need_reply"))
            if (WORKER.info or {}).get("head") != "score" and WORKER.info is not None:
                raise BadInput(msg("ui.chat.score.not_reward"))
            scores = WORKER.score(prompt.strip(), replies)
        except (BadInput, WorkerError) as err:
            return msg("ui.chat.score.not_scored", error=err)
        return _Scores(tuple(scores))

    def do_load(self, model: str, checkpoint: str, trust: bool):
        # A plain model (no checkpoint) has no before/after: its pane is just "Model".
        label = t("ui.chat.pane_after") if checkpoint else t("ui.chat.pane_model")
        WORKER.expect_load()  # a message sent meanwhile waits for this load, then is answered
        # The conversation is cleared once, now; later updates leave it alone, so a message
        # sent during the load keeps its reply.
        keep = [gr.skip()] * 6
        yield [progress_html(0, t("ui.chat.starting")),
               gr.update(value=[], label=label), [], [], [], "", None]
        try:
            model = paths.confine_model(model or "")  # typed paths stay inside the allowed roots
            checkpoint = (str(paths.confine(checkpoint, "checkpoint", must_exist=True))
                          if checkpoint else None)
            # A reward model is loaded to score replies (the Score panel), not to chat.
            head = "score" if reward_picked(checkpoint, model) else "causal"
            for event in WORKER.load(model, checkpoint, bool(trust), head):
                if event["event"] == "progress":
                    yield [progress_html(event["fraction"], event["message"] + "…")] + keep
            yield [message_html(WORKER.text, "completed")] + keep
        except (BadInput, WorkerError) as err:
            WORKER.load_abandoned()
            yield [message_html(_error_text(err))] + keep

    def do_unload(self):
        WORKER.unload()
        return message_html(t("ui.chat.unloaded"), "idle")

    def do_send(self, prompt, compare, hist_after, hist_before, *settings):
        """Stream the fine-tuned reply, then (comparing) the base reply to the same prompt."""
        for *views, note in self._send(prompt, compare, hist_after, hist_before, *settings):
            yield (*views, shown(note) if note is not _KEEP else gr.update())

    def send_event(self, *args):
        """do_send for the page: also the stats line kept to redraw it (None: unchanged)."""
        for *views, note in self._send(*args):
            if note is _KEEP:
                yield (*views, gr.update(), gr.skip())
            else:
                yield (*views, shown(note), note)

    def _send(self, prompt, compare, hist_after, hist_before, *settings):
        prompt = (prompt or "").strip()
        if not prompt:
            yield hist_after, hist_before, hist_after, hist_before, "", None
            return
        try:
            gen = self._gen(settings)
            limits.check_text(prompt, "message", limits.MAX_MESSAGE_CHARS, multiline=True)
        except BadInput as err:
            yield (hist_after, hist_before, hist_after, hist_before, "",
                   msg("ui.chat.not_sent", error=err))
            return
        views = {"after": list(hist_after), "before": list(hist_before)}
        sides = ["after"]
        if compare and (WORKER.info or {}).get("checkpoint"):
            sides.append("before")
        elif compare:
            views["before"] = list(hist_before) + [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": t("ui.chat.no_checkpoint_reply")}]
        notes = []
        for side in sides:
            history = hist_after if side == "after" else hist_before
            messages = build_messages(history, prompt, gen.system)
            views[side] = list(history) + [{"role": "user", "content": prompt},
                                           {"role": "assistant", "content": ""}]
            stats: dict = {}
            try:
                for piece in WORKER.generate(messages, schema.to_dict(gen), side, stats):
                    views[side][-1]["content"] += piece
                    yield views["after"], views["before"], hist_after, hist_before, "", _KEEP
            except (BadInput, WorkerError) as err:
                views[side][-1]["content"] = t("ui.chat.error_reply", error=_error_text(err))
                yield (views["after"], views["before"], hist_after, hist_before, prompt,
                       err)
                return
            notes.append(_stats_note(side, stats))
        yield (views["after"], views["before"], views["after"],
               views["before"] if compare else hist_before, "", notes)

    def do_probes(self, text: str, *settings):
        """Each probe prompt, single-turn, on both sides; the table is saved next to the
        checkpoint."""
        for rows, note in self._probes_run(text, *settings):
            yield rows, shown(note)

    def probes_event(self, text: str, *settings):
        """do_probes for the page: also the status kept to redraw it."""
        for rows, note in self._probes_run(text, *settings):
            yield rows, shown(note), note

    def _probes_run(self, text: str, *settings):
        try:
            limits.check_text(text or "", "probe prompts", limits.MAX_MESSAGE_CHARS,
                              multiline=True)
            gen = self._gen(settings)
        except BadInput as err:
            yield [], msg("ui.chat.probe.not_run", error=err)
            return
        prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
        if not prompts:
            yield [], msg("ui.chat.probe.none")
            return
        info = WORKER.info or {}
        rows = []
        for i, prompt in enumerate(prompts, start=1):
            try:
                rows.append(_probe(prompt, gen, both=bool(info.get("checkpoint"))))
            except (BadInput, WorkerError) as err:
                yield _probe_table(rows), msg("ui.chat.error_reply", error=err)
                return
            yield _probe_table(rows), msg("ui.chat.probe.progress", i=i, n=len(prompts))
        yield _probe_table(rows), self._save_probes(rows, info, gen)

    def _gen(self, values) -> cfg.GenConfig:
        return form.settings_of(cfg.GenConfig, self.gen.names, list(values),
                                msg("ui.chat.gen_source"))  # rendered when shown

    def _save_probes(self, rows: list[dict], info: dict, gen: cfg.GenConfig) -> Msg:
        path = probes_path(info.get("checkpoint"), info.get("model", ""))
        if path is None:
            return msg("ui.chat.probe.not_saved", n=len(rows))
        try:
            save_probes(path, rows, model=info.get("model", ""),
                        checkpoint=info.get("checkpoint"), settings=gen)
        except BadInput as err:
            return msg("ui.chat.probe.save_failed", n=len(rows), error=err)
        return msg("ui.chat.probe.saved", n=len(rows), path=str(path))


def _probe(prompt: str, gen: cfg.GenConfig, both: bool) -> dict:
    messages = build_messages([], prompt, gen.system)
    after = "".join(WORKER.generate(messages, schema.to_dict(gen), "after"))
    before = ("".join(WORKER.generate(messages, schema.to_dict(gen), "before")) if both
              else t("ui.chat.probe.no_checkpoint"))
    return {"prompt": prompt, "fine_tuned": after, "base": before}


def _probe_table(rows: list[dict]) -> list[list[str]]:
    return [[r["prompt"], r["fine_tuned"], r["base"]] for r in rows]


def build(saves: Path | str | None = None) -> ChatTab:
    """Create the Chat tab's contents inside the gr.Tab the caller opened."""
    if saves is None:
        saves = paths.saves_root()
    return ChatTab(Path(saves))
