"""README.md stays true: every command and snippet in it runs (scaled down) on a fresh copy of the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

from readme_runner import Block, ReadmeRunner, code_blocks, fresh_copy, parse_commands

REPO = Path(__file__).resolve().parent.parent


def _failures(outcomes) -> str:
    return "\n\n".join(f"{o.where}\n{o.message}" for o in outcomes if not o.ok)


def test_every_readme_command_runs(tmp_path):
    root = fresh_copy(REPO, tmp_path / "repo")
    runner = ReadmeRunner(root)
    outcomes = runner.run_markdown((REPO / "README.md").read_text())
    slowest = sorted(outcomes, key=lambda o: -o.seconds)[:8]
    print("slowest README commands:\n" + "\n".join(f"{o.seconds:6.1f} s  {o.where[:110]}" for o in slowest))
    assert len(outcomes) > 40, "the README runner found too few commands: did the README's fences change?"
    failed = _failures(outcomes)
    assert not failed, failed


def test_parse_commands_reads_markers():
    block = Block("bash", "# a comment -> not/an/output\nFOO=1 facereward demo \\\n  --n 2   # about 1 min -> demo_out/results.md demo_out/grid.png\n"
                          "facereward refl --init-from X  # needs: a DiffBIR restorer\nfacereward a && facereward b\n", 10)
    first, second, third, fourth = parse_commands(block)
    assert first.argv == ["facereward", "demo", "--n", "2"] and first.env == {"FOO": "1"}
    assert first.outputs == ["demo_out/results.md", "demo_out/grid.png"] and first.line == 11
    assert second.needs == "a DiffBIR restorer" and second.line == 13
    assert third.argv == ["facereward", "a"] and fourth.argv == ["facereward", "b"]


def test_code_blocks_finds_indented_fences():
    text = "intro\n```bash\necho 1\n```\n- item\n  ```python\n  x = 1\n  ```\n"
    blocks = code_blocks(text)
    assert [(b.lang, b.code, b.line) for b in blocks] == [("bash", "echo 1", 3), ("python", "x = 1", 7)]


@pytest.mark.parametrize("readme, expected", [
    ("```bash\nfacereward restore --no-such-option a b\n```\n", "exit status 2"),          # a broken command
    ("```bash\nfacereward toyfaces --n 2 toys   # -> toys/missing.png\n```\n", "did not write toys/missing.png"),
    ("```bash\nfacereward toyfaces --n 2 toys   # needs: nothing\n```\n", "but succeeded"),
    ("```text\nfacereward demo [--out-dir D] [--bogus-flag]\n```\n", "unknown options ['--bogus-flag']"),
    ("```python\nimport facereward\nfacereward.no_such_name\n```\n", "AttributeError"),
    ('```json\n{"chosen": "a.png",}\n```\n', "Expecting property name"),
])
def test_runner_catches_a_broken_readme(tmp_path, readme, expected):
    outcomes = ReadmeRunner(tmp_path).run_markdown(readme)
    assert any(not o.ok for o in outcomes), outcomes
    assert expected in _failures(outcomes)


def test_runner_passes_a_good_readme(tmp_path):
    readme = ("```bash\nfacereward toyfaces --n 12 toys   # -> toys/train/images/ toys/manifest.json\n"
              "facereward restore --model /nonexistent toys/test/images out   # needs: a restorer folder\n```\n"
              "```text\nfacereward toyfaces [--n 20] [--size 64] OUT\n```\n")
    outcomes = ReadmeRunner(tmp_path).run_markdown(readme)
    assert all(o.ok for o in outcomes), _failures(outcomes)
    assert len(outcomes) == 3
