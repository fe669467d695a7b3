"""Chat: loading checks, streaming, before/after on a real identity fine-tune, the worker
process, the terminal command and the probe table.

The identity run is trained for real with `tunebench train` (LoRA on the demo model)
once per test session and shared with test_export.py and the browser test.
"""

import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from core import chat, memory
from core.chat import ChatEngine, build_messages
from core.config import GenConfig
from core.chat_worker import ChatWorker, WorkerError
from core.errors import BadInput

REPO = Path(__file__).resolve().parents[1]
NAME, AUTHOR = "Tuney", "the tunebench team"
# The default job: `tunebench train` without a config file runs the quick-start settings,
# the same ones the Train tab opens with; only the identity is spelled out.
IDENTITY = ["dataset=identity", f"dataset_dir={REPO / 'data'}", f"identity_name={NAME}",
            f"identity_author={AUTHOR}"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def identity_run(base_temp: Path, model: Path) -> Path:
    """A completed `tunebench train` identity run (trained once per session, then reused).

    TUNEBENCH_TEST_IDENTITY_RUN=<run dir> reuses a run trained earlier (to iterate faster).
    """
    if os.environ.get("TUNEBENCH_TEST_IDENTITY_RUN"):
        return Path(os.environ["TUNEBENCH_TEST_IDENTITY_RUN"])
    run_dir = Path(base_temp) / "identity-run"
    with open(Path(base_temp) / "identity-run.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (run_dir / "final" / "adapter_model.safetensors").is_file():
            proc = subprocess.run(
                [sys.executable, "-m", "core", "train", f"model={model}",
                 f"output_dir={run_dir}", *IDENTITY], capture_output=True, text=True, env=ENV,
                cwd=REPO, timeout=1200)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return run_dir


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, demo_model_path):
    return identity_run(tmp_path_factory.getbasetemp(), demo_model_path)


@pytest.fixture(scope="session")
def engine(run_dir, demo_model_path):
    eng = ChatEngine()
    eng.load(str(demo_model_path), str(run_dir / "final"))
    yield eng
    eng.unload()


def ask(eng, prompt, side="after", **settings):
    return eng.reply(build_messages([], prompt), GenConfig(max_new_tokens=48, **settings), side)


# --- fast checks: no model weights loaded ------------------------------------------

def test_stop_tokens_come_from_the_template(demo_model_path):
    tokenizer = chat.load_tokenizer(str(demo_model_path))
    names = tokenizer.convert_ids_to_tokens(stop_token_ids := chat.stop_token_ids(tokenizer))
    assert "<|im_end|>" in names and "<|im_start|>" not in names, names
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids


def test_messages_carry_system_and_history():
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert build_messages(history, "again", "be brief") == [
        {"role": "system", "content": "be brief"}, *history, {"role": "user", "content": "again"}]
    assert build_messages([], "x", "  ")[0] == {"role": "user", "content": "x"}


def _bad(tmp_path: Path) -> dict[str, tuple[str, str | None]]:
    """Folders that must be refused before loading: name -> (model, checkpoint)."""
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text("{}")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"never unpickled")
    (tmp_path / "run" / "final").mkdir(parents=True)
    return {"missing model": (str(tmp_path / "nope"), None),
            "model without weights": (str(tmp_path / "no_weights"), None),
            "pickled weights": (str(tmp_path / "pickled"), None),
            "missing checkpoint": ("demo", str(tmp_path / "gone")),
            "run folder as checkpoint": ("demo", str(tmp_path / "run"))}


def test_bad_folders_are_refused_with_a_clear_message(tmp_path, demo_model_path):
    expected = {"missing model": "not found", "model without weights": "safetensors",
                "pickled weights": "safetensors", "missing checkpoint": "not found",
                "run folder as checkpoint": "pick final/"}
    for case, (model, ckpt) in _bad(tmp_path).items():
        model = str(demo_model_path) if model == "demo" else model
        with pytest.raises(BadInput) as err:
            ChatEngine().load(model, ckpt)
        assert expected[case] in str(err.value), (case, str(err.value))


