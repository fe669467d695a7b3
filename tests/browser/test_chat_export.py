"""The Chat and Export tabs in Chromium, against a real `tunebench webui`.

The used-by story in order: an identity fine-tune (trained with `tunebench train`)
is loaded with its base, compared before/after, probed, exported into verified
shards, and the export is loaded back in the Chat tab as a plain model.
"""

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared run
from page_helpers import choose, open_tab, shot, shown, text_of, wait_until  # noqa: E402
from test_chat import NAME  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.train]
SHARD = "3MB"


def status_of(page) -> str:
    """The Chat tab's own status markup (not Gradio's queue/timer overlay)."""
    box = page.locator("#chat-status .tb-status, #chat-status .tb-progress").first
    return box.inner_text() if box.count() else ""


def load(page, expect: str) -> str:
    """Press Load; wait for the status to name `expect` as ready, or for an error."""
    old = status_of(page)
    page.click("#chat-load")
    wait_until(lambda: status_of(page) != old, 60, "the load to start")
    wait_until(lambda: ("ready" in status_of(page) and expect in status_of(page)) or
               "error" in status_of(page), 120, "the model to load")
    return status_of(page)


def send(page, prompt: str, both: bool) -> None:
    page.locator("#chat-input textarea").fill(prompt)
    page.click("#chat-send")
    wait_until(lambda: ("base:" if both else "fine-tuned:") in text_of(page, "chat-stats"), 120,
               "the replies")


def test_compare_probe_export_and_chat_with_the_export(page, server, run_in_saves):
    open_tab(page, "Chat")
    choose(page, "chat-checkpoint", "identity/final")
    wait_until(lambda: page.locator("#chat-model input").input_value() not in ("", "demo") or
               server.model == "demo", 10, "the base model of the run to be filled in")
    status = load(page, "identity/final")
    assert "ready" in status, status

    # before/after: the fine-tune answers with its identity, the base does not
    page.locator("#chat-compare input").check()
    send(page, "Who are you?", both=True)
    after, before = text_of(page, "chat-output"), text_of(page, "chat-before")
    shot(page, "chat-compare")
    assert NAME in after, after
    assert NAME not in before.replace("Base model (before)", ""), before
    assert "stopped at eos" in text_of(page, "chat-stats")

    # probes: one click, both sides, a table, saved next to the checkpoint
    page.get_by_text("Probe prompts").click()
    page.click("#chat-probe-run")
    wait_until(lambda: "saved to" in text_of(page, "chat-probe-status"), 180, "the probes")
    shot(page, "chat-probes")
    saved = json.loads((run_in_saves / "final" / "probes.json").read_text(encoding="utf-8"))
    assert len(saved["rows"]) == 5 and NAME in saved["rows"][0]["fine_tuned"]
    assert "Who are you?" in text_of(page, "chat-probes")

    # export: merge into verified shards, shown in export-status
    open_tab(page, "Export")
    choose(page, "export-checkpoint", "identity/final")
    out = server.saves / "exports" / "identity-final"
    wait_until(lambda: page.locator("#export-dir textarea").input_value().endswith(
        "identity-final"), 10, "the export folder to be suggested")
    page.locator("#export-shard-size input, #export-shard-size textarea").first.fill(SHARD)
    page.click("#export-start")
    time.sleep(1.5)
    shot(page, "export-progress")
    wait_until(lambda: page.locator("#export-result").count() or
               page.locator("#export-status .tb-error").count(), 300, "the export")
    shot(page, "export-done")
    assert page.locator("#export-result").get_attribute("data-ok") == "true", \
        text_of(page, "export-status")
    assert "verified" in text_of(page, "export-status")
    assert len(list(out.glob("model-*.safetensors"))) >= 3

    # a second export to the same folder is refused without the overwrite box
    page.click("#export-start")
    wait_until(lambda: "already exists" in text_of(page, "export-status"), 120, "the refusal")

    # the export loads back in the Chat tab as a plain model
    open_tab(page, "Chat")
    choose(page, "chat-checkpoint", "(none")
    choose(page, "chat-model", str(out))
    status = load(page, "identity-final")
    assert "ready" in status and "identity/final" not in status, status
    page.locator("#chat-compare input").uncheck()
    send(page, "Who are you?", both=False)
    shot(page, "chat-export")
    assert NAME in text_of(page, "chat-output")


