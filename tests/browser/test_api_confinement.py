"""Every named endpoint of the real page, called the way any HTTP client can, with paths
that point out of the allowed folders: nothing outside is read, and nothing is written.

The test lists the endpoints from the page's own API description, so endpoints that
later issues add (Evaluate, serving, export formats, the queue) are covered without
anyone remembering to add them here. Each text and list parameter of each endpoint
gets each hostile value in turn, the other parameters keeping their defaults:
absolute paths out, `~` paths, `..` paths, and symlinks planted inside the roots
that point out. Outside, a canary folder looks like everything tunebench opens (a
dataset, a registry, a run, an adapter, a model, a config), and every file in it
carries a unique token. No response may carry the token, and no file outside the
roots may appear or change.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from servers import REPO, abort_all_runs, start_server, stop_server

from core import job_queue, runs

pytestmark = [pytest.mark.browser]

TOKEN = f"CANARY-{uuid.uuid4().hex[:12]}"
CALL_TIMEOUT_S = 120


# --- the scene: a project, an outside folder full of canaries, links planted inside ----

def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def make_outside(folder: Path) -> None:
    """A folder that is, at once, a dataset folder, a run, an adapter and a model."""
    record = json.dumps({"instruction": f"{TOKEN} question", "output": f"{TOKEN} answer"})
    _write(folder / "canary.jsonl", record + "\n")
    _write(folder / "dataset_info.json", json.dumps({TOKEN: {"file_name": "canary.jsonl"}}))
    _write(folder / "config.yaml", f"model: {TOKEN}\ndataset: [{TOKEN}]\nidentity_name: {TOKEN}\n")
    _write(folder / "config.json", json.dumps({"model_type": TOKEN}))
    _write(folder / runs.STATUS, json.dumps({
        "state": "completed", "pid": 1, "started_at": "2026-01-01T00:00:00+00:00",
        "ended_at": "2026-01-01T00:01:00+00:00", "exit_code": 0, "error": TOKEN}))
    _write(folder / runs.METRICS, json.dumps({"step": 1, "total_steps": 1, "loss": 1.0,
                                              "epoch": 1, "elapsed_s": 1, "note": TOKEN}) + "\n")
    _write(folder / runs.LOG, f"{TOKEN} log line\n")
    _write(folder / "final" / "adapter_config.json",
           json.dumps({"base_model_name_or_path": TOKEN, "peft_type": "LORA"}))
    _write(folder / "final" / "adapter_model.safetensors", TOKEN)


def plant_links(project: Path, outside: Path) -> None:
    """Symlinks inside the roots that point out, where tunebench looks for things."""
    saves, data = project / "saves", project / "data"
    os.symlink(outside, saves / "linked")                       # a run folder
    os.symlink(outside / "canary.jsonl", data / "linked.jsonl")  # a dataset file
    registry = json.loads((data / "dataset_info.json").read_text())
    registry["linked"] = {"file_name": "linked.jsonl"}           # a registered name
    (data / "dataset_info.json").write_text(json.dumps(registry))
    (saves / "configs").mkdir()
    os.symlink(outside / "config.yaml", saves / "configs" / "linked.yaml")  # a saved config
    (saves / "exports").mkdir()
    os.symlink(outside, saves / "exports" / "linked")           # an exported model


def hostile_values(outside: Path) -> list[str]:
    return [str(outside / "canary.jsonl"), str(outside), str(outside / "final"),
            "~/canary.jsonl", "~", "../outside/canary.jsonl", "data/../../outside",
            "linked", "saves/linked", "saves/linked/final", "data/linked.jsonl",
            "saves/configs/linked.yaml", "saves/exports/linked"]


def busy_run(project: Path) -> subprocess.Popen:
    """A run that counts as running (its pid is alive), so no Start actually trains."""
    sleeper = subprocess.Popen(["sleep", "3600"])
    run_dir = project / "saves" / "busy"
    run_dir.mkdir()
    runs.write_status(run_dir, "running", pid=sleeper.pid)
    return sleeper


def snapshot(*folders: Path) -> dict[str, tuple]:
    """Every file and folder under `folders` (links not followed), with size and mtime."""
    found = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                path = Path(root) / name
                info = path.lstat()
                found[str(path)] = (info.st_size, info.st_mtime_ns)
    return found


# --- raw HTTP, as any client ---------------------------------------------------------

def http(url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 30) -> str:
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as err:
        return err.read().decode("utf-8", errors="replace")


def upload(base: str, path: Path) -> dict:
    """Upload a file through Gradio's upload route; returns the FileData to pass on."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
            f"filename=\"{path.name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    reply = json.loads(http(base + "gradio_api/upload", body,
                            {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
    return {"path": reply[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def call(base: str, endpoint: str, args: list, session: str) -> str:
    """Call a named endpoint in `session`; returns everything the server sent back."""
    body = json.dumps({"data": args, "session_hash": session}).encode()
    started = http(base + "gradio_api/call" + endpoint, body,
                   {"Content-Type": "application/json"})
    try:
        event_id = json.loads(started)["event_id"]
    except (ValueError, KeyError):
        return started  # refused before it ran (e.g. a value not among a dropdown's choices)
    return http(f"{base}gradio_api/call{endpoint}/{event_id}", timeout=CALL_TIMEOUT_S)


def default_for(param: dict, upload_file: dict):
    if param.get("parameter_has_default"):
        return param.get("parameter_default")
    kind = (param.get("type") or {}).get("type")
    if param.get("component") in ("File", "UploadButton"):
        return upload_file
    return {"string": "", "number": 0, "integer": 0, "boolean": False,
            "array": []}.get(kind)


def is_text_or_list(param: dict) -> bool:
    kind = (param.get("type") or {}).get("type")
    return kind in ("string", "array") or param.get("component") in ("Textbox", "Dropdown",
                                                                       "Code")


# --- the test ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scene(tmp_path_factory, demo_model_path):
    base = tmp_path_factory.mktemp("confinement")
    project, outside, home, scratch = (base / n for n in ("project", "outside", "home",
                                                          "scratch"))
    shutil.copytree(REPO / "data", project / "data")
    (project / "saves").mkdir()
    make_outside(outside)
    home.mkdir(), scratch.mkdir()
    shutil.copy(outside / "canary.jsonl", home / "canary.jsonl")  # what "~/..." reaches
    plant_links(project, outside)
    sleeper = busy_run(project)
    env = {"HOME": str(home), "HF_HOME": str(scratch / "hf"), "XDG_CACHE_HOME": str(scratch),
           "MPLCONFIGDIR": str(scratch / "mpl"), "GRADIO_TEMP_DIR": str(scratch / "gradio")}
    server = start_server(project, demo_model_path, **env)
    try:
        yield server, base, outside
    finally:
        stop_server(server.proc)
        # Start, probed while the sleeper "trains", queues runs: take them out of the
        # queue before the sleeper ends, or its runner would train them afterwards.
        abort_all_runs(project)
        sleeper.kill()
        sleeper.wait()


def test_no_endpoint_reads_or_writes_outside_the_roots(scene):
    server, base, outside = scene
    info = json.loads(http(server.url + "gradio_api/info?all_endpoints=true"))
    endpoints = info["named_endpoints"]
    assert len(endpoints) >= 10, sorted(endpoints)   # the page's API really was listed
    innocent = base / "scratch" / "innocent.jsonl"
    innocent.write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n")
    upload_file = upload(server.url, innocent)
    outside_file = {"path": str(outside / "canary.jsonl"), "orig_name": "canary.jsonl",
                    "meta": {"_type": "gradio.FileData"}}
    watched = [outside, base / "home"]
    before, siblings = snapshot(*watched), sorted(p.name for p in base.iterdir())
    # One session for every call, primed by the endpoints that take no input (they fill the
    # pickers' choices as a page load does): a dropdown then accepts whatever the server
    # itself lists, so a run or checkpoint that should not be listed gets through to its
    # handler, as it would for a user who picked it.
    session = uuid.uuid4().hex
    for endpoint, spec in sorted(endpoints.items()):
        if not spec["parameters"] or endpoint.startswith(("/refresh", "/on_load")):
            call(server.url, endpoint, [default_for(p, upload_file) for p in spec["parameters"]],
                 session)
    calls, started, spent = 0, time.monotonic(), {}
    for endpoint, spec in sorted(endpoints.items()):
        params, began = spec["parameters"], time.monotonic()
        defaults = [default_for(p, upload_file) for p in params]
        for i, param in enumerate(params):
            if param.get("component") in ("File", "UploadButton"):
                values = [outside_file]
            elif is_text_or_list(param):
                values = hostile_values(outside)
            else:
                continue
            for value in values:
                if (param.get("type") or {}).get("type") == "array":
                    value = [value]
                args = list(defaults)
                args[i] = value
                reply = call(server.url, endpoint, args, session)
                calls += 1
                assert TOKEN not in reply, (endpoint, param.get("label"), value, reply[:2000])
        spent[endpoint] = time.monotonic() - began
    slowest = sorted(spent.items(), key=lambda item: -item[1])[:6]
    print(f"\n{calls} hostile calls to {len(endpoints)} endpoints in "
          f"{time.monotonic() - started:.0f} s; slowest: "
          + ", ".join(f"{name} {s:.0f} s" for name, s in slowest))
    assert snapshot(*watched) == before, "a file outside the roots appeared or changed"
    assert sorted(p.name for p in base.iterdir()) == siblings
    assert not (outside / "uploads").exists() and not (outside / ".launch.lock").exists()
    clear_queued_runs(base / "project" / "saves")


def clear_queued_runs(saves: Path) -> None:
    """The probes' Starts with settings that pass wait in the queue behind the busy run:
    take them out and remove their folders, so the page test that follows meets the runs
    list it expects (the busy run and no crowd of queued ones)."""
    for entry in job_queue.entries(saves):
        job_queue.cancel(saves, entry.run_dir)
        shutil.rmtree(entry.run_dir)


def test_the_page_refuses_each_finding_as_a_user_meets_it(scene, browser):
    """The review's four cases, clicked through in Chromium: preview of an outside file, a
    `~` dataset at Start, an upload into an outside folder, a symlinked run in saves/."""
    from page_helpers import choose, fill, shot, status_text, table_rows, text_of, wait_until

    server, base, outside = scene
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(server.url)
    page.wait_for_selector("#train-start")
    try:
        assert "linked" not in [row[0] for row in table_rows(page)]  # the symlinked run
        choose(page, "train-dataset", str(outside / "canary.jsonl"))
        page.click("#train-data button")  # open the Data accordion
        page.click("#train-preview-btn")
        wait_until(lambda: "outside the allowed folders" in text_of(page, "train-preview-summary"),
                   30, "the preview to refuse the outside file")
        page.reload()  # a fresh form: the identity dataset, plus the ~ one
        page.wait_for_selector("#train-start")
        # The page has loaded once it lists the runs (and shows the busy one); a Start
        # refusal shown before that would be replaced by the busy run's status.
        wait_until(lambda: "busy" in [row[0] for row in table_rows(page)], 30,
                   "the page to list its runs")
        choose(page, "train-dataset", "~/canary.jsonl")
        page.click("#train-start")
        wait_until(lambda: "~/canary.jsonl" in status_text(page), 30, "Start to refuse ~")
        assert "outside the allowed folders" in status_text(page)
        page.click("#train-advanced button")
        fill(page, "train-dataset-dir", str(outside / "registry"))
        page.click("#train-data button")  # the reload folded the Data accordion again
        innocent = base / "scratch" / "page-upload.jsonl"
        innocent.write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n")
        page.set_input_files("#train-upload input[type=file]", str(innocent))
        wait_until(lambda: "Not registered" in text_of(page, "train-upload-status"), 30,
                   "the upload to be refused")
        assert "outside" in text_of(page, "train-upload-status")
        shot(page, "confinement-refusals")
        assert TOKEN not in page.content()
        assert not (outside / "registry").exists()
    finally:
        context.close()
