"""With `--auth`, a visitor without a session sees a sign-in page and nothing else.

Gradio's own login still embeds the whole API description (endpoint names,
defaults, run names and paths in choice lists) in the HTML of `GET /`;
webui/login.py puts a gate in front of the app. These tests start the real
server as a user does and talk to it over raw HTTP.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from webui.login import LoginGate, login_url

REPO = Path(__file__).resolve().parents[1]
RUN_NAME = "lora-secret-run"
USER, PASSWORD = "ann", "s3cret"
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
STARTUP_S = 60

# Every path a visitor might try, with the method it takes. All of them but the
# last few are what Gradio serves to a signed-in browser or client.
PROBES = [
    ("GET", "/"),
    ("GET", "/?view=api"),
    ("GET", "/config"),
    ("GET", "/gradio_api/info"),
    ("GET", "/gradio_api/info?all_endpoints=true"),
    ("GET", "/gradio_api/openapi.json"),
    ("GET", "/gradio_api/runs"),
    ("POST", "/gradio_api/queue/join"),
    ("POST", "/gradio_api/call/v2/on_start"),
    ("GET", "/manifest.json"),
    ("GET", "/theme.css"),
    ("GET", "/no/such/page"),
]


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One raw HTTP exchange: (status, headers, body). No redirects are followed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def make_project(root: Path) -> Path:
    """A project folder like a user's: the data folder and one finished run in saves/."""
    shutil.copytree(REPO / "data", root / "data")
    run = root / "saves" / RUN_NAME
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({
        "state": "completed", "pid": 1, "started_at": "2026-01-01T00:00:00+00:00",
        "ended_at": "2026-01-01T00:01:00+00:00", "exit_code": 0, "error": None}))
    shutil.copy(REPO / "examples" / "identity_lora.yaml", run / "config.yaml")
    return root


def wait_until_up(proc: subprocess.Popen, port: int, log: Path) -> None:
    """Poll until the server answers any HTTP status; fail early if it died."""
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            request(port, "GET", "/config")
            return
        except OSError:    # refused or reset: not listening yet
            time.sleep(0.05)
    pytest.fail(f"server did not answer within {STARTUP_S} s:\n{log.read_text()}")


def start_server(project: Path, *extra: str):
    """Start `tunebench webui` in `project` on a free port; returns (process, port)."""
    port = free_port()
    log = project / f"server-{port}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONPATH=str(REPO))
    env.pop("TUNEBENCH_AUTH", None)     # the login comes from the flag or not at all
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "webui.cli", "webui", "--port", str(port),
             "--saves-dir", str(project / "saves"), *extra],
            cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_up(proc, port, log)
    except BaseException:
        stop(proc)
        raise
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app with `--auth ann:s3cret`, serving a project that holds one run."""
    project = make_project(tmp_path_factory.mktemp("project"))
    proc, port = start_server(project, "--auth", f"{USER}:{PASSWORD}")
    yield port, project
    stop(proc)


def sign_in(port: int, password: str = PASSWORD):
    """POST Gradio's login form, as our page's script does."""
    body = f"username={USER}&password={password}".encode()
    return request(port, "POST", "/login", body,
                   {"Content-Type": "application/x-www-form-urlencoded"})


def session_cookie(headers: http.client.HTTPMessage) -> str:
    """The Cookie header a browser would send back after this response."""
    cookies = [value.split(";", 1)[0] for value in headers.get_all("set-cookie") or []]
    return "; ".join(cookies)


def secrets_in(body: bytes, project: Path) -> list[str]:
    """Which tell-tale strings of the app's API or the project's runs the body holds."""
    text = body.decode("utf-8", "replace")
    words = ["on_start", "named_endpoints", RUN_NAME, "saves", "dataset_info", "identity",
             str(project), str(project.resolve())]
    return [word for word in words if word in text]


@pytest.mark.parametrize("accept", [BROWSER_ACCEPT, "*/*"], ids=["browser", "script"])
@pytest.mark.parametrize("method, path", PROBES)
def test_visitor_without_session_learns_nothing(server, method, path, accept):
    port, project = server
    body = b"{}" if method == "POST" else None
    status, headers, content = request(port, method, path, body,
                                       {"Accept": accept, "Content-Type": "application/json"})
    assert status == 401
    assert secrets_in(content, project) == []
    assert headers["cache-control"] == "no-store"
    if method == "GET" and accept == BROWSER_ACCEPT:
        assert headers["content-type"].startswith("text/html")
        page = content.decode()
        assert "<title>tunebench · sign in</title>" in page
        assert 'type="password"' in page and "Sign in" in page
        assert "Wrong user name or password" in page      # the script's message
        assert "<script src" not in page and "<link rel=\"stylesheet\"" not in page
    else:
        assert json.loads(content) == {"error": "Not authenticated"}


def test_login_page_posts_to_the_login_route_from_any_depth(server):
    port, _ = server
    _, _, page = request(port, "GET", "/gradio_api/info/", headers={"Accept": BROWSER_ACCEPT})
    assert 'action="../../login"' in page.decode()
    assert [login_url(p) for p in ("/", "/x", "/a/b", "/a/b/")] == [
        "login", "login", "../login", "../../login"]


def test_websocket_upgrade_without_session_is_refused(server):
    """However uvicorn treats the upgrade (it needs a websocket library), no socket opens."""
    port, _ = server
    status, _, _ = request(port, "GET", "/gradio_api/queue/data", headers={
        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert status != 101


def test_only_open_route_besides_login_says_nothing(server):
    """Gradio's launch() calls its startup hook without a cookie; it must stay open."""
    port, _ = server
    status, _, content = request(port, "GET", "/gradio_api/startup-events")
    assert (status, content) == (200, b"false")     # launch() already ran the events


