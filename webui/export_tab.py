"""The Export tab: a front end to `tunebench export`.

Start runs the CLI as a subprocess (as the Train tab runs `tunebench train`), with
TUNEBENCH_PROGRESS=json so its stdout is JSON lines: {"progress", "message"} while
it works and {"result"} at the end (the verification checks). The page reads those
back and draws a progress bar, then the verification result. No torch here.
A reward model (the result of a stage rm run) is exported as a sequence classifier;
picking one says so under the pickers.
"""

from __future__ import annotations

import collections
import html
import json
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import gradio as gr

from core import config as cfg
from core import paths, schema
from core.errors import BadInput

from . import form
from .chat_tab import (base_of_picked, checkpoint_choices, model_choices, progress_html,
                       reward_picked)

_ROOT = Path(__file__).resolve().parent.parent
REWARD_HINT = ("This is a reward model (stage rm): it is exported as a sequence classifier "
               "that `AutoModelForSequenceClassification` loads (one score per reply), and "
               "verified by comparing its scores on the probe prompts with the source's.")


def default_export_dir(saves: Path, checkpoint: str) -> str:
    """saves/exports/<run>-<checkpoint>, e.g. saves/exports/lora-20261122-final."""
    if not checkpoint:
        return str(Path(saves) / "exports" / "model")
    ckpt = Path(checkpoint)
    return str(Path(saves) / "exports" / f"{ckpt.parent.name}-{ckpt.name}")


def export_command(model: str, checkpoint: str, out: str, settings: cfg.ExportConfig,
                   overwrite: bool, verify: bool) -> list[str]:
    """The argument list Start runs (no shell): every export setting as its flag."""
    argv = [sys.executable, "-m", "core", "export", "--model", model, "--out", out]
    for name, value in schema.to_dict(settings).items():
        argv += [schema.fields(cfg.ExportConfig)[name].metadata["flag"], str(value)]
    if checkpoint:
        argv += ["--adapter", checkpoint]
    if overwrite:
        argv.append("--overwrite")
    if not verify:
        argv.append("--no-verify")
    return argv


def result_html(result: dict) -> str:
    """The verification checks as a list, under a verified / not verified badge."""
    ok = result["ok"]
    badge = ("verified" if result.get("verified") else "written") if ok else "not verified"
    kind = "completed" if ok else "failed"
    items = "".join(f"<li class='tb-check-{'ok' if c['ok'] else 'fail'}'>"
                    f"{'✓' if c['ok'] else '✗'} <b>{html.escape(c['name'])}</b>: "
                    f"{html.escape(c['detail'])}</li>" for c in result["checks"])
    where = (f"Written to <code>{html.escape(result['out'])}</code>" if ok else
             "Nothing was kept (the export was not moved into place)")
    return (f"<div class='tb-status' id='export-result' data-ok='{str(ok).lower()}'>"
            f"<span class='tb-badge tb-{kind}'>{badge}</span> {where}: {result['shards']} "
            f"shards, {result['size_mb']:.1f} MB {result['dtype']}; peak memory "
            f"{result['peak_rss_mb']:.0f} MB for a {result['model_mb']:.0f} MB model."
            f"<ul class='tb-checks'>{items}</ul></div>")


def failure_html(code: int, lines: list[str]) -> str:
    """Exit code 2 is bad input: show its one line. Anything else: the output's tail."""
    errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
    text = errors[-1] if errors and code == 2 else "\n".join(lines[-12:]) or f"exit code {code}"
    return (f"<div class='tb-status'><span class='tb-badge tb-error'>export failed</span>"
            f"<pre class='tb-error'>{html.escape(text)}</pre></div>")


def run_export(argv: list[str]):
    """Run the export CLI; yield ("progress", fraction, message) and finally
    ("result", dict) or ("failed", exit_code, output_lines)."""
    env = dict(os.environ, TUNEBENCH_PROGRESS="json", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            encoding="utf-8", errors="replace", env=env, cwd=os.getcwd())
    errors: collections.deque[str] = collections.deque(maxlen=200)
    drain = threading.Thread(target=lambda: errors.extend(l.rstrip() for l in proc.stderr),
                             daemon=True)
    drain.start()
    result = None
    for line in proc.stdout:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "result" in event:
            result = event["result"]
        elif "progress" in event:
            yield "progress", float(event["progress"]), str(event.get("message", ""))
    code = proc.wait()
    drain.join(timeout=5)
    if result is not None and code in (0, 1):
        yield "result", result
    else:
        yield "failed", code, [l for l in errors if l.strip()]


