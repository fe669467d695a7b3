"""`tunebench serve`: an OpenAI-compatible API over one base model and its LoRA adapters.

    GET  /health                 liveness (no key needed)
    GET  /v1/models              the base and every adapter, by model id
    POST /v1/chat/completions    chat, with the model's chat template; stream: true = SSE
    POST /v1/completions         plain text completion
    POST /v1/adapters            {"name", "path"}: serve another adapter (no reload)
    DELETE /v1/adapters/{name}   stop serving one

Requests are checked here (every problem is a 4xx with an OpenAI-style error body and the
server keeps serving), turned into rows, and generated in batches by the model process
(core/serve_worker.py, core/serve_engine.py). Sampling settings take the Chat tab's defaults and bounds
(GenConfig); vLLM's `ignore_eos` extension is taken too. The same listening policy as the
web UI: loopback unless an API key is set.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations
# (`request: Request`) at run time, and must find the real class.
import asyncio
import hmac
import json
import os
import secrets
import sys
import time
from pathlib import Path

from . import config as cfg
from . import paths, runs, schema
from .errors import BadInput
from .serve_worker import BASE_ROW, Busy, Handle, Sampling, Worker, WorkerDied

MAX_BODY_BYTES = 1_000_000                 # a request body; a long chat is far below this
MAX_N = 8                                  # choices per request
MAX_STOPS = 4
LOOPBACK = ("127.0.0.1", "localhost", "::1")
FIELD_TYPES = {"model": str, "messages": list, "prompt": (str, list), "stream": bool,
               "max_tokens": int, "max_completion_tokens": int, "temperature": (int, float),
               "top_p": (int, float), "top_k": int, "n": int, "seed": int, "stop": (str, list),
               "repetition_penalty": (int, float), "stream_options": dict, "ignore_eos": bool}


class ApiError(Exception):
    """A request the API refuses: HTTP status, message, and the parameter at fault."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (
            status, message, param, kind, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


# --- reading a request -------------------------------------------------------------

def read_json(raw: bytes) -> dict:
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES:,} bytes")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"malformed JSON: {err}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for key, kind in FIELD_TYPES.items():
        value = body.get(key)
        if value is not None and (not isinstance(value, kind) or
                                  (kind is int and isinstance(value, bool))):
            raise ApiError(400, f"'{key}' has the wrong type ({type(value).__name__})", key)
    return body


def sampling_of(body: dict) -> tuple[Sampling, int]:
    """The sampling settings and max_tokens, with GenConfig's defaults and bounds."""
    values = {}
    for key, name in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                      ("repetition_penalty", "repetition_penalty"), ("seed", "seed"),
                      ("max_tokens", "max_new_tokens"),
                      ("max_completion_tokens", "max_new_tokens")):
        if body.get(key) is None:
            continue
        try:
            values[name] = schema.coerce(cfg.GenConfig, name, body[key])
        except (ValueError, BadInput) as err:
            raise ApiError(400, f"'{key}': {getattr(err, 'what', err)}", key) from None
    gen = cfg.GenConfig(**{k: v for k, v in values.items()})
    seed = values.get("seed")
    return Sampling(gen.temperature, gen.top_p, gen.top_k, gen.repetition_penalty,
                    seed, bool(body.get("ignore_eos"))), gen.max_new_tokens


def stops_of(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"'stop' is up to {MAX_STOPS} non-empty strings", "stop")
    return tuple(stops)


def messages_of(body: dict) -> list[dict]:
    """The conversation, checked: an optional system message, then user and assistant
    turns alternating, ending with the user."""
    messages = body.get("messages")
    if not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}]: expected an object with role system, user or "
                           "assistant", "messages")
        out.append({"role": m["role"], "content": _content(m.get("content"), i)})
    first = 1 if out[0]["role"] == "system" else 0
    for i, m in enumerate(out[first:]):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ApiError(400, f"messages[{first + i}] is '{m['role']}', expected '{want}': "
                           "after an optional system message, user and assistant alternate, "
                           "starting with the user", "messages")
    turns = out[first:]
    if not turns or turns[-1]["role"] != "user":
        raise ApiError(400, "messages: the last message must be the user's", "messages")
    return out


def _content(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content: expected text (a string, or text parts)",
                   "messages")


# --- the server --------------------------------------------------------------------

