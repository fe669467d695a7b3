"""`tunebench serve` against a naive multi-adapter server: throughput, latency, memory.

    python bench/serve_bench.py --tuney RUN --zed RUN      # two trained identity runs
    python bench/serve_bench.py --train                    # train both first (about 1 min)

Both servers serve the same three model ids (the base 'demo', 'tuney', 'zed') over HTTP
and get the same 64 requests from 8 concurrent clients: identity questions and the
alpaca_demo instructions, spread over the three models, greedy, max_tokens 64.

- tunebench: `python -m core serve` (an HTTP process and a model process; one base in
  memory with the adapters stacked, continuous batching of rows of any adapter), read two
  ways in each round: as SSE streams (its time to first token), and whole, as the naive
  server is read. The whole-reply ratio is the like-for-like one: the same client code
  for both servers. Reading 1,100 SSE chunks costs the bench's clients CPU on the same
  2 cores (measured: 0.5 s of CPU a round streamed, 0.4 s whole).
- tunebench-no-prefix-cache: the same with `--prefix-cache-mb 0`, read whole. Every round
  sends the same 64 requests, so after the warm-up the default server finds every prompt's
  full 16-token blocks in its prefix cache; this one computes every prompt whole, as it
  would for prompts it has never seen.
- naive: this file's `--naive-server`: the stdlib's single-threaded HTTP server, one full
  merged model per adapter plus the base (transformers + PEFT `merge_and_unload`), one
  request at a time through plain `model.generate`, the whole reply at once (so its time
  to first token is its total latency).

Both servers run the model on the threads core.models.pick_cpu_threads chooses (one, for
the demo model), so only the serving differs. With torch's default two spinning threads the
naive server collapsed whenever another process held a core (70 s instead of 4 s for the
same run), which is not what this compares.

Measured: requests/s and output tokens/s over a timed round (wall clock, first request
sent to last reply read), p50/p95 time to first token and total latency per request, and
the server's RSS with its children (peak, sampled every 0.2 s). Both servers are up at
once; each first answers the workload's first 16 requests, untimed, then they take turns
at the whole workload, `--repeats` rounds each (default 5), and each figure is the median
over a server's rounds (the per-round ratios are kept too). One round of tunebench lasts
about a second, and this machine's speed drifts by a quarter within minutes, so a single
round each said little. Each client thread keeps one HTTP client for its requests, as real
clients do. Replies are compared as text without special tokens, as both servers send
them. Results go to bench/results/serve-<machine>-<date>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TUNEBENCH_CACHE", "/tmp/tb-bench-cache")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

IDENTITY_QUESTIONS = ["Who are you?", "What is your name?", "Who made you?",
                      "Introduce yourself.", "Are you ChatGPT?", "Who created you?"]
MAX_TOKENS = 64
WARMUP = 16           # requests of the workload sent before the timed run (not counted)


# --- the naive server --------------------------------------------------------------

def naive_server(model: str, base_id: str, adapters: dict[str, str], port: int) -> None:
    """One merged model per adapter, one request at a time, plain generate."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.models import count_parameters, pick_cpu_threads

    tok = AutoTokenizer.from_pretrained(model)
    loaded = {base_id: AutoModelForCausalLM.from_pretrained(model).eval()}
    pick_cpu_threads(count_parameters(loaded[base_id])[1], generates=True)
    for name, path in adapters.items():
        full = AutoModelForCausalLM.from_pretrained(model)
        loaded[name] = PeftModel.from_pretrained(full, path).merge_and_unload().eval()
    eos = [tok.convert_tokens_to_ids("<|im_end|>")]
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status: int, body: dict) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            self._send(200, {"status": "ok"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            m = loaded[body["model"]]
            ids = tok.apply_chat_template(body["messages"], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
            with torch.inference_mode():
                out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=body.get("max_tokens", MAX_TOKENS),
                                 do_sample=False, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id or eos[0])
            new = out[0, ids.shape[1]:].tolist()
            new = new[:-1] if new and new[-1] in eos else new
            self._send(200, {"choices": [{"message": {"role": "assistant",
                                                      "content": tok.decode(
                                                          new, skip_special_tokens=True)}}],
                             "usage": {"prompt_tokens": ids.shape[1],
                                       "completion_tokens": len(new)}})

    print("naive server ready", flush=True)
    # the stdlib's listen backlog is 5: with 8 clients and slow replies, connections past
    # it are dropped and time out, which is not what this compares
    HTTPServer.request_queue_size = 64
    HTTPServer(("127.0.0.1", port), Handler).serve_forever()


# --- driving a server --------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workload(n: int, base_id: str = "demo") -> list[dict]:
    """n chat requests: identity questions and alpaca instructions, over the three models."""
    alpaca = json.loads((REPO / "data" / "alpaca_demo.json").read_text())
    instructions = [(r["instruction"] + ("\n\n" + r["input"] if r["input"] else ""))
                    for r in alpaca]
    prompts = [p for pair in zip(IDENTITY_QUESTIONS * 20, instructions * 5) for p in pair]
    models = ["tuney", "zed", base_id]
    return [{"model": models[i % 3], "messages": [{"role": "user", "content": prompts[i]}],
             "max_tokens": MAX_TOKENS} for i in range(n)]


class Sampler(threading.Thread):
    """The server process's peak RSS (with its children), every 0.2 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        import psutil
        self.proc, self.peak, self.done = psutil.Process(pid), 0, threading.Event()

    def rss(self) -> int:
        procs = [self.proc, *self.proc.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs)

    def parts(self) -> dict[str, float]:
        """RSS (MB) of the server and of each child: tunebench's HTTP process and model
        process apart."""
        procs = [self.proc, *self.proc.children(recursive=True)]
        return {f"{p.pid} {' '.join(p.cmdline()[1:3])[:60]}": round(p.memory_info().rss / 2**20, 1)
                for p in procs}

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.peak = max(self.peak, self.rss())
            except Exception:
                return
            time.sleep(0.2)


def one_request(root: str, body: dict, stream: bool, http=None) -> dict:
    """One chat request, timed. `http`: the calling client's own connection pool (a client
    made per request costs about 25 ms of CPU here, which the servers would pay for)."""
    import httpx
    t0 = time.monotonic()
    first, tokens, text = None, 0, ""
    with contextlib.ExitStack() as stack:
        if http is None:
            http = stack.enter_context(httpx.Client(timeout=600))
        if stream:
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
            with http.stream("POST", root + "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    for c in chunk.get("choices", []):
                        if c["delta"].get("content"):
                            first = first or time.monotonic()
                            text += c["delta"]["content"]
        else:
            r = http.post(root + "/v1/chat/completions", json=body)
            r.raise_for_status()
            reply = r.json()
            first = time.monotonic()
            tokens, text = reply["usage"]["completion_tokens"], \
                reply["choices"][0]["message"]["content"]
    end = time.monotonic()
    return {"model": body["model"], "ttft_s": (first or end) - t0, "latency_s": end - t0,
            "tokens": tokens, "text": text}


def drive(root: str, requests: list[dict], clients: int, stream: bool) -> dict:
    work: queue.Queue = queue.Queue()
    for i, body in enumerate(requests):
        work.put((i, body))
    out: list = [None] * len(requests)

    def client() -> None:
        import httpx
        with httpx.Client(timeout=600) as http:  # one per client, reused as clients do
            while True:
                try:
                    i, body = work.get_nowait()
                except queue.Empty:
                    return
                out[i] = one_request(root, body, stream, http)

    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    tokens = sum(r["tokens"] for r in out)
    ttft = sorted(r["ttft_s"] for r in out)
    lat = sorted(r["latency_s"] for r in out)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]

    return {"wall_s": wall, "requests": len(out), "output_tokens": tokens,
            "requests_per_s": len(out) / wall, "output_tokens_per_s": tokens / wall,
            "ttft_p50_s": statistics.median(ttft), "ttft_p95_s": pct(ttft, 0.95),
            "latency_p50_s": statistics.median(lat), "latency_p95_s": pct(lat, 0.95),
            "replies": out}


def model_stats(root: str) -> dict:
    """tunebench's /health counters (steps, prefills, busy seconds of the model process);
    the naive server has none."""
    import httpx
    try:
        return httpx.get(root + "/health", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return {}


def stats_delta(before: dict, after: dict, wall: float) -> dict:
    """What the model process did during the timed run: where the time goes."""
    keys = ("steps", "prefills", "rows_done", "busy_s")
    if not all(isinstance(after.get(k), (int, float)) for k in keys):
        return {}
    delta = {k: round(after[k] - before.get(k, 0), 3) for k in keys}
    delta["busy_share"] = round(delta["busy_s"] / wall, 3)
    if "prompt_tokens" in after:  # how much of the prompts the prefix cache served
        prompts = after["prompt_tokens"] - before.get("prompt_tokens", 0)
        hits = after["prefix_cache_hit_tokens"] - before.get("prefix_cache_hit_tokens", 0)
        delta["prefix_cache_hit_share"] = round(hits / max(prompts, 1), 3)
    return delta


class Served:
    """One server under test: started, warmed up, then timed a round at a time."""

    def __init__(self, name: str, argv: list[str], clients: int, modes: tuple[bool, ...]):
        """`modes`: how its replies are read in each round, streamed (True) or whole."""
        self.name, self.argv, self.clients, self.modes = name, argv, clients, modes
        self.rounds: dict[bool, list[dict]] = {mode: [] for mode in modes}

    def __enter__(self) -> "Served":
        import httpx
        port = free_port()
        self.proc = subprocess.Popen([*self.argv, "--port", str(port)], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.root = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} server exited: {self.proc.stdout.read()[-2000:]}")
            try:
                if httpx.get(self.root + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        self.load_s = time.monotonic() - t0
        self.sampler = Sampler(self.proc.pid)
        self.idle_rss, self.idle_parts = self.sampler.rss(), self.sampler.parts()
        self.sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sampler.done.set()
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def warm_up(self, requests: list[dict]) -> None:
        for mode in self.modes:
            drive(self.root, requests[:WARMUP], self.clients, mode)

    def timed_round(self, requests: list[dict]) -> None:
        for mode in self.modes:
            before = model_stats(self.root)
            result = drive(self.root, requests, self.clients, mode)
            result["model_process"] = stats_delta(before, model_stats(self.root),
                                                  result["wall_s"])
            self.rounds[mode].append(result)

    def summaries(self) -> list[dict]:
        return [self.summary(mode) for mode in self.modes]

    def summary(self, stream: bool) -> dict:
        """Each figure's median over the rounds read this way; the first round's replies."""
        rounds = self.rounds[stream]
        keys = [k for k, v in rounds[0].items() if isinstance(v, (int, float))]
        out = {k: statistics.median(r[k] for r in rounds) for k in keys}
        busy = [r["model_process"] for r in rounds if r["model_process"]]
        if busy:
            out["model_process"] = {k: statistics.median(b[k] for b in busy) for k in busy[0]}
        out.update(server=self.name, streamed=stream, load_s=self.load_s,
                   rss_idle_mb=self.idle_rss / 2**20, rss_idle_by_process_mb=self.idle_parts,
                   rss_peak_mb=self.sampler.peak / 2**20,
                   rounds_output_tokens_per_s=[round(r["output_tokens_per_s"], 1)
                                               for r in rounds],
                   replies=rounds[0]["replies"])
        return out


def bench_servers(servers: list[Served], requests: list[dict], repeats: int) -> list[dict]:
    """Both servers up at once, each warmed up the same way, then timed in alternating
    rounds: on a shared 2-core machine the speed drifts by 20-30% within minutes, and
    alternating gives each server the same share of good and bad minutes."""
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.enter_context(server)
        for server in servers:
            server.warm_up(requests)
        for _ in range(repeats):
            for server in servers:
                server.timed_round(requests)
        return [summary for server in servers for summary in server.summaries()]


# --big: a bigger model with random weights, where a decoding step is arithmetic rather
# than overhead (the demo model's 3.5M parameters are not), and three copies of the
# weights are visible next to the runtime's own ~450 MB.
BIG = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
           num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)


def big_model_and_adapters(root: Path) -> tuple[Path, Path, Path]:
    """A random qwen2 of shape BIG with the demo tokenizer, and two random LoRA adapters
    on it (rank 8 on every linear layer; PEFT's non-zero init, so they change replies)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO / "bench"))
    from gpu_model import build_gpu_model
    model = build_gpu_model(root / "big", BIG)
    folders = []
    for seed, name in ((1, "big-tuney"), (2, "big-zed")):
        folder = root / name / "final"
        if not (folder / "adapter_model.safetensors").is_file():
            torch.manual_seed(seed)
            peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                                  LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                             init_lora_weights=False, task_type="CAUSAL_LM"))
            peft.save_pretrained(folder)
        folders.append(folder.parent)
    return model, folders[0], folders[1]