def test_wrong_password_gets_no_session(server):
    port, _ = server
    status, headers, _ = sign_in(port, password="wrong")
    assert status == 400
    assert headers.get_all("set-cookie") is None


def test_forged_cookie_is_not_a_session(server):
    port, project = server
    _, headers, _ = sign_in(port)
    forged = "; ".join(c.split("=", 1)[0] + "=forged" for c in session_cookie(headers).split("; "))
    status, _, content = request(port, "GET", "/", headers={"Cookie": forged,
                                                            "Accept": BROWSER_ACCEPT})
    assert status == 401 and secrets_in(content, project) == []


def test_signed_in_browser_gets_the_whole_app(server):
    port, _ = server
    status, headers, _ = sign_in(port)
    assert status == 200
    cookie = session_cookie(headers)
    assert "access-token" in cookie
    status, _, page = request(port, "GET", "/", headers={"Cookie": cookie,
                                                         "Accept": BROWSER_ACCEPT})
    assert status == 200 and b"train-start" in page
    # What the gate withholds really is in the app's page (Gradio's `gradio_api_info`),
    # so the probes above are not vacuous.
    assert b"on_start" in page and b"named_endpoints" in page
    status, _, config = request(port, "GET", "/config", headers={"Cookie": cookie})
    assert status == 200 and b"train-start" in config
    status, _, _ = request(port, "GET", "/gradio_api/info", headers={"Cookie": cookie})
    assert status == 200


async def echo_once(websocket):
    """A websocket endpoint that says one word and closes."""
    await websocket.accept()
    await websocket.send_text("app")
    await websocket.close()


def gate_around(auth) -> TestClient:
    """A tiny app behind the gate, carrying a Gradio-like login state."""
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("app")),
                            WebSocketRoute("/ws", echo_once)])
    if auth is not ...:
        app.auth, app.tokens, app.cookie_id = auth, {"good": "ann"}, "cid"
    app.add_middleware(LoginGate)
    return TestClient(app)


def test_gate_is_a_no_op_without_auth():
    client = gate_around(auth=None)
    assert client.get("/").text == "app"
    assert client.post("/", headers={"Accept": BROWSER_ACCEPT}).status_code == 405  # the app's


def test_gate_checks_the_session_cookie():
    client = gate_around(auth={"ann": "pw"})
    assert client.get("/").status_code == 401
    for name, value, expected in [("access-token-unsecure-cid", "good", 200),
                                  ("access-token-cid", "good", 200),
                                  ("access-token-cid", "bad", 401),
                                  ("access-token-other", "good", 401)]:
        response = client.get("/", headers={"Cookie": f"{name}={value}"})
        assert response.status_code == expected, (name, value)


def test_gate_closes_websockets_without_session():
    client = gate_around(auth={"ann": "pw"})
    with pytest.raises(WebSocketDisconnect) as refused:
        with client.websocket_connect("/ws"):
            pass
    assert refused.value.code == 1008
    with client.websocket_connect("/ws", headers={"Cookie": "access-token-cid=good"}) as ws:
        assert ws.receive_text() == "app"
    with gate_around(auth=None).websocket_connect("/ws") as ws:
        assert ws.receive_text() == "app"


def test_gate_fails_closed_without_gradio_state():
    assert gate_around(auth=...).get("/").status_code == 401


def test_without_auth_loopback_serves_the_app_as_before(tmp_path):
    proc, port = start_server(make_project(tmp_path))
    try:
        status, _, page = request(port, "GET", "/", headers={"Accept": BROWSER_ACCEPT})
        assert status == 200 and b"train-start" in page
        status, _, _ = request(port, "GET", "/config")
        assert status == 200
    finally:
        stop(proc)
