"""Checks that this Python's environment holds exactly a lock's packages: `python scripts/check_lock.py LOCK`.

Compares `pip freeze --all` (the project's own editable install left out) with the lock's `name==version`
lines and prints every package that is missing, extra or at another version; exit status 1 if any.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(lines: list[str], where: str) -> dict[str, str]:
    """`name==version` lines (comments, blanks and option lines skipped; markers evaluated) -> {name: version}."""
    pins: dict[str, str] = {}
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        spec, _, marker = line.partition(";")
        if marker.strip():
            from packaging.markers import Marker

            if not Marker(marker).evaluate():
                continue
        name, sep, version = spec.partition("==")
        if not sep or not version.strip():
            raise ValueError(f"{where}:{n}: not an exact pin: {raw.strip()!r}")
        pins[canonical(name.strip())] = version.strip()
    return pins


def compare(locked: dict[str, str], installed: dict[str, str]) -> list[str]:
    """One line per difference between the lock and what is installed; empty when they are equal."""
    out = []
    for name in sorted(set(locked) | set(installed)):
        want, have = locked.get(name), installed.get(name)
        if have is None:
            out.append(f"missing: {name}=={want}")
        elif want is None:
            out.append(f"not in the lock: {name}=={have}")
        elif want != have:
            out.append(f"{name}: locked {want}, installed {have}")
    return out


def installed_pins() -> dict[str, str]:
    """`pip freeze --all` of this Python, the project's editable install left out -> {name: version}."""
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                            check=True, capture_output=True, text=True).stdout
    return read_pins(freeze.splitlines(), "pip freeze")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/check_lock.py LOCK", file=sys.stderr)
        return 2
    lock = Path(argv[0])
    locked = read_pins(lock.read_text().splitlines(), str(lock))
    diffs = compare(locked, installed_pins())
    for line in diffs:
        print(f"check_lock: {lock}: {line}", file=sys.stderr)
    if not diffs:
        print(f"check_lock: the environment equals {lock} ({len(locked)} packages)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