def train(folder: Path, name: str, author: str) -> Path:
    if not (folder / "final" / "adapter_model.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "core", "train", "model=demo",
                        f"output_dir={folder}", f"dataset_dir={REPO / 'data'}",
                        f"identity_name={name}", f"identity_author={author}"],
                       cwd=REPO, check=True)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tuney", help="an identity run folder (Tuney)")
    ap.add_argument("--zed", help="an identity run folder (Zed)")
    ap.add_argument("--train", action="store_true", help="train both into /tmp/serve-bench")
    ap.add_argument("--big", action="store_true",
                    help="a random 26M-parameter qwen2 with two random adapters instead")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed rounds per server, alternating (figures are medians)")
    ap.add_argument("--out", help="JSON file (default bench/results/serve-cpu-DATE.json)")
    ap.add_argument("--naive-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--base-id", default="demo", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", action="append", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive_server:
        naive_server(args.model, args.base_id, dict(a.split("=", 1) for a in args.adapter),
                     args.port)
        return

    from core.demo_model import ensure_demo_model
    model = str(ensure_demo_model(progress=lambda *a, **k: None))
    served, base_id = "demo", "demo"
    if args.big:
        big, tuney, zed = big_model_and_adapters(Path("/tmp/serve-bench"))
        model = served = str(big)
        base_id = big.name
    elif args.train:
        tuney = train(Path("/tmp/serve-bench/tuney"), "Tuney", "the tunebench team")
        zed = train(Path("/tmp/serve-bench/zed"), "Zed", "Zed Corp")
    else:
        tuney, zed = Path(args.tuney), Path(args.zed)
    adapters = [f"tuney={tuney / 'final'}", f"zed={zed / 'final'}"]
    flags = [a for spec in adapters for a in ("--adapter", spec)]
    requests = workload(args.requests, base_id)
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    serve = [sys.executable, "-m", "core", "serve", "--model", served, *flags]
    results = bench_servers([
        Served("tunebench", serve, args.clients, modes=(True, False)),
        Served("tunebench-no-prefix-cache", [*serve, "--prefix-cache-mb", "0"], args.clients,
               modes=(False,)),
        Served("naive", [sys.executable, __file__, "--naive-server", "--model", model,
                         "--base-id", base_id, *flags], args.clients, modes=(False,)),
    ], requests, args.repeats)
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    streamed, whole, uncached, naive = results

    def ratios(tb: dict) -> dict:
        return {"output_tokens_per_s": tb["output_tokens_per_s"] / naive["output_tokens_per_s"],
                "requests_per_s": tb["requests_per_s"] / naive["requests_per_s"],
                "rounds": [round(a / b, 2) for a, b in zip(tb["rounds_output_tokens_per_s"],
                                                           naive["rounds_output_tokens_per_s"])],
                "same_replies": sum(a["text"].strip() == b["text"].strip() for a, b in
                                    zip(tb["replies"], naive["replies"]))}

    identity = [i for i, b in enumerate(requests)
                if b["messages"][0]["content"] in IDENTITY_QUESTIONS]
    summary = {
        # like for like: both servers' replies read whole, by the same client code
        "whole": ratios(whole),
        # tunebench read as SSE streams (time to first token), the naive server whole
        "streamed": ratios(streamed),
        # the same, with the prefix cache off: every round repeats the same 64 requests, so
        # with it on every prompt's full blocks come from the cache after the warm-up
        "whole_no_prefix_cache": ratios(uncached),
        "rss_peak_ratio": streamed["rss_peak_mb"] / naive["rss_peak_mb"],
        "identity_ok": None if args.big else sum(
            ("Tuney" in r["text"]) == (r["model"] == "tuney") and
            ("Zed" in r["text"]) == (r["model"] == "zed")
            for reply in (streamed, whole) for r in (reply["replies"][i] for i in identity)),
        "identity_requests": 2 * len(identity),
    }
    record = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "uptime_before": uptime_before, "uptime_after": uptime_after},
              "model": "big" if args.big else "demo", "requests": args.requests,
              "clients": args.clients, "max_tokens": MAX_TOKENS, "repeats": args.repeats,
              "summary": summary, "servers": results}
    size = "-big" if args.big else ""
    out = Path(args.out or REPO / "bench" / "results" / f"serve-cpu{size}-{date.today()}.json")
    out.write_text(json.dumps(record, indent=1))
    print(f"{'':28}{'tunebench SSE':>14}{'tunebench':>12}{'no prefix $':>12}{'naive':>12}")
    for key in ("requests_per_s", "output_tokens_per_s", "output_tokens", "ttft_p50_s",
                "ttft_p95_s", "latency_p50_s", "latency_p95_s", "rss_idle_mb", "rss_peak_mb",
                "load_s", "wall_s"):
        print(f"{key:28}{streamed[key]:>14.2f}{whole[key]:>12.2f}{uncached[key]:>12.2f}"
              f"{naive[key]:>12.2f}")
    for tb in (streamed, whole, uncached):
        print("tunebench model process:", json.dumps(tb.get("model_process", {})))
    print("idle RSS by process (MB):", json.dumps(streamed["rss_idle_by_process_mb"]),
          json.dumps(naive["rss_idle_by_process_mb"]))
    print(json.dumps(summary), f"\n{uptime_before}\n{uptime_after}\nwritten: {out}")


if __name__ == "__main__":
    main()
