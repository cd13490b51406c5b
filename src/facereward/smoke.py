"""FACEREWARD_SMOKE=1: every command runs scaled down (a few steps, a few images) to check it works end to end.

The README test runs every README command this way. Two kinds of caps, both `min(value, cap)`:
command-line counts (`CLI_CAPS`, for commands without a config), and each config class's `SMOKE`
mapping of dotted fields (applied by `facereward.config.load_config` after the file and `--set`).
"""

from __future__ import annotations

import os
from typing import Any

ENV = "FACEREWARD_SMOKE"

# command -> option -> cap; an absent option is added at its cap (every cap is below the option's default)
CLI_CAPS: dict[str, dict[str, int]] = {
    "demo": {"--n": 4, "--steps": 2},
    "toyfaces": {"--n": 40},
    "restore": {"--steps": 2},
    "evaluate": {"--steps": 2},
    "candidates": {"--steps": 2, "--k": 2},
    "toy-preferences": {"--n-inputs": 4, "--k": 1, "--steps": 2},
}


def active() -> bool:
    """Whether FACEREWARD_SMOKE is set to something other than empty or 0."""
    return os.environ.get(ENV, "") not in ("", "0")


def scale_argv(argv: list[str]) -> list[str]:
    """`argv` (without the program name) with CLI_CAPS applied to its command's options; unchanged when not active."""
    if not active() or not argv or argv[0] not in CLI_CAPS:
        return list(argv)
    out = list(argv)
    for option, cap in CLI_CAPS[argv[0]].items():
        found = False
        for i, arg in enumerate(out):
            if arg == option and i + 1 < len(out):
                out[i + 1] = _capped(out[i + 1], cap)
                found = True
            elif arg.startswith(option + "="):
                out[i] = f"{option}={_capped(arg.split('=', 1)[1], cap)}"
                found = True
        if not found and "--help" not in out:
            out += [option, str(cap)]
    return out


def _capped(text: str, cap: int) -> str:
    try:
        return str(min(int(text), cap))
    except ValueError:
        return text  # not a number: the command reports it


def cap_config(config: Any) -> Any:
    """Apply `type(config).SMOKE` ({dotted field: cap}) in place when active; returns `config`."""
    if not active():
        return config
    for dotted, cap in getattr(type(config), "SMOKE", {}).items():
        *parents, name = dotted.split(".")
        node = config
        for p in parents:
            node = getattr(node, p)
        value = getattr(node, name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > cap:
            setattr(node, name, type(value)(cap))
    return config