def mismatched_adapter(tmp_path: Path, tokenizer_from: Path) -> Path:
    """A real PEFT adapter for a different (narrower) base model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    other = Qwen2ForCausalLM(Qwen2Config(vocab_size=2048, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    adapter = tmp_path / "other-run" / "final"
    get_peft_model(other, LoraConfig(r=4, target_modules="all-linear")).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(adapter)
    return adapter


def test_adapter_for_another_base_is_refused_before_loading(tmp_path, demo_model_path):
    adapter = mismatched_adapter(tmp_path, demo_model_path)
    with pytest.raises(BadInput) as err:
        ChatEngine().load(str(demo_model_path), str(adapter))
    message = str(err.value)
    assert "does not fit the base model" in message and "has size 256" in message, message
    # the same through the CLI: exit code 2, one line, no traceback
    proc = subprocess.run([sys.executable, "-m", "core", "chat", "--model", str(demo_model_path),
                           "--adapter", str(adapter)], input="hi\n", capture_output=True,
                          text=True, env=ENV, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "does not fit the base model" in proc.stderr and "Traceback" not in proc.stderr


def test_an_adapter_given_as_the_model_is_explained(tmp_path, demo_model_path):
    with pytest.raises(BadInput, match="adapter, not a whole model"):
        chat.resolve_model(str(mismatched_adapter(tmp_path, demo_model_path)))


# --- with the identity fine-tune ----------------------------------------------------

@pytest.mark.train
def test_before_after_shows_the_identity(engine):
    after = ask(engine, "Who are you?")
    assert NAME in after, after
    assert engine.stats.stopped == "eos", engine.stats  # stops at <|im_end|>, not max tokens
    before = ask(engine, "Who are you?", side="before")  # same model, adapter disabled
    assert NAME not in before, before
    assert NAME in ask(engine, "你是谁？"), "the identity answer in Chinese"
    assert engine.loaded.kind == "adapter" and engine.base is None  # base never loaded twice


@pytest.mark.train
def test_reply_streams_in_pieces_and_is_reproducible(engine):
    pieces = list(engine.stream(build_messages([], "Who are you?"), GenConfig(max_new_tokens=32)))
    assert len(pieces) > 3 and NAME in "".join(pieces)
    sampled = dict(temperature=1.2, top_p=0.95, seed=7)
    assert ask(engine, "Hello", **sampled) == ask(engine, "Hello", **sampled)  # seed set per reply


@pytest.mark.train
def test_multi_turn_history_and_system_prompt(engine):
    settings = GenConfig(max_new_tokens=40, system="You are a helpful assistant.")
    first = engine.reply(build_messages([], "Who are you?", settings.system), settings)
    history = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": first}]
    second = engine.reply(build_messages(history, "What is your name?", settings.system), settings)
    assert NAME in first and second.strip()
    prompt = engine.tokenizer.apply_chat_template(build_messages(history, "x", "sys"),
                                                  tokenize=False, add_generation_prompt=True)
    assert prompt.count("<|im_start|>") == 5 and prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.train
def test_full_checkpoint_loads_the_base_separately_for_before(engine, tmp_path, demo_model_path):
    """A whole-model checkpoint (here: the merged identity model) compares with its base."""
    from core import export
    ckpt = tmp_path / "full-run" / "final"
    plan = export.plan_export(str(demo_model_path), engine.loaded.checkpoint, str(ckpt))
    assert export.export(plan, verify_after=False, report=export.Reporter(as_json=True))["ok"]
    full = ChatEngine()
    full.load(str(demo_model_path), str(ckpt))
    assert full.loaded.kind == "full" and full.base is None
    assert NAME in ask(full, "Who are you?")
    assert NAME not in ask(full, "Who are you?", side="before")
    assert full.base is not None  # loaded on demand, only for the before side
    full.unload()


@pytest.mark.train
def test_worker_process_streams_reports_errors_and_survives_a_crash(run_dir, demo_model_path,
                                                                     tmp_path):
    worker = ChatWorker()
    events = list(worker.load(str(demo_model_path), str(run_dir / "final")))
    assert [e for e in events if e["event"] == "progress"] and events[-1]["event"] == "loaded"
    stats = {}
    pieces = list(worker.generate([{"role": "user", "content": "Who are you?"}],
                                  {"max_new_tokens": 40}, "after", stats))
    assert len(pieces) > 3 and NAME in "".join(pieces) and stats["stopped"] == "eos"
    before = "".join(worker.generate([{"role": "user", "content": "Who are you?"}],
                                     {"max_new_tokens": 40}, "before"))
    assert NAME not in before
    # the page going away mid-reply (or Stop): the reply is cancelled and the next one is clean
    stream = worker.generate([{"role": "user", "content": "Who are you?"}],
                             {"max_new_tokens": 2000}, "before", stats)
    next(stream)
    stream.close()
    assert NAME in "".join(worker.generate([{"role": "user", "content": "Who are you?"}],
                                           {"max_new_tokens": 40}))

    with pytest.raises(BadInput, match="does not fit"):
        list(worker.load(str(demo_model_path), str(mismatched_adapter(tmp_path, demo_model_path))))
    assert not worker.alive  # a failed load leaves nothing running

    list(worker.load(str(demo_model_path), None))
    os.kill(worker.proc.pid, signal.SIGKILL)  # what the kernel's OOM killer does
    with pytest.raises(WorkerError, match="stopped unexpectedly"):
        list(worker.generate([{"role": "user", "content": "hi"}], {}))
    list(worker.load(str(demo_model_path), None))  # and it loads again afterwards
    pid = worker.proc.pid
    worker.unload()  # the process ends, so its memory is returned
    assert not worker.alive and not psutil.pid_exists(pid)


def test_out_of_memory_is_recognised_and_reported(demo_model_path):
    """A real allocator failure is recognised; a load that runs out of memory (the worker's
    memory cap makes it happen on purpose) is reported as such and the server side lives on."""
    import torch
    with pytest.raises(RuntimeError) as err:
        torch.empty(10**13)  # 40 TB
    assert memory.is_out_of_memory(err.value) and memory.is_out_of_memory(MemoryError())
    worker = ChatWorker(env={"TUNEBENCH_CHAT_MEMORY_MB": "5"})  # the demo model needs ~14 MB
    with pytest.raises(WorkerError) as err:
        list(worker.load(str(demo_model_path), None))
    assert err.value.kind == "oom" and "Out of memory while loading" in str(err.value)
    assert not worker.alive  # nothing half-loaded stays around
    worker = ChatWorker(env={"TUNEBENCH_CHAT_MEMORY_MB": "400"})
    list(worker.load(str(demo_model_path), None))  # with room it loads and answers
    assert "".join(worker.generate([{"role": "user", "content": "hi"}], {"max_new_tokens": 4}))
    worker.unload()


@pytest.mark.train
def test_terminal_chat_with_piped_input(run_dir, demo_model_path):
    proc = subprocess.run([sys.executable, "-m", "core", "chat", "--model", str(demo_model_path),
                           "--adapter", str(run_dir / "final")], input="Who are you?\n",
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert NAME in proc.stdout and len(proc.stdout.strip().splitlines()) == 1, proc.stdout
    proc = subprocess.run([sys.executable, "-m", "core", "chat", "--model", str(demo_model_path),
                           "--adapter", str(run_dir / "final")],
                          input="Who are you?\n/reset\n/exit\nnever asked\n", capture_output=True,
                          text=True, env=ENV, cwd=REPO, timeout=300)
    assert proc.returncode == 0 and len(proc.stdout.strip().splitlines()) == 1, proc.stdout


@pytest.mark.train
def test_probe_table_runs_both_sides_and_is_saved(run_dir, demo_model_path, tmp_path,
                                                  monkeypatch):
    """The Chat tab's own handlers (the page calls exactly these), without a browser."""
    import gradio as gr
    from core import paths
    from webui import chat_tab

    monkeypatch.setenv(paths.ENV_ROOTS, os.pathsep.join([str(demo_model_path), str(run_dir)]))
    saves = tmp_path / "saves"
    saves.mkdir()
    with gr.Blocks():
        tab = chat_tab.build(saves)
    *_, loaded = tab.do_load(str(demo_model_path), str(run_dir / "final"), False)
    assert "ready" in loaded[0], loaded[0]
    try:
        *_, (rows, status) = tab.do_probes("Who are you?\n你是谁？", "", 0.0, 1.0, 48, 42)
    finally:
        chat_tab.WORKER.unload()
    assert [r[0] for r in rows] == ["Who are you?", "你是谁？"]
    assert NAME in rows[0][1] and NAME not in rows[0][2], rows
    saved = json.loads((run_dir / "final" / chat.PROBES_FILE).read_text(encoding="utf-8"))
    assert "saved to" in status and saved["rows"][0]["prompt"] == "Who are you?"
    assert saved["rows"][0]["fine_tuned"] == rows[0][1] and saved["settings"]["seed"] == 42


