"""The web UI refuses to be reachable from other machines without a login."""

import subprocess
import sys

import pytest

from core.errors import BadInput
from webui.app import parse_auth


def test_loopback_needs_no_login():
    assert parse_auth(None, "127.0.0.1", share=False) is None


@pytest.mark.parametrize("host, share", [("0.0.0.0", False), ("192.0.2.7", False),
                                         ("127.0.0.1", True)])
def test_exposed_without_login_is_refused(host, share, monkeypatch):
    monkeypatch.delenv("TUNEBENCH_AUTH", raising=False)
    with pytest.raises(BadInput, match="--auth"):
        parse_auth(None, host, share)


def test_login_from_flag_or_environment(monkeypatch):
    assert parse_auth("ann:s3cret", "0.0.0.0", False) == ("ann", "s3cret")
    monkeypatch.setenv("TUNEBENCH_AUTH", "bob:pw")
    assert parse_auth(None, "0.0.0.0", False) == ("bob", "pw")
    with pytest.raises(BadInput, match="USER:PASS"):
        parse_auth("nopassword", "0.0.0.0", False)


def test_cli_exits_2_and_says_why(monkeypatch):
    proc = subprocess.run([sys.executable, "-m", "webui.cli", "webui", "--host", "0.0.0.0",
                           "--port", "7999"], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in __import__("os").environ.items()
                               if k != "TUNEBENCH_AUTH"})
    assert proc.returncode == 2
    assert "--auth" in proc.stderr and "Traceback" not in proc.stderr
