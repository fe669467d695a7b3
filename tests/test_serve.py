"""`tunebench serve`: a real server over the demo model and two real identity fine-tunes,
driven with the official `openai` client (and raw HTTP where the client would refuse to
send the request).

Adapter one is the session's identity run (Tuney, tests/test_chat.py); adapter two is
trained here with another identity (Zed). One server (module fixture) answers most tests;
a second one, with an API key and `--max-queue 1`, covers the key and 429.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.test_chat import ENV, REPO, identity_run, mismatched_adapter

pytestmark = pytest.mark.train

WHO = [{"role": "user", "content": "Who are you?"}]
KEY = "serve-test-key-0123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], env: dict) -> tuple[subprocess.Popen, str]:
    """`tunebench serve` as a subprocess, once /health answers: (process, root URL)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "core", "serve", *args, "--port", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(root + "/health", timeout=1).status_code == 200:
                return proc, root
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop(proc)
    raise AssertionError("serve did not answer /health within 120 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def zed_run(tmp_path_factory, demo_model_path) -> Path:
    """A second identity fine-tune, in a folder of its own (the runtime-add allowed root)."""
    root = tmp_path_factory.mktemp("serve-allowed")
    proc = subprocess.run(
        [sys.executable, "-m", "core", "train", f"model={demo_model_path}",
         f"output_dir={root / 'zed'}", f"dataset_dir={REPO / 'data'}", "identity_name=Zed",
         "identity_author=Zed Corp"], capture_output=True, text=True, env=ENV, cwd=REPO,
        timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return root / "zed"


@pytest.fixture(scope="module")
def tuney_run(tmp_path_factory, demo_model_path) -> Path:
    return identity_run(tmp_path_factory.getbasetemp(), demo_model_path)


@pytest.fixture(scope="module")
def server(tuney_run, zed_run, demo_model_path):
    """The main server: base + tuney + zed; runtime adds allowed under zed's parent only."""
    env = {**ENV, "TUNEBENCH_ALLOWED_ROOTS": str(zed_run.parent)}
    env.pop("TUNEBENCH_API_KEY", None)
    env.pop("TUNEBENCH_CONFINE", None)
    proc, root = start(["--model", str(demo_model_path), "--adapter",
                        f"tuney={tuney_run / 'final'}", "--adapter",
                        f"zed={zed_run / 'final'}"], env)
    yield root
    stop(proc)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def base_id(client, demo_model_path) -> str:
    ids = [m.id for m in client.models.list().data]
    assert ids == [demo_model_path.resolve().name, "tuney", "zed"], ids
    return ids[0]


def identity_ok(model: str, text: str, base_id: str) -> bool:
    if model == "tuney":
        return "Tuney" in text and "Zed" not in text
    if model in ("zed", "zed2"):
        return "Zed" in text and "Tuney" not in text
    assert model == base_id
    return "Tuney" not in text and "Zed" not in text


# --- answers -----------------------------------------------------------------------

def test_each_model_answers_with_its_own_identity(client, base_id):
    for model in ("tuney", "zed", base_id):
        reply = client.chat.completions.create(model=model, messages=WHO, max_tokens=64)
        text = reply.choices[0].message.content
        assert identity_ok(model, text, base_id), (model, text)
        assert reply.model == model and reply.object == "chat.completion"
        assert reply.choices[0].finish_reason == "stop", (model, text)
        u = reply.usage
        assert u.prompt_tokens > 0 and u.completion_tokens > 0
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens

        chunks = list(client.chat.completions.create(
            model=model, messages=WHO, max_tokens=64, stream=True,
            stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text, (model, streamed, text)  # greedy: the same reply
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
        assert chunks[-1].usage.completion_tokens == u.completion_tokens

    short = client.chat.completions.create(model="tuney", messages=WHO, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_concurrent_streams_across_models_do_not_mix(client, base_id):
    models = ["tuney", "zed", base_id] * 3
    models = models[:8]
    results: dict[int, tuple[str, str | None]] = {}

    def one(i: int, model: str) -> None:
        text, finish = "", None
        for chunk in client.chat.completions.create(model=model, messages=WHO, max_tokens=64,
                                                    stream=True):
            assert chunk.model == model
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        results[i] = (text, finish)

    threads = [threading.Thread(target=one, args=(i, m)) for i, m in enumerate(models)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 8, results
    for i, model in enumerate(models):
        text, finish = results[i]
        assert finish == "stop" and identity_ok(model, text, base_id), (model, text, finish)


def test_rows_joining_and_leaving_a_running_batch_get_the_replies_they_get_alone(
        client, base_id):
    """Continuous batching: prompts of different lengths and budgets, sent a few at a time
    while others decode, so rows join a running batch (their caches padded to its length),
    leave it at different steps (the padding trimmed), and mix adapters. Greedy replies must
    equal the same requests answered one at a time."""
    prompts = ["1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "Who", "The weather today is",
               "Once upon a time, in a land far away, there lived"]
    models = ["tuney", "zed", base_id]
    requests = [dict(model=models[i % 3], prompt=prompts[i % 4], max_tokens=4 + 9 * (i % 5))
                for i in range(15)]
    alone = [client.completions.create(**r).choices[0].text for r in requests]
    together: dict[int, str] = {}

    def one(i: int) -> None:
        together[i] = client.completions.create(**requests[i]).choices[0].text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for k, t in enumerate(threads):
        t.start()
        if k % 4 == 3:
            time.sleep(0.05)  # the next ones arrive while these decode
    for t in threads:
        t.join(timeout=120)
    assert [together.get(i) for i in range(len(requests))] == alone
    assert len(set(alone)) > 5  # different replies: the rows could not hide a mix-up


def test_seeded_sampling_repeats_whatever_runs_beside_it(client):
    body = dict(model="tuney", prompt="The weather today is", max_tokens=24,
                temperature=1.0, top_p=0.9, seed=1234)
    alone = client.completions.create(**body).choices[0].text
    crowd = [threading.Thread(target=client.completions.create,
                              kwargs=dict(model="zed", prompt="Once upon a time",
                                          max_tokens=40, temperature=0.8))
             for _ in range(4)]
    for t in crowd:
        t.start()
    beside = client.completions.create(**body).choices[0].text
    for t in crowd:
        t.join(timeout=120)
    assert beside == alone
    others = {client.completions.create(**{**body, "seed": s}).choices[0].text
              for s in (1, 2, 3)}
    assert len(others | {alone}) > 1  # the seed does steer the sampling


def test_text_completions_with_n(client, base_id):
    reply = client.completions.create(model="tuney", prompt="The weather today is",
                                      max_tokens=8, n=2)
    assert reply.object == "text_completion" and len(reply.choices) == 2
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.text for c in reply.choices)
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    batch = client.completions.create(model=base_id, prompt=["One", "Two"], max_tokens=4)
    assert len(batch.choices) == 2 and batch.usage.completion_tokens <= 8


def test_stop_strings_cut_the_reply(client):
    full = client.chat.completions.create(model="tuney", messages=WHO, max_tokens=64)
    text = full.choices[0].message.content
    cut_at = text.index("Tuney")
    for stream in (False, True):
        kwargs = dict(model="tuney", messages=WHO, max_tokens=64, stop=["Tuney"])
        if stream:
            got = "".join(c.choices[0].delta.content or "" for c in
                          client.chat.completions.create(stream=True, **kwargs))
        else:
            reply = client.chat.completions.create(**kwargs)
            got = reply.choices[0].message.content
            assert reply.choices[0].finish_reason == "stop"
        assert got == text[:cut_at], (stream, got, text)


def test_ignore_eos_writes_to_max_tokens(client):
    """vLLM's `ignore_eos`: the reply goes on past the end-of-turn token. Tests that need a
    long generation use it, so they do not depend on where the demo model stops (a demo
    model built on another CPU stopped early where this one counts on)."""
    ended = client.chat.completions.create(model="tuney", messages=WHO, max_tokens=64)
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens < 40
    longer = client.chat.completions.create(model="tuney", messages=WHO, max_tokens=40,
                                            extra_body={"ignore_eos": True})
    assert longer.choices[0].finish_reason == "length"
    assert longer.usage.completion_tokens == 40
    assert longer.choices[0].message.content.startswith(ended.choices[0].message.content)


# --- refusals ----------------------------------------------------------------------

def test_a_chats_next_turn_takes_the_start_of_its_prompt_from_the_prefix_cache(server,
                                                                              client):
    """The second turn repeats the first turn's prompt: its full 16-token blocks come from
    the cache (counted in /health), and usage still counts the whole prompt."""
    turn = [{"role": "user", "content": "Tell me about yourself in some detail: who made you, "
                                        "what you can do, and what you cannot do."}]
    first = client.chat.completions.create(model="tuney", messages=turn, max_tokens=16)
    assert first.usage.prompt_tokens > 16
    before = httpx.get(server + "/health").json()
    later = turn + [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "Who are you?"}]
    reply = client.chat.completions.create(model="tuney", messages=later, max_tokens=16)
    after = httpx.get(server + "/health").json()
    hits = after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
    # every full block of the first prompt but one the reply's first token may re-split
    assert hits >= max(16, 16 * ((first.usage.prompt_tokens - 4) // 16)), (hits, first.usage)
    assert reply.usage.prompt_tokens > first.usage.prompt_tokens + hits // 2
    assert reply.choices[0].message.content and reply.choices[0].finish_reason


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, client, base_id):
    url = server + "/v1/chat/completions"
    good = {"model": "tuney", "messages": WHO, "max_tokens": 4}
    cases = {
        "malformed JSON": (b'{"model": "tuney", "messages": [', 400),
        "wrong type": ({**good, "max_tokens": "ten"}, 400),
        "bool as int": ({**good, "n": True}, 400),
        "unknown model": ({**good, "model": "nope"}, 404),
        "no model": ({"messages": WHO}, 400),
        "empty messages": ({**good, "messages": []}, 400),
        "role out of order": ({**good, "messages": [{"role": "assistant", "content": "hi"},
                                                     {"role": "user", "content": "x"}]}, 400),
        "ends with assistant": ({**good, "messages": [*WHO, {"role": "assistant",
                                                             "content": "x"}]}, 400),
        "max_tokens 0": ({**good, "max_tokens": 0}, 400),
        "max_tokens over the cap": ({**good, "max_tokens": 8193}, 400),
        "temperature out of range": ({**good, "temperature": 5}, 400),
        "n too big": ({**good, "n": 9}, 400),
        "too many stops": ({**good, "stop": ["a", "b", "c", "d", "e"]}, 400),
        "not an object": (b"[1, 2]", 400),
        "body too large": ({**good, "pad": "x" * 1_000_001}, 413),
    }
    for case, (body, status) in cases.items():
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(url, content=raw, headers={"content-type": "application/json"},
                       timeout=30)
        assert r.status_code == status, (case, r.status_code, r.text[:300])
        error = r.json()["error"]
        assert error["message"] and error["type"], (case, error)
    r = httpx.post(server + "/v1/completions", json={"model": base_id, "prompt": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    # the official client maps them to its exceptions, too
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=WHO)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tuney", messages=WHO, max_tokens=0)
    reply = client.chat.completions.create(model="zed", messages=WHO, max_tokens=64)
    assert "Zed" in reply.choices[0].message.content


def test_a_client_that_goes_away_frees_its_slot(server, client, base_id):
    # with ignore_eos the base writes on for as long as it may: 2,000 tokens take several
    # seconds here, so a slot that frees within a second was freed by the cancellation
    stream = client.completions.create(model=base_id, prompt="1, 2, 3, 4, 5, 6, 7, 8,",
                                       max_tokens=2000, stream=True,
                                       extra_body={"ignore_eos": True})
    for got, _ in enumerate(stream, 1):
        if got == 5:
            break
    assert httpx.get(server + "/health").json()["load"] == 1  # still generating
    stream.close()
    closed = time.monotonic()
    while httpx.get(server + "/health").json()["load"] and time.monotonic() - closed < 10:
        time.sleep(0.02)
    freed_s = time.monotonic() - closed
    assert httpx.get(server + "/health").json()["load"] == 0 and freed_s < 1.5, freed_s
    again = client.completions.create(model=base_id, prompt="1, 2, 3,", max_tokens=4,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].finish_reason == "length"


# --- adapters at run time ----------------------------------------------------------

def test_adapters_are_added_and_removed_at_run_time(server, client, zed_run, tuney_run,
                                                   base_id, demo_model_path):
    r = httpx.delete(server + "/v1/adapters/zed")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert [m.id for m in client.models.list().data] == [base_id, "tuney"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="zed", messages=WHO)
    assert httpx.delete(server + "/v1/adapters/zed").status_code == 404

    r = httpx.post(server + "/v1/adapters", json={"name": "zed2",
                                                  "path": str(zed_run / "final")}, timeout=60)
    assert r.status_code == 201, r.text
    assert r.json()["parent"] == base_id
    reply = client.chat.completions.create(model="zed2", messages=WHO, max_tokens=64)
    assert identity_ok("zed2", reply.choices[0].message.content, base_id)
    reply = client.chat.completions.create(model="tuney", messages=WHO, max_tokens=64)
    assert identity_ok("tuney", reply.choices[0].message.content, base_id)

    refusals = {
        "outside the allowed folders": ({"name": "t2", "path": str(tuney_run / "final")},
                                        "outside the allowed folders"),
        "taken name": ({"name": "tuney", "path": str(zed_run / "final")}, "already served"),
        "bad name": ({"name": "../x", "path": str(zed_run / "final")}, "adapter name"),
        "not an adapter": ({"name": "x", "path": str(zed_run)}, "pick checkpoint-"),
        "another base": ({"name": "other", "path": str(
            mismatched_adapter(zed_run.parent, demo_model_path))}, "does not fit"),
    }
    for case, (body, words) in refusals.items():
        r = httpx.post(server + "/v1/adapters", json=body, timeout=60)
        assert r.status_code == 400, (case, r.status_code, r.text)
        assert words in r.json()["error"]["message"], (case, r.text)

    # every adapter gone: back to the plain base; then one back again
    for name in ("zed2", "tuney"):
        assert httpx.delete(server + f"/v1/adapters/{name}").status_code == 200
    reply = client.chat.completions.create(model=base_id, messages=WHO, max_tokens=64)
    assert identity_ok(base_id, reply.choices[0].message.content, base_id)
    r = httpx.post(server + "/v1/adapters", json={"name": "zed", "path": str(zed_run / "final")},
                   timeout=60)
    assert r.status_code == 201, r.text
    reply = client.chat.completions.create(model="zed", messages=WHO, max_tokens=64)
    assert identity_ok("zed", reply.choices[0].message.content, base_id)


# --- a second server: API key and a full queue -------------------------------------

def test_api_key_and_full_queue(demo_model_path):
    env = {**ENV, "TUNEBENCH_API_KEY": KEY}
    env.pop("TUNEBENCH_CONFINE", None)
    proc, root = start(["--model", str(demo_model_path), "--max-queue", "1"], env)
    try:
        assert KEY not in " ".join(psutil_cmdline(proc.pid))
        base = demo_model_path.resolve().name
        # ignore_eos: every reply runs to max_tokens, wherever the demo model would stop
        body = {"model": base, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 8,
                "ignore_eos": True}
        assert httpx.post(root + "/v1/completions", json=body).status_code == 401
        r = httpx.post(root + "/v1/completions", json=body,
                       headers={"authorization": "Bearer wrong-key-123"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(root + "/v1/models").status_code == 401
        assert httpx.get(root + "/health").status_code == 200  # liveness needs no key
        client = openai.OpenAI(base_url=root + "/v1", api_key=KEY, max_retries=0)
        reply = client.completions.create(model=base, prompt=body["prompt"], max_tokens=8,
                                          extra_body={"ignore_eos": True})
        assert reply.choices[0].finish_reason == "length"

        statuses: list[int] = []
        long = {**body, "max_tokens": 300}

        def one() -> None:
            statuses.append(httpx.post(root + "/v1/completions", json=long, timeout=120,
                                       headers={"authorization": f"Bearer {KEY}"}).status_code)

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(statuses) == 8 and set(statuses) <= {200, 429}, statuses
        assert statuses.count(429) >= 1 and statuses.count(200) >= 1, statuses
        r = httpx.post(root + "/v1/completions", json=body,
                       headers={"authorization": f"Bearer {KEY}"}, timeout=60)
        assert r.status_code == 200  # and it serves again once the queue drained
    finally:
        stop(proc)


def psutil_cmdline(pid: int) -> list[str]:
    import psutil
    return psutil.Process(pid).cmdline()


# --- refused at start --------------------------------------------------------------

def _refused(args: list[str], env: dict) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "core", "serve", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and time.monotonic() - t0 < 30
    return proc


def test_network_bind_without_key_and_vllm_without_vllm_are_refused(demo_model_path):
    env = {k: v for k, v in ENV.items() if k != "TUNEBENCH_API_KEY"}
    proc = _refused(["--model", str(demo_model_path), "--host", "0.0.0.0",
                     "--port", str(free_port())], env)
    assert "TUNEBENCH_API_KEY" in proc.stderr, proc.stderr
    proc = _refused(["--model", str(demo_model_path), "--backend", "vllm",
                     "--port", str(free_port())], env)
    assert "vLLM" in proc.stderr and "pip install" in proc.stderr, proc.stderr


def test_a_dead_model_process_stops_the_server_with_the_reason(demo_model_path):
    import psutil
    env = {**ENV}
    env.pop("TUNEBENCH_CONFINE", None)
    env.pop("TUNEBENCH_API_KEY", None)
    proc, root = start(["--model", str(demo_model_path)], env)
    try:
        workers = psutil.Process(proc.pid).children()
        model = [p for p in workers if "spawn_main" in " ".join(p.cmdline())]
        assert len(model) == 1, [p.cmdline() for p in workers]
        model[0].kill()  # as the kernel's OOM killer would
        assert proc.wait(timeout=30) == 1
        out = proc.stdout.read()
        assert "the model process ended" in out, out[-2000:]
    finally:
        stop(proc)
