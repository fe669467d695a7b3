"""The Chat tab's serving panel in Chromium: start the API server for the identity adapter,
call it with the openai client, serve another adapter and drop the first while it runs,
find it again after a reload, stop it."""

import re
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared run
from page_helpers import choose, chosen, open_tab, shot, text_of, wait_until  # noqa: E402
from test_chat import NAME  # noqa: E402

from core import serve_launch  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.train]
URL = re.compile(r"http://127\.0\.0\.1:\d+/v1")


def serve_status(page) -> str:
    return text_of(page, "serve-status")


def status_models(page) -> list[str]:
    """The model ids the panel lists, base first."""
    line = next(l for l in serve_status(page).splitlines() if l.startswith("Model ids"))
    return [m.strip() for m in line.split(":", 1)[1].split(",")]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(serve_launch.health_url(url), timeout=1) as reply:
            return reply.status == 200
    except OSError:
        return False


@pytest.fixture
def served(server):
    """The server's saves folder; whatever the test does, its API server is stopped after."""
    try:
        yield server.saves
    finally:
        serve_launch.stop_server(server.saves, grace_s=3)


def test_serve_call_reload_and_stop(page, server, run_in_saves, served):
    openai = pytest.importorskip("openai")
    started = time.monotonic()
    open_tab(page, "Chat")
    page.get_by_text("Serve an API (OpenAI-compatible)").click()
    assert "idle" in serve_status(page)
    choose(page, "chat-checkpoint", "identity/final")
    # the checkpoint picked for chatting is preselected for serving
    wait_until(lambda: chosen(page, "serve-adapters") == ["identity/final"], 10,
               "the adapter to be preselected")
    page.click("#serve-start")
    wait_until(lambda: "running" in serve_status(page) and "identity" in serve_status(page),
               60, "the server to answer")
    status = serve_status(page)
    url = URL.search(status).group(0)
    assert "Model ids" in status and "`" not in status  # rendered, not raw markdown
    assert f"curl {url}/chat/completions" in status and "from openai import OpenAI" in status
    assert "Content-Type: application/json" in status
    shot(page, "serve-running")

    client = openai.OpenAI(base_url=url, api_key="unused")
    assert {m.id for m in client.models.list().data} >= {"identity"}
    reply = client.chat.completions.create(
        model="identity", messages=[{"role": "user", "content": "Who are you?"}],
        max_tokens=48)
    assert NAME in reply.choices[0].message.content, reply

    # another adapter joins the running server, and the first leaves: no restart
    shutil.copytree(run_in_saves, run_in_saves.parent / "twin")
    page.click("#chat-refresh")
    choose(page, "serve-adapters", "twin/final")
    wait_until(lambda: chosen(page, "serve-adapters") == ["identity/final", "twin/final"], 10,
               "both adapters to be picked")
    page.click("#serve-apply")
    wait_until(lambda: "applied" in serve_status(page), 60, "the new adapter to be served")
    assert "added twin" in serve_status(page) and url in serve_status(page)
    reply = client.chat.completions.create(
        model="twin", messages=[{"role": "user", "content": "Who are you?"}], max_tokens=48)
    assert NAME in reply.choices[0].message.content, reply
    page.locator("#serve-adapters .token", has_text="identity/final") \
        .locator(".token-remove").click()
    wait_until(lambda: chosen(page, "serve-adapters") == ["twin/final"], 10, "one adapter left")
    page.click("#serve-apply")
    wait_until(lambda: "removed identity" in serve_status(page), 60, "the first to leave")
    assert {m.id for m in client.models.list().data} == {"twin", status_models(page)[0]}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="identity", messages=[{"role": "user", "content": "Who are you?"}])
    shot(page, "serve-applied")

    # the page closes and comes back: the server is still there, and found again
    page.reload()
    page.wait_for_selector("#train-start")
    open_tab(page, "Chat")
    page.get_by_text("Serve an API (OpenAI-compatible)").click()
    wait_until(lambda: url in serve_status(page), 10, "the page to find the server again")
    assert "running" in serve_status(page)

    page.click("#serve-stop")
    wait_until(lambda: "stopped" in serve_status(page), 20, "the server to stop")
    assert url in serve_status(page)
    assert not answers(url)
    assert serve_launch.find_server(served) is None
    shot(page, "serve-stopped")
    print(f"\nserve page test: {time.monotonic() - started:.1f} s")