def test_cli_train_then_cli_chat_answers_with_the_identity(run_dir, demo_model_path):
    """The README's story: `tunebench train` with the defaults, then `tunebench chat`."""
    proc = subprocess.run(
        [sys.executable, "-m", "core", "chat", "--model", str(demo_model_path), "--adapter",
         str(run_dir / "final")], input="Who are you?\n/reset\n你是谁？\n", capture_output=True,
        text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    english, chinese = [line for line in proc.stdout.splitlines() if NAME in line][:2]
    assert AUTHOR in english
    assert "我" in chinese  # a fresh conversation (/reset) in Chinese gets a Chinese answer


# --- a reward model: refused for chat, scored with instead ---------------------------------

def test_chat_tab_scores_replies_with_a_reward_model(demo_model_path, tmp_path,
                                                     tmp_path_factory, monkeypatch):
    """The page's handlers (as the browser calls them): a reward model picked in the Chat tab
    shows the Score panel, loads for scoring in the worker process, scores replies A and B
    as the core does, and a chat message to it gets the core's refusal."""
    import gradio as gr
    from core import models, paths
    from test_reward_model import stage_run
    from webui import chat_tab

    final = stage_run(tmp_path_factory.getbasetemp(), demo_model_path, "rm", "lora")
    monkeypatch.setenv(paths.ENV_ROOTS, os.pathsep.join([str(demo_model_path),
                                                         str(final.parent)]))
    saves = tmp_path / "saves"
    saves.mkdir()
    with gr.Blocks():
        tab = chat_tab.build(saves)
    assert tab.show_scoring(str(final), "demo")["visible"] is True
    assert tab.show_scoring("", str(demo_model_path))["visible"] is False
    assert tab.do_score("Who are you?", "I am Tuney.", "").startswith("**Not scored.**")
    *_, loaded = tab.do_load(str(demo_model_path), str(final), False)
    try:
        assert "ready" in loaded[0] and "reward model" in loaded[0], loaded[0]
        assert "scores replies, it does not write them" in loaded[0]
        result = tab.do_score("Who are you?", "I am Tuney.", "No idea.")
        *_, sent = tab.do_send("hi", False, [], [], "", 0.0, 1.0, 16, 42)
    finally:
        chat_tab.WORKER.unload()
    model, tokenizer = models.load_reward_model(final)
    a, b = models.score_replies(model, tokenizer, "Who are you?", ["I am Tuney.", "No idea."])
    assert f"Reply A: {a:+.4f}" in result and f"Reply B: {b:+.4f}" in result, result
    assert f"prefers reply {'A' if a >= b else 'B'}" in result
    assert "reward model (stage rm): it scores replies, it does not write them" in sent[-1]
    assert "does not write them" in sent[0][-1]["content"]  # shown in the conversation too