def export_from_page(page, out_name: str, fmt: str, gguf_type: str | None = None) -> str:
    """Pick the format (and GGUF type), start the export job, wait for its report."""
    choose(page, "export-format", fmt)
    wait_until(lambda: shown(page, "export-gguf-type") == (fmt == "gguf"), 10,
               "the GGUF type to be shown for gguf only")
    if gguf_type:
        choose(page, "export-gguf-type", gguf_type)
    wait_until(lambda: "Estimated size" in text_of(page, "export-estimate"), 10, "the estimate")
    box = page.locator("#export-dir textarea")
    box.fill(str(Path(box.input_value()).parent / out_name))
    box.press("Tab")
    page.click("#export-start")
    # the report of this format (the page may still show the previous export's report)
    wait_until(lambda: page.locator(f"#export-result[data-format='{fmt}']").count() or
               page.locator("#export-status .tb-error").count(), 300, f"the {fmt} export")
    return text_of(page, "export-status")


def test_export_to_bnb_4bit_and_gguf_as_jobs_with_verified_reports(page, server, run_in_saves):
    open_tab(page, "Export")
    choose(page, "export-checkpoint", "identity/final")
    wait_until(lambda: page.locator("#export-dir textarea").input_value().endswith(
        "identity-final"), 10, "the export folder to be suggested")
    status = export_from_page(page, "identity-4bit", "bnb-4bit")
    shot(page, "export-bnb-4bit")
    assert page.locator("#export-result").get_attribute("data-ok") == "true", status
    assert "verified" in status and "nf4 4-bit" in status, status
    command = text_of(page, "export-command")
    assert "tunebench export" in command and "--format bnb-4bit" in command, command
    assert (server.saves / "exports" / "identity-4bit" / "config.json").is_file()

    # a reloaded page reattaches to the newest export job and shows its report
    page.reload()
    page.wait_for_selector("#train-start")
    open_tab(page, "Export")
    wait_until(lambda: page.locator("#export-result").count(), 30, "the report to come back")
    assert "nf4 4-bit" in text_of(page, "export-status")

    pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")
    choose(page, "export-checkpoint", "identity/final")
    status = export_from_page(page, "identity-gguf", "gguf", "f16")
    shot(page, "export-gguf")
    assert page.locator("#export-result").get_attribute("data-format") == "gguf", status
    assert page.locator("#export-result").get_attribute("data-ok") == "true", status
    assert "same greedy tokens as the source" in status and "Ollama Modelfile" in status
    assert "--gguf-type f16" in text_of(page, "export-command")
    out = server.saves / "exports" / "identity-gguf"
    assert (out / "Modelfile").is_file() and list(out.glob("*.gguf"))


def test_bad_checkpoint_is_explained_in_the_page(page, server, tmp_path):
    open_tab(page, "Chat")
    broken = server.saves / "broken-run" / "final"
    broken.mkdir(parents=True)
    (broken / "adapter_config.json").write_text("{}")
    choose(page, "chat-checkpoint", str(broken))
    status = load(page, "broken")
    shot(page, "chat-bad-checkpoint")
    assert "adapter_model.safetensors" in status and "Traceback" not in status, status
    choose(page, "chat-checkpoint", "/etc")
    status = load(page, "/etc")
    assert "outside the allowed folders" in status, status


def test_a_message_sent_right_after_load_waits_and_is_answered(page, server, run_in_saves):
    """Users type as soon as they press Load: the message waits for the model, then gets
    the fine-tune's answer (it used to come back as "no model loaded")."""
    open_tab(page, "Chat")
    page.click("#chat-unload")
    choose(page, "chat-checkpoint", "identity/final")
    page.click("#chat-load")
    page.locator("#chat-input textarea").fill("Who are you?")
    page.click("#chat-send")  # at once: the load has only just begun
    wait_until(lambda: "fine-tuned:" in text_of(page, "chat-stats") or
               "error" in text_of(page, "chat-output").lower(), 180, "the reply")
    shot(page, "chat-send-during-load")
    reply = text_of(page, "chat-output")
    assert NAME in reply and "no model loaded" not in reply, reply
    assert "ready" in status_of(page), status_of(page)
