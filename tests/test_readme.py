"""README.md and the manual (docs/) stay true: every command and snippet in them runs (scaled down) on one fresh copy
of the repository, README.md first and then the pages in mkdocs.yml's nav order."""

from __future__ import annotations

from pathlib import Path

import pytest
from readme_runner import Block, ReadmeRunner, code_blocks, documented_pages, fresh_copy, parse_commands

REPO = Path(__file__).resolve().parent.parent
RUN_LANGS = ("bash", "python", "json", "text")  # the blocks the runner reads


def _failures(outcomes) -> str:
    return "\n\n".join(f"{o.where}\n{o.message}" for o in outcomes if not o.ok)


def test_every_readme_and_docs_command_runs(tmp_path):
    root = fresh_copy(REPO, tmp_path / "repo")
    runner = ReadmeRunner(root)
    per_page = {}
    for page in documented_pages():
        before = len(runner.outcomes)
        runner.run_markdown((REPO / page).read_text(), source=page)
        per_page[page] = len(runner.outcomes) - before
    outcomes = runner.outcomes
    slowest = sorted(outcomes, key=lambda o: -o.seconds)[:10]
    print(f"{len(outcomes)} blocks and commands run ({sum(o.seconds for o in outcomes):.0f} s), per page: "
          + ", ".join(f"{p} {n}" for p, n in per_page.items() if n))
    print(f"{len(runner.not_run)} shown but not run (repeats, benchmarks)")
    print("slowest:\n" + "\n".join(f"{o.seconds:6.1f} s  {o.where[:110]}" for o in slowest))
    assert len(outcomes) > 40, "the runner found too few commands: did the pages' fences change?"
    assert per_page["README.md"] >= 10 and sum(n for p, n in per_page.items() if p != "README.md") > 40, per_page
    failed = _failures(outcomes)
    assert not failed, failed


def test_every_page_with_blocks_is_run():
    """A page under docs/ with blocks the runner reads is in the nav, so the test above runs it."""
    listed = set(documented_pages())
    for page in sorted((REPO / "docs").rglob("*.md")):
        name = page.relative_to(REPO).as_posix()
        if any(b.lang in RUN_LANGS for b in code_blocks(page.read_text())):
            assert name in listed, f"{name} has command blocks but is not in mkdocs.yml's nav"


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
    ("<!-- runner: skip repeats -->\n```bash\nfacereward toyfaces --n 2 toys\n```\n", "a stale marker"),
    ("<!-- runner: run twice -->\n```bash\nfacereward toyfaces --n 2 toys\n```\n", "unknown marker"),
    ("```text\nfacereward demo [--out-dir D] [--bogus-flag]\n```\n", "unknown options ['--bogus-flag']"),
    ("```python\nimport facereward\nfacereward.no_such_name\n```\n", "AttributeError"),
    ('```json\n{"chosen": "a.png",}\n```\n', "Expecting property name"),
])
def test_runner_catches_a_broken_readme(tmp_path, readme, expected):
    outcomes = ReadmeRunner(tmp_path).run_markdown(readme)
    assert any(not o.ok for o in outcomes), outcomes
    assert expected in _failures(outcomes)


def test_runner_names_the_page_and_skips_repeats(tmp_path):
    runner = ReadmeRunner(tmp_path)
    runner.run_markdown("```bash\nfacereward toyfaces --n 12 toys   # -> toys/manifest.json\n```\n")
    page = ("intro\n<!-- runner: skip repeats -->\n```bash\nfacereward toyfaces  --n 12 toys   # -> toys/manifest.json\n"
            "facereward restore --no-such-option a b\n```\n"
            "<!-- runner: not run (a benchmark) -->\n```bash\nfacereward restore --no-such-option c d\n```\n")
    outcomes = runner.run_markdown(page, source="docs/refl.md")
    assert len(outcomes) == 2  # the toyfaces of the first page, the broken restore; the repeat and the shown block not run
    assert outcomes[1].where.startswith("docs/refl.md:5: facereward restore") and not outcomes[1].ok
    assert runner.not_run[0].startswith("docs/refl.md:4: facereward toyfaces") and "(repeats README.md:2)" in runner.not_run[0]
    assert "docs/refl.md:9: bash block (not run (a benchmark))" in runner.not_run[1]
    (tmp_path / "toys" / "manifest.json").unlink()  # a repeat's outputs must still be there
    outcomes = runner.run_markdown(page.split("facereward restore")[0] + "```\n", source="docs/lrpo.md")
    assert "toys/manifest.json is not there" in _failures(outcomes[2:])


def test_runner_passes_a_good_readme(tmp_path):
    readme = ("```bash\nfacereward toyfaces --n 12 toys   # -> toys/train/images/ toys/manifest.json\n"
              "facereward restore --model /nonexistent toys/test/images out   # needs: a restorer folder\n```\n"
              "```text\nfacereward toyfaces [--n 20] [--size 64] OUT\n```\n")
    outcomes = ReadmeRunner(tmp_path).run_markdown(readme)
    assert all(o.ok for o in outcomes), _failures(outcomes)
    assert len(outcomes) == 3