class ExportTab:
    """Builds the Export tab inside the current gr.Tab and wires its events."""

    def __init__(self, saves: Path):
        self.saves = Path(saves)
        with gr.Row():
            self.model = gr.Dropdown(model_choices(self.saves), value="demo", label="Base model",
                                     allow_custom_value=True, elem_id="export-model", scale=3,
                                     info="filled in from the checkpoint's run")
            self.checkpoint = gr.Dropdown(checkpoint_choices(self.saves), value="",
                                          label="Checkpoint to merge", elem_id="export-checkpoint",
                                          allow_custom_value=True, scale=3,
                                          info="a LoRA-family adapter is merged into the base; "
                                               "a full checkpoint is exported as it is")
            self.refresh = gr.Button("↻", scale=0, min_width=40, size="sm",
                                     elem_id="export-refresh")
        self.hint = gr.Markdown("", elem_id="export-hint")
        # Generated from core.config.ExportConfig, as `tunebench export`'s flags are.
        self.settings = form.build_settings(cfg.ExportConfig, cfg.ExportConfig(), "export")
        self.out = gr.Textbox(default_export_dir(self.saves, ""), label="Export folder",
                              elem_id="export-dir")
        with gr.Row():
            self.overwrite = gr.Checkbox(False, label="Overwrite an existing export in this "
                                         "folder", elem_id="export-overwrite")
            self.verify = gr.Checkbox(True, label="Verify after writing (reload and compare)",
                                      elem_id="export-verify")
        self.start = gr.Button("Export", variant="primary", elem_id="export-start")
        self.status = gr.HTML("<div class='tb-status tb-idle'>Pick a checkpoint and press "
                              "Export.</div>", elem_id="export-status")
        self.command = gr.Code(label="Command", language="shell", elem_id="export-command",
                               interactive=False, lines=2, max_lines=4)
        self._wire()

    def _wire(self):
        self.refresh.click(self.refresh_choices, [self.model, self.checkpoint],
                           [self.model, self.checkpoint])
        self.checkpoint.change(self.pick_checkpoint, [self.checkpoint, self.model],
                               [self.model, self.out, self.hint])
        self.start.click(self.do_export, [self.model, self.checkpoint, self.out, self.overwrite,
                                          self.verify] + self.settings.components,
                         [self.status, self.command], concurrency_limit=1)
        tab = gr.context.Context.block  # the gr.Tab app.py opened: refresh lists on opening it
        if hasattr(tab, "select"):
            tab.select(self.refresh_choices, [self.model, self.checkpoint],
                       [self.model, self.checkpoint])

    def refresh_choices(self, model: str, checkpoint: str):
        return (gr.update(choices=model_choices(self.saves), value=model),
                gr.update(choices=checkpoint_choices(self.saves), value=checkpoint))

    def pick_checkpoint(self, checkpoint: str, model: str):
        base = base_of_picked(checkpoint)
        hint = REWARD_HINT if reward_picked(checkpoint, model) else ""
        return gr.update(value=base or model), default_export_dir(self.saves, checkpoint), hint

    def do_export(self, model, checkpoint, out, overwrite, verify, *values):
        try:  # typed paths stay inside the allowed roots
            settings = form.settings_of(cfg.ExportConfig, self.settings.names, list(values),
                                        "the export settings")
            model = paths.confine_model(model or "")
            checkpoint = (str(paths.confine(checkpoint, "checkpoint", must_exist=True))
                          if (checkpoint or "").strip() else "")
            out = str(paths.confine(out or "", "export folder"))
        except BadInput as err:
            yield failure_html(2, [f"error: {err}"]), ""
            return
        argv = export_command(model, checkpoint, out, settings, overwrite, verify)
        shown = shlex.join(["tunebench"] + argv[3:])
        yield progress_html(0, "Starting the export…"), shown
        for event in run_export(argv):
            if event[0] == "progress":
                yield progress_html(event[1], f"{event[1]:.0%} · {event[2]}"), shown
            elif event[0] == "result":
                yield result_html(event[1]), shown
            else:
                yield failure_html(event[1], event[2]), shown


def build(saves: Path | str | None = None) -> ExportTab:
    """Create the Export tab's contents inside the gr.Tab the caller opened."""
    if saves is None:
        saves = paths.saves_root()
    return ExportTab(Path(saves))

