"""Run facereward command lines in forked children, SIGKILLing a child when its output shows a given line.

    python tests/kill_runner.py PLAN.json

PLAN: a list of {"argv": [...], "kill_on": "text" | null, "kill_in_save": N | null}; with kill_in_save the child
SIGKILLs itself in the middle of writing checkpoint N (accelerate's files written into the temporary folder, ours
not yet, nothing renamed). The imports happen once here, so each child
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


def _die_in_save(step: int) -> None:
    """Make the checkpoint writer SIGKILL this process halfway through writing checkpoint `step`."""
    import facereward.train.checkpoints as checkpoints

    publish = checkpoints._publish

    def dying(output_dir, at, *args, **kwargs):
        if at == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return publish(output_dir, at, *args, **kwargs)

    checkpoints._publish = dying


def run_phase(argv: list[str], kill_on: str | None, kill_in_save: int | None = None) -> dict:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run the command, its stdout into the pipe
        os.close(read_fd)
        os.dup2(write_fd, 1)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        code = 1
        if kill_in_save is not None:
            _die_in_save(kill_in_save)
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
    killed = killed or (kill_in_save is not None and rc == -signal.SIGKILL)
    return {"rc": rc, "killed": killed, "tail": buffer[-600:]}


def main() -> None:
    plan = json.loads(open(sys.argv[1]).read())
    for phase in plan:
        print(json.dumps(run_phase(phase["argv"], phase.get("kill_on"), phase.get("kill_in_save"))), flush=True)


if __name__ == "__main__":
    main()
