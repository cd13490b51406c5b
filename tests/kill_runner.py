"""Run facereward command lines in forked children, SIGKILLing a child when its output shows a given line.

    python tests/kill_runner.py PLAN.json

PLAN: a list of {"argv": [...], "kill_on": "text" | null}. The imports happen once here, so each child
starts in milliseconds; each child is a real process killed with SIGKILL, as a crash or an OOM killer
would. Prints one JSON line per phase: {"rc": exit status or -9, "killed": bool}.
"""

from __future__ import annotations

import json
import os
import signal
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import facereward.cli  # noqa: E402, F401  (the trainers import lazily: load them before forking)
import facereward.train.base  # noqa: E402, F401
import facereward.train.frm  # noqa: E402, F401
import facereward.train.refl  # noqa: E402, F401


def run_phase(argv: list[str], kill_on: str | None) -> dict:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run the command, its stdout into the pipe
        os.close(read_fd)
        os.dup2(write_fd, 1)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        code = 1
        try:
            code = facereward.cli.run(argv)
        finally:
            sys.stdout.flush()
            os._exit(code)
    os.close(write_fd)
    killed, buffer = False, ""
    with os.fdopen(read_fd) as pipe:
        for line in pipe:
            buffer += line
            if kill_on and not killed and kill_on in line:
                os.kill(pid, signal.SIGKILL)
                killed = True
    _, status = os.waitpid(pid, 0)
    rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return {"rc": rc, "killed": killed, "tail": buffer[-600:]}


def main() -> None:
    plan = json.loads(open(sys.argv[1]).read())
    for phase in plan:
        print(json.dumps(run_phase(phase["argv"], phase.get("kill_on"))), flush=True)


if __name__ == "__main__":
    main()
