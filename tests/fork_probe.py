"""A fork server whose requests misbehave on purpose, for tests/test_fork_server.py."""

import os
import sys
import time

from webui import fork_server


def handle(request: dict) -> dict:
    action = request["action"]
    if action == "sleep":
        time.sleep(request["seconds"])
    elif action == "exit":
        os._exit(3)  # dies without a word, as a segfault would
    elif action == "raise":
        raise RuntimeError("a bug in the handler")
    elif action == "grow":
        request["ballast"] = bytearray(request["mib"] << 20)  # the child's memory, not ours
    return {"pid": os.getpid(), "parent": os.getppid(), "cwd": os.getcwd(),
            "env": os.environ.get("FORK_PROBE", "")}


if __name__ == "__main__":
    sys.exit(fork_server.serve(sys.argv[2], handle))
