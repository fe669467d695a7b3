"""A login gate in front of the whole Gradio app, for `tunebench webui --auth`.

Gradio's own login leaks: with `auth=` set, its index route still embeds
`window.gradio_api_info` (every endpoint, its defaults, and the run and
checkpoint paths in choice lists) in the HTML it sends to anyone. Rather than
patch Gradio's HTML, `LoginGate` denies by default: while the app has a login,
a request without a valid session cookie reaches only the routes in `OPEN`:
`POST /login` (Gradio checks the password in constant time and sets the
cookie) and the startup hook that `launch()` calls on itself. Everything else
gets our own sign-in page or a 401 before Gradio sees it, so a route Gradio
adds in a later version is closed too.

The gate is a pure ASGI middleware, given to Gradio with
`demo.launch(app_kwargs={"middleware": middleware()})`: Gradio passes
`app_kwargs` to its FastAPI subclass, whose constructor takes `middleware=`.
It reads the login state from Gradio's app on every request (`scope["app"]`,
set by Starlette), so it does nothing at all when the app has no login.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json

from starlette.middleware import Middleware
from starlette.requests import HTTPConnection

from core import i18n

from . import i18n as page_i18n

# What a request without a session may still reach, as (method, app-relative path).
OPEN = {
    # Gradio's login route, with and without the slash.
    ("POST", "/login"), ("POST", "/login/"),
    # `launch()` GETs this on its own server, with no cookie, once it listens, and
    # fails to start unless it answers 200. It runs the app's startup events once
    # (they run at launch anyway) and answers only true or false.
    ("GET", "/gradio_api/startup-events"),
}

# Sent with everything the gate answers: what it says depends on the cookie,
# so no cache may keep it (or hand a cached copy to the wrong browser).
COMMON_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]

# The page's script. It is constant (the login URL travels in the form's
# `action`, its messages in the form's data- attributes, in the page's language),
# so its hash can go in the Content-Security-Policy: the page then runs this
# script and nothing else, and talks to no other origin.
LOGIN_SCRIPT = """
const form = document.getElementById("login");
const message = document.getElementById("message");
const button = form.querySelector("button");
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  button.disabled = true;
  message.textContent = "";
  try {
    const response = await fetch(form.getAttribute("action"), {
      method: "POST",
      headers: {"Content-Type": "application/x-www-form-urlencoded"},
      body: new URLSearchParams(new FormData(form)),
      credentials: "same-origin",
    });
    if (response.ok) { location.reload(); return; }
    message.textContent = response.status === 400
      ? form.dataset.wrong
      : form.dataset.failed.replace("{status}", response.status);
  } catch (error) {
    message.textContent = form.dataset.unreachable;
  }
  button.disabled = false;
  form.password.select();
});
"""

LOGIN_STYLE = """
:root { color-scheme: light dark; --accent: #4f46e5; --on-accent: #fff; --bg: #f4f5f9;
        --card: #fff; --text: #1f2328; --dim: #656d76; --line: #d0d7de; --bad: #cf222e; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #0d1117; --card: #161b22; --text: #e6edf3; --dim: #8d96a0; --line: #30363d;
          --accent: #818cf8; --on-accent: #0d1117; --bad: #f85149; }
}
* { box-sizing: border-box; }
body { margin: 0; min-height: 100vh; display: grid; place-items: center; background: var(--bg);
       color: var(--text); font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; }
main { width: min(360px, calc(100vw - 32px)); background: var(--card); padding: 32px 28px;
       border: 1px solid var(--line); border-radius: 12px; box-shadow: 0 8px 24px #0000000f; }
h1 { margin: 0 0 4px; font-size: 1.35em; }
p.sub { margin: 0 0 24px; color: var(--dim); }
label { display: block; font-weight: 600; font-size: 0.9em; margin: 0 0 6px; }
input { width: 100%; padding: 9px 11px; margin: 0 0 16px; font: inherit; color: inherit;
        background: transparent; border: 1px solid var(--line); border-radius: 8px; }
input:focus { outline: 2px solid var(--accent); outline-offset: -1px; border-color: transparent; }
button { width: 100%; padding: 10px; font: inherit; font-weight: 600; color: var(--on-accent);
         background: var(--accent); border: 0; border-radius: 8px; cursor: pointer; }
button:disabled { opacity: 0.6; cursor: wait; }
#message { min-height: 1.5em; margin: 12px 0 -8px; color: var(--bad); font-size: 0.9em;
           text-align: center; }
"""

LOGIN_HTML = """<!doctype html>
<html lang="{lang}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{title}</title>
<link rel="icon" href="data:,">
<style>{style}</style>
</head>
<body>
<main>
  <h1>tunebench</h1>
  <p class="sub">{sub}</p>
  <form id="login" method="post" action="{action}" data-wrong="{wrong}" data-failed="{failed}"
        data-unreachable="{unreachable}">
    <label for="username">{user}</label>
    <input id="username" name="username" autocomplete="username" required autofocus>
    <label for="password">{password}</label>
    <input id="password" name="password" type="password" autocomplete="current-password"
           required>
    <button type="submit">{button}</button>
    <p id="message" role="alert"></p>
  </form>