class Guard:
    """Body size and API key, checked before any route. A plain ASGI middleware: starlette's
    `@app.middleware("http")` pipes every streamed chunk through an extra task and memory
    stream, which was a third of the event loop's work while streaming."""

    def __init__(self, app, server: "Server"):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            error = self.server.refusal(scope["path"], dict(scope["headers"]))
            if error is not None:
                from fastapi.responses import JSONResponse
                response = JSONResponse(error.body(), status_code=error.status)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class Server:
    """The model process (core/serve_worker.py) and the FastAPI app in front of it."""

    def __init__(self, engine: Worker, settings: cfg.ServeConfig, api_key: str | None,
                 job_dir: Path | None = None):
        self.engine, self.settings, self.api_key = engine, settings, api_key
        self.job_dir = job_dir
        self.created = int(time.time())
        self.app = self._build_app()

    def url(self) -> str:
        host = self.settings.host if ":" not in self.settings.host else f"[{self.settings.host}]"
        return f"http://{host}:{self.settings.port}/v1"

    def record(self, state: str = "running") -> None:
        """The job folder's status: what the page shows and finds again after a reload."""
        if self.job_dir is not None:
            runs.write_status(self.job_dir, state, pid=os.getpid(), kind="serve", url=self.url(),
                              models=self.engine.model_ids(), adapters=self.engine.adapters)

    def _build_app(self):
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, StreamingResponse

        app = FastAPI(title="tunebench serve", docs_url=None, redoc_url=None,
                      openapi_url=None)

        @app.exception_handler(ApiError)
        async def api_error(request, err: ApiError):
            return JSONResponse(err.body(), status_code=err.status)

        @app.exception_handler(Exception)
        async def crash(request, err: Exception):  # a bug: say so, keep serving
            return JSONResponse(ApiError(500, f"{type(err).__name__}: {err}",
                                         kind="server_error").body(), status_code=500)

        app.add_middleware(Guard, server=self)

        @app.exception_handler(WorkerDied)
        async def died(request, err: WorkerDied):
            return JSONResponse(ApiError(503, str(err), kind="server_error").body(),
                                status_code=503)

        @app.get("/health")
        async def health():
            return {"status": "ok", "load": self.engine.load(), **await self.engine.stats()}

        @app.get("/v1/models")
        async def list_models():
            return {"object": "list", "data": [self._model_card(m)
                                               for m in self.engine.model_ids()]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = read_json(await request.body())
            prompt = await self._encode(self.engine.encode_chat(messages_of(body)))
            return await self._complete(request, body, [prompt], chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = read_json(await request.body())
            prompts = body.get("prompt")
            prompts = [prompts] if isinstance(prompts, str) else prompts
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise ApiError(400, "'prompt' must be a string or a non-empty list of strings",
                               "prompt")
            return await self._complete(request, body,
                                        [await self._encode(self.engine.encode_text(p))
                                         for p in prompts], chat=False)

        @app.post("/v1/adapters")
        async def add_adapter(request: Request):
            body = read_json(await request.body())
            name, path = body.get("name"), body.get("path")
            if not isinstance(name, str) or not isinstance(path, str):
                raise ApiError(400, "expected {\"name\": ..., \"path\": ...}", "name")
            try:
                await self.engine.add_adapter(name, path)
            except BadInput as err:
                raise ApiError(400, str(err), "name" if err.field == "name" else "path") from None
            self.record()
            return JSONResponse(self._model_card(name), status_code=201)

        @app.delete("/v1/adapters/{name}")
        async def remove_adapter(name: str):
            try:
                await self.engine.remove_adapter(name)
            except BadInput as err:
                raise ApiError(404, str(err), "name", code="model_not_found") from None
            self.record()
            return {"id": name, "object": "model", "deleted": True}

        self._responses = (JSONResponse, StreamingResponse)
        return app

    def refusal(self, path: str, headers: dict) -> ApiError | None:
        """Why a request is turned away before any route runs: its size or its key."""
        size = headers.get(b"content-length", b"")
        if size.isdigit() and int(size) > MAX_BODY_BYTES:
            return ApiError(413, f"request body over {MAX_BODY_BYTES:,} bytes")
        if path != "/health" and self.api_key and not self._authorized(headers):
            return ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                            kind="authentication_error", code="invalid_api_key")
        return None

    def _authorized(self, headers: dict) -> bool:
        given = headers.get(b"authorization", b"").decode("latin-1")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        return hmac.compare_digest(token.encode(), self.api_key.encode())

    def _model_card(self, model_id: str) -> dict:
        card = {"id": model_id, "object": "model", "created": self.created,
                "owned_by": "tunebench"}
        if model_id in self.engine.adapters:
            card.update(parent=self.engine.base_id, root=self.engine.adapters[model_id])
        return card

    @staticmethod
    async def _encode(tokens) -> list[int]:
        try:
            return await tokens
        except BadInput as err:  # e.g. a chat template that refuses these messages
            raise ApiError(400, str(err), "messages") from None

    def _adapter_of(self, body: dict) -> str:
        model = body.get("model")
        if not model:
            raise ApiError(400, "'model' is required (GET /v1/models lists them)", "model")
        if model == self.engine.base_id:
            return BASE_ROW
        if model in self.engine.adapters:
            return model
        raise ApiError(404, f"model '{model}' is not served here; served: "
                       f"{', '.join(self.engine.model_ids())}", "model", code="model_not_found")

    async def _complete(self, request, body: dict, prompts: list[list[int]], chat: bool):
        adapter = self._adapter_of(body)
        sampling, max_tokens = sampling_of(body)
        n = body.get("n") or 1
        if not 1 <= n <= MAX_N:
            raise ApiError(400, f"'n' must be 1 to {MAX_N}", "n")
        stops = stops_of(body)
        context = self.engine.context_length
        for p in prompts:
            if context and len(p) + max_tokens > context:
                raise ApiError(400, f"the prompt ({len(p)} tokens) plus max_tokens ({max_tokens}) "
                               f"is over the model's context of {context} tokens; shorten the "
                               "prompt or lower max_tokens", "max_tokens",
                               code="context_length_exceeded")
        try:
            rows, events = self.engine.submit(prompts, adapter, sampling, max_tokens, stops, n)
        except Busy:
            raise ApiError(429, f"the server is busy ({self.settings.max_queue} requests "
                           "waiting or running); retry shortly", kind="rate_limit_error",
                           code="queue_full") from None
        reply = Reply(body["model"], rows, events, chat, n)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return self._responses[1](reply.stream(include_usage),
                                      media_type="text/event-stream")
        try:
            return await reply.whole(request)
        finally:
            reply.cancel()


class Reply:
    """One request's rows, read back as the API answers: whole, or as SSE chunks."""

    def __init__(self, model: str, rows: list[Handle], events: asyncio.Queue, chat: bool,
                 n: int):
        self.model, self.rows, self.events, self.chat, self.n = model, rows, events, chat, n
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def cancel(self) -> None:
        for row in self.rows:
            row.cancel()

    def usage(self) -> dict:
        prompt = sum(r.prompt_tokens for r in self.rows if r.index % self.n == 0)
        completion = sum(r.tokens for r in self.rows)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    async def _events(self):
        """Each row's events until every row is done ('error' raises). Text that queued up
        while the client was being written to goes out as one piece: fewer, larger chunks
        when a stream lags, the same text."""
        left = len(self.rows)
        while left:
            batch = [await self.events.get()]
            while not self.events.empty():
                batch.append(self.events.get_nowait())
            for kind, index, value in _merged(batch):
                if kind == "done" and value[0] == "error":
                    raise ApiError(500, f"generation failed: {value[3]}", kind="server_error")
                if kind == "done":
                    left -= 1
                yield kind, index, value

    async def whole(self, request) -> dict:
        async for _ in self._events():
            pass
        choices = []
        for row in sorted(self.rows, key=lambda r: r.index):
            finish = "length" if row.finish == "length" else "stop"
            if self.chat:
                choices.append({"index": row.index, "finish_reason": finish, "logprobs": None,
                                "message": {"role": "assistant", "content": row.text}})
            else:
                choices.append({"index": row.index, "text": row.text, "logprobs": None,
                                "finish_reason": finish})
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.model, "choices": choices, "usage": self.usage()}

    async def stream(self, include_usage: bool):
        """Server-sent events: a first chunk with the role, the text as it comes, a chunk
        with each row's finish_reason, optionally the usage, then [DONE]. A client that goes
        away cancels its rows (their batch slots free at the next token)."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        try:
            if self.chat:
                for row in self.rows:
                    yield self._sse(obj, row.index, {"role": "assistant", "content": ""})
            async for kind, index, value in self._events():
                if kind == "delta":
                    yield self._sse(obj, index, {"content": value} if self.chat else value)
                elif kind == "done":
                    finish = "length" if value[0] == "length" else "stop"
                    yield self._sse(obj, index, {} if self.chat else "", finish)
            if include_usage:
                yield "data: " + json.dumps({"id": self.id, "object": obj, "created": self.created,
                                             "model": self.model, "choices": [],
                                             "usage": self.usage()}) + "\n\n"
            yield "data: [DONE]\n\n"
        except ApiError as err:
            yield "data: " + json.dumps(err.body()) + "\n\n"
        finally:
            self.cancel()

    def _sse(self, obj: str, index: int, delta, finish: str | None = None) -> str:
        if self.chat:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": delta, "logprobs": None, "finish_reason": finish}
        return "data: " + json.dumps({"id": self.id, "object": obj, "created": self.created,
                                      "model": self.model, "choices": [choice]},
                                     ensure_ascii=False) + "\n\n"


def _merged(events: list[tuple]) -> list[tuple]:
    """Consecutive text pieces of the same row joined into one (order otherwise kept)."""
    out: list[tuple] = []
    for event in events:
        if out and event[0] == "delta" and out[-1][0] == "delta" and out[-1][1] == event[1]:
            out[-1] = ("delta", event[1], out[-1][2] + event[2])
        else:
            out.append(event)
    return out


# --- the command -------------------------------------------------------------------

def parse_adapters(specs: list[str]) -> dict[str, str]:
    """NAME=PATH pairs from --adapter (a bare PATH is named after its run folder)."""
    found = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep:
            folder = Path(spec).expanduser().resolve()
            name, path = (folder.parent.name if folder.name == "final" else folder.name), spec
        if name in found:
            raise BadInput(f"adapter name '{name}' is given twice", field="--adapter")
        found[name] = path
    return found


def api_key_of(flag: str | None, settings: cfg.ServeConfig) -> str | None:
    """The key from --api-key or TUNEBENCH_API_KEY; a non-loopback bind needs one."""
    key = flag or os.environ.get(cfg.SERVE_KEY_ENV) or None
    if settings.host not in LOOPBACK and not key:
        raise BadInput(f"listening on {settings.host} exposes the models to the network: set an "
                       f"API key with {cfg.SERVE_KEY_ENV}=... (kept out of `ps`) or --api-key, "
                       "or listen on 127.0.0.1", field="--host")
    if key is not None and len(key) < 8:
        raise BadInput("the API key must be at least 8 characters", field="--api-key")
    return key


def main(model: str, adapter_specs: list[str], settings: cfg.ServeConfig,
         api_key: str | None = None, job_dir: str | None = None) -> int:
    """`tunebench serve`: check, load the base and adapters once, then serve until stopped."""
    key = api_key_of(api_key, settings)
    adapters = parse_adapters(adapter_specs)
    if settings.backend == "vllm":
        from .serve_vllm import exec_vllm
        return exec_vllm(model, adapters, settings, key)
    folder = Path(job_dir).resolve() if job_dir else None
    if paths.confined():  # started by the page: adapters come from the allowed folders only
        adapters = {n: str(paths.confine(p, "adapter")) for n, p in adapters.items()}
    engine = Worker(model, adapters, settings.max_batch, settings.max_queue,
                    settings.prefix_cache_mb)
    server = Server(engine, settings, key, folder)
    return _run(server)


def _run(server: Server) -> int:
    import uvicorn

    config = uvicorn.Config(server.app, host=server.settings.host, port=server.settings.port,
                            log_level="warning", access_log=False)
    web = uvicorn.Server(config)
    original_startup = web.startup

    async def startup(sockets=None):
        await original_startup(sockets)
        server.record()
        print(f"serving {', '.join(server.engine.model_ids())} at {server.url()}", flush=True)

    original_shutdown = web.shutdown

    async def shutdown(sockets=None):
        # Recorded here: after a SIGTERM, uvicorn re-raises the signal once it has shut down,
        # so code after web.run() would never see the ending.
        await original_shutdown(sockets)
        server.record("failed" if died_of else "completed")
        server.engine.close()

    died_of: list[str] = []

    def died(why: str) -> None:  # the model process is gone: nothing left to serve
        print(f"error: {why}", file=sys.stderr, flush=True)
        died_of.append(why)
        web.should_exit = True

    web.startup, web.shutdown = startup, shutdown
    server.engine.on_death = died
    try:
        web.run()
    except OSError as err:
        raise BadInput(f"cannot listen on {server.settings.host}:{server.settings.port}: "
                       f"{err.strerror}", field="--port") from None
    if not web.started:
        print(f"error: could not listen on {server.settings.host}:{server.settings.port}",
              file=sys.stderr)
        return 2
    return 1 if died_of else 0