</main>
<script>{script}</script>
</body>
</html>
"""


def _csp_hash(text: str) -> str:
    """The CSP source expression that allows exactly this inline script or style."""
    digest = hashlib.sha256(text.encode()).digest()
    return "'sha256-" + base64.b64encode(digest).decode() + "'"


CSP = ("default-src 'none'; "
       f"script-src {_csp_hash(LOGIN_SCRIPT)}; style-src {_csp_hash(LOGIN_STYLE)}; "
       "img-src data:; connect-src 'self'; form-action 'self'; base-uri 'none'")


def login_url(path: str) -> str:
    """A URL for Gradio's login route, relative to `path`.

    Relative, so the page works behind a reverse proxy that serves the app
    under a sub-path: from "/" it is "login", from "/a/b" it is "../login".
    `path` is the app-relative path, so only its slashes matter.
    """
    return "../" * (path.count("/") - 1) + "login"


# The page's texts: {placeholder in LOGIN_HTML: catalogue id}.
TEXTS = {"title": "ui.login.title", "sub": "ui.login.sub", "user": "ui.login.user",
         "password": "ui.login.password", "button": "ui.login.button",
         "wrong": "ui.login.wrong", "failed": "ui.login.failed",
         "unreachable": "ui.login.unreachable"}


def login_page(path: str, lang: str = i18n.ENGLISH) -> bytes:
    """Our sign-in page as served at `path`, in `lang`. It names nothing of the app."""
    texts = {name: html.escape(i18n.t(key, lang), quote=True) for name, key in TEXTS.items()}
    return LOGIN_HTML.format(style=LOGIN_STYLE, script=LOGIN_SCRIPT, action=login_url(path),
                             lang=lang, **texts).encode()


def page_lang(scope: dict) -> str:
    """The sign-in page's language, chosen as the app's page chooses it (webui/i18n.py):
    the visitor's switch (its cookie), else the server's default (--lang, TUNEBENCH_LANG),
    else the browser's Accept-Language, else English."""
    connection = HTTPConnection(scope)
    return page_i18n.lang_of(connection.cookies, connection.headers)


def app_path(scope: dict) -> str:
    """The request path relative to where the app is mounted."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


def has_login(app) -> bool:
    """Whether the Gradio app asks for a password.

    An app without Gradio's `auth` attribute cannot be judged, so it counts as
    having a login: a gate in the wrong place fails closed, never open.
    """
    return getattr(app, "auth", True) is not None


def is_signed_in(scope: dict, app) -> bool:
    """Whether the request carries a session cookie that Gradio issued."""
    tokens = getattr(app, "tokens", None) or {}
    cookie_id = getattr(app, "cookie_id", None)
    if cookie_id is None:
        return False
    cookies = HTTPConnection(scope).cookies
    # The same two cookies Gradio's `get_current_user` reads.
    token = (cookies.get(f"access-token-{cookie_id}")
             or cookies.get(f"access-token-unsecure-{cookie_id}"))
    return bool(token) and token in tokens


def is_open(scope: dict) -> bool:
    """Whether a request without a session may still go to Gradio (see `OPEN`)."""
    return (scope["method"], app_path(scope)) in OPEN


def wants_html(scope: dict) -> bool:
    """A browser navigating to a page, as opposed to a script or the Gradio client."""
    if scope["method"] not in ("GET", "HEAD"):
        return False
    accept = HTTPConnection(scope).headers.get("accept", "")
    return "text/html" in accept


async def _respond(send, status: int, content_type: bytes, body: bytes,
                   extra: list[tuple[bytes, bytes]] | None = None) -> None:
    """Send a whole HTTP response."""
    headers = [(b"content-type", content_type),
               (b"content-length", str(len(body)).encode())] + COMMON_HEADERS + (extra or [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def refuse_http(scope: dict, send) -> None:
    """Answer an unauthenticated request: the sign-in page for browsers, else a 401.

    The page goes out as 401 too, so one rule holds for every refused request
    (nothing unauthenticated answers 200 but the few `OPEN` routes) and no script,
    uptime check or cache mistakes the sign-in page for the app. Browsers show
    a 401 body like any page. There is no WWW-Authenticate header: the login is
    a form, not an HTTP scheme, and `Basic` would pop up the browser's dialog.
    """
    if wants_html(scope):
        page = login_page(app_path(scope), page_lang(scope))
        await _respond(send, 401, b"text/html; charset=utf-8", page,
                       [(b"content-security-policy", CSP.encode())])
    else:
        body = json.dumps({"error": "Not authenticated"}).encode()
        await _respond(send, 401, b"application/json", body)


class LoginGate:
    """ASGI middleware: while the Gradio app has a login, only signed-in requests reach it."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):   # lifespan: always Gradio's business
            await self.app(scope, receive, send)
            return
        gradio_app = scope.get("app")
        if (not has_login(gradio_app) or is_signed_in(scope, gradio_app)
                or (scope["type"] == "http" and is_open(scope))):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            # Closing before accepting makes the server refuse the handshake (HTTP 403).
            await send({"type": "websocket.close", "code": 1008})
        else:
            await refuse_http(scope, send)


def middleware() -> list[Middleware]:
    """What `demo.launch(app_kwargs={"middleware": ...})` takes to put the gate in place."""
    return [Middleware(LoginGate)]
