"""Run every command and snippet of README.md and of the manual's pages (docs/), scaled down (FACEREWARD_SMOKE=1),
as a user pasting them would: README.md first, then each page in mkdocs.yml's nav order, in one copy.

The conventions this runner reads (docs/development.md, "The README and docs test", states them for writers):
- ```bash blocks hold commands run in order from the repository root, with `.venv/bin` on PATH. A trailing
  comment may carry markers: `-> PATH ...` (files or folders/ the command must write), `needs: WHAT` (files
  or hardware nobody has here: the command must fail with a one-line `error:` instead, or for `accelerate
  launch` parse cleanly), `until Ctrl-C` (a server: it must start and print its URL).
- ```text blocks hold usage synopses: every `--option` in a `facereward CMD ...` line must exist.
- ```python blocks run in one fresh namespace each; a first line `# NAME.py` makes the block a file written
  to NAME.py (a plugin module a later command imports); a line `# needs: WHAT` expects a one-line error.
- ```json blocks hold JSON lines; each must parse.
- An HTML comment on the line before a block's fence marks the whole block: `<!-- runner: skip repeats -->`
  (a command that already ran with the same words, earlier on this or an earlier page, is not run again, but
  its `->` outputs must still exist; a marked block with no such command fails as stale), or
  `<!-- runner: not run (REASON) -->` (shown only).
`bash scripts/setup.sh`, `scripts/test.sh` and `scripts/update-lock.sh` are CI's own steps and are not rerun.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SKIPPED = ("scripts/setup.sh", "scripts/test.sh", "scripts/update-lock.sh")
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*runner:\s*(.*?)\s*-->\s*$")  # a whole block's marker, on the line before its fence


@dataclass
class Command:
    argv: list[str]
    env: dict[str, str]
    line: int
    text: str
    needs: str | None = None
    server: bool = False
    outputs: list[str] = field(default_factory=list)


@dataclass
class Block:
    lang: str
    code: str
    line: int  # of the first code line
    marker: str = ""  # `<!-- runner: MARKER -->` on the line before the fence: "skip repeats", "not run (...)"


@dataclass
class Outcome:
    where: str
    ok: bool
    seconds: float
    message: str = ""


def code_blocks(text: str) -> list[Block]:
    """Every fenced block of a markdown text (indented fences included), with its language and line."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2), i + 1
        before = MARKER.match(lines[i - 1]) if i > 0 else None
        j = start
        while j < len(lines) and not (lines[j].strip() == "```"):
            j += 1
        body = [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[start:j]]
        blocks.append(Block(lang, "\n".join(body), start + 1, before.group(1) if before else ""))
        i = j + 1
    return blocks


def _split_comment(line: str) -> tuple[str, str]:
    """'cmd --a 1   # note' -> ('cmd --a 1', 'note'); a '#' inside quotes is not a comment."""
    quote = None
    for k, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or line[k - 1].isspace()):
            return line[:k].rstrip(), line[k + 1:].strip()
    return line.rstrip(), ""


def parse_commands(block: Block) -> list[Command]:
    """The commands of a bash block: continuation lines joined, comments read for markers, `&&` split."""
    commands: list[Command] = []
    pending, pending_line, notes = "", 0, []
    for offset, raw in enumerate(block.code.splitlines()):
        code, note = _split_comment(raw)
        if not pending and not code:
            continue  # a comment line of its own describes what follows; markers sit on the command's lines
        if not pending:
            pending_line = block.line + offset
        if note:
            notes.append(note)
        if code.endswith("\\"):
            pending += code[:-1] + " "
            continue
        pending += code
        if pending.strip():
            commands += _commands_of(pending.strip(), " ".join(notes), pending_line)
        pending, notes = "", []
    return commands


def _commands_of(text: str, note: str, line: int) -> list[Command]:
    needs = re.search(r"needs:\s*(.+?)(?:\s+->|$)", note)
    outputs = re.search(r"->\s*(.+)$", note)
    out = []
    for part in text.split("&&"):
        words = shlex.split(part)
        env = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        out.append(Command(words, env, line, part.strip(), needs.group(1).strip() if needs else None,
                           "until Ctrl-C" in note, []))
    if outputs:
        out[-1].outputs = [p.strip(",") for p in outputs.group(1).split() if p.strip(",")]
    return out


def _short_traceback(frames: int = 4) -> str:
    """The current exception with its innermost frames only (the runner's own frames say nothing)."""
    kind, value, tb = sys.exc_info()
    return "".join(traceback.format_exception(kind, value, tb, limit=-frames))


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class ReadmeRunner:
    """Runs the blocks of markdown pages in `root` (a fresh copy of the repository), one page after another, so a
    later page finds what an earlier one wrote; `facereward` commands run in this process."""

    def __init__(self, root: Path, timeout: float = 600):
        self.root = Path(root)
        self.timeout = timeout
        self.bin = str(Path(sys.executable).parent)
        self.env = {"FACEREWARD_SMOKE": "1", "HF_HUB_OFFLINE": "1", "PATH": f"{self.bin}:{os.environ.get('PATH', '')}"}
        self.outcomes: list[Outcome] = []
        self.source = "README.md"  # the page being run, for `where`
        self.ran: dict[tuple, str] = {}  # a command's words -> where it ran first
        self.not_run: list[str] = []  # commands skipped as repeats, and blocks marked `not run`: where, and why

    # --- bash ---------------------------------------------------------------------------------------------
    @staticmethod
    def _key(cmd: Command) -> tuple:
        """What makes two commands the same: their words and environment, not their spacing or comments."""
        return tuple(sorted(cmd.env.items())), tuple(cmd.argv)

    def run_command(self, cmd: Command) -> Outcome:
        where = f"{self.source}:{cmd.line}: {cmd.text}"
        self.ran.setdefault(self._key(cmd), where)
        start = time.monotonic()
        if not cmd.argv:
            return Outcome(where, True, 0.0)
        if any(cmd.argv[-1].endswith(s) or s in cmd.argv for s in SKIPPED) and cmd.argv[0] == "bash":
            return Outcome(where, True, 0.0, "CI's own step, not rerun")
        try:
            if cmd.argv[0] == "accelerate":
                ok, message = self._dry_parse(cmd)
            elif cmd.server:
                ok, message = self._server(cmd)
            else:
                rc, out, err = self._execute(cmd)
                ok, message = self._judge(cmd, rc, out, err)
        except Exception:
            ok, message = False, _short_traceback()
        return Outcome(where, ok, time.monotonic() - start, message)

    def _execute(self, cmd: Command) -> tuple[int, str, str]:
        program = cmd.argv[0]
        env = {**self.env, **cmd.env}
        if program == "facereward" or program.endswith("/facereward"):
            return self._in_process(cmd.argv[1:], env)
        argv = [sys.executable, *cmd.argv[1:]] if program in ("python", "python3") else cmd.argv
        proc = subprocess.run(argv, cwd=self.root, env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=self.timeout)
        return proc.returncode, proc.stdout, proc.stderr

    def _in_process(self, args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
        from facereward.cli import run

        out, err = io.StringIO(), io.StringIO()
        with _environ(env), contextlib.chdir(self.root), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = run(args)
            except Exception:
                err.write(_short_traceback())
                rc = 99
        return rc, out.getvalue(), err.getvalue()

    def _judge(self, cmd: Command, rc: int, out: str, err: str) -> tuple[bool, str]:
        tail = f"\n--- stdout (tail)\n{out[-1500:]}\n--- stderr (tail)\n{err[-3000:]}"
        if cmd.needs:
            last = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or [""]
            if rc == 0:
                return False, f"marked 'needs: {cmd.needs}' but succeeded{tail}"
            if "Traceback" in err or not last[0].startswith("error:"):
                return False, f"marked 'needs: {cmd.needs}': expected a one-line 'error: ...', got{tail}"
            return True, last[0]
        if rc != 0:
            return False, f"exit status {rc}{tail}"
        missing = self._missing_outputs(cmd)
        if missing:
            return False, f"did not write {', '.join(missing)}{tail}"
        return True, ""

    def _dry_parse(self, cmd: Command) -> tuple[bool, str]:
        """`accelerate launch ... -m facereward.cli CMD ARGS`: CMD's options parse, and a --config file exists."""
        import typer

        from facereward.cli import app

        if "facereward.cli" not in cmd.argv:
            return False, "accelerate launch without -m facereward.cli"
        args = cmd.argv[cmd.argv.index("facereward.cli") + 1:]
        group = typer.main.get_command(app)
        with group.make_context("facereward", list(args), resilient_parsing=False) as ctx:
            sub = group.get_command(ctx, args[0])
            if sub is None:
                return False, f"no command {args[0]!r}"
            sub.make_context(args[0], list(args[1:]), parent=ctx)
        if "--config" in args:
            config = args[args.index("--config") + 1]
            if not (self.root / config).is_file() and not cmd.needs:
                return False, f"--config {config}: no such file"
        return True, "parsed"

    def _server(self, cmd: Command) -> tuple[bool, str]:
        argv = [sys.executable, "-m", "facereward.cli", *cmd.argv[1:]] if cmd.argv[0] == "facereward" else cmd.argv
        proc = subprocess.Popen(argv, cwd=self.root, env={**os.environ, **self.env, **cmd.env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        seen = []
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line and proc.poll() is not None:
                    break
                seen.append(line)
                if "http://" in line:
                    return True, line.strip()
            return False, "the server printed no URL:\n" + "".join(seen)[-2000:]
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    # --- other blocks -------------------------------------------------------------------------------------
    def run_python(self, block: Block) -> Outcome:
        where = f"{self.source}:{block.line}: python block"
        first = block.code.splitlines()[0].strip() if block.code.strip() else ""
        m = re.fullmatch(r"#\s*([\w./-]+\.py)", first)
        if m:
            (self.root / m.group(1)).write_text(block.code + "\n")
            return Outcome(where, True, 0.0, f"wrote {m.group(1)}")
        needs = re.search(r"#\s*needs:\s*(.+)$", block.code, flags=re.M)
        start = time.monotonic()
        err = io.StringIO()
        try:
            with _environ(self.env), contextlib.chdir(self.root), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(err):
                exec(compile(block.code, where, "exec"), {"__name__": "__readme__"})
        except Exception as exc:
            from facereward.cli import _is_user_error

            message = f"{type(exc).__name__}: {exc}"
            ok = bool(needs) and _is_user_error(exc) and "\n" not in str(exc)
            if not ok:
                message = _short_traceback()
            return Outcome(where, ok, time.monotonic() - start, message)
        if needs:
            return Outcome(where, False, time.monotonic() - start, f"marked 'needs: {needs.group(1)}' but ran")
        return Outcome(where, True, time.monotonic() - start)

    def check_json(self, block: Block) -> Outcome:
        where = f"{self.source}:{block.line}: json block"
        for k, line in enumerate(block.code.splitlines()):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    return Outcome(where, False, 0.0, f"line {block.line + k}: {err}")
        return Outcome(where, True, 0.0)

    def check_synopsis(self, block: Block) -> list[Outcome]:
        import typer

        from facereward.cli import app

        group = typer.main.get_command(app)
        outcomes = []
        for k, line in enumerate(block.code.replace("\\\n", " ").splitlines()):
            words = line.split()
            if len(words) < 2 or words[0] != "facereward" or words[1].startswith("-"):
                continue
            where = f"{self.source}:{block.line + k}: {line.strip()[:60]}"
            sub = group.commands.get(words[1])
            if sub is None:
                outcomes.append(Outcome(where, False, 0.0, f"no command {words[1]!r}"))
                continue
            known = {o for p in sub.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
            used = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line))
            unknown = sorted(used - known)
            outcomes.append(Outcome(where, not unknown, 0.0, f"unknown options {unknown}" if unknown else ""))
        return outcomes

    def _missing_outputs(self, cmd: Command) -> list[str]:
        return [p for p in cmd.outputs
                if not (self.root / p).exists() or (p.endswith("/") and not any((self.root / p).iterdir()))]

    def _run_repeats_once(self, block: Block) -> list[Outcome]:
        """A `skip repeats` block: what already ran is only checked for its outputs; the rest runs."""
        outcomes, repeats = [], 0
        for cmd in parse_commands(block):
            first = self.ran.get(self._key(cmd))
            if first is None:
                outcomes.append(self.run_command(cmd))
                continue
            repeats += 1
            where = f"{self.source}:{cmd.line}: {cmd.text}"
            self.not_run.append(f"{where}  (repeats {first.split(': ', 1)[0]})")
            missing = self._missing_outputs(cmd)
            if missing:
                outcomes.append(Outcome(where, False, 0.0, f"a repeat of {first.split(': ', 1)[0]}, not run again, "
                                                            f"but {', '.join(missing)} is not there (any more)"))
        if not repeats:
            outcomes.append(Outcome(f"{self.source}:{block.line}: bash block", False, 0.0,
                                    "marked 'runner: skip repeats' but no command of it ran before: a stale marker"))
        return outcomes

    def run_markdown(self, text: str, source: str = "README.md") -> list[Outcome]:
        """Every block of `text` (the page `source`, named in each outcome) in order; returns (and keeps) all outcomes
        so far. Calls for several pages share the copy, so a page finds what earlier pages wrote."""
        self.source = source
        for block in code_blocks(text):
            if block.marker.startswith("not run"):
                self.not_run.append(f"{source}:{block.line}: {block.lang} block ({block.marker})")
                continue
            if block.marker and (block.marker != "skip repeats" or block.lang != "bash"):
                self.outcomes.append(Outcome(f"{source}:{block.line}: {block.lang} block", False, 0.0,
                                             f"unknown marker 'runner: {block.marker}' (known: 'skip repeats' on a "
                                             "bash block, 'not run (REASON)')"))
                continue
            if block.lang == "bash" and block.marker == "skip repeats":
                self.outcomes += self._run_repeats_once(block)
            elif block.lang == "bash":
                for cmd in parse_commands(block):
                    self.outcomes.append(self.run_command(cmd))
            elif block.lang == "python":
                self.outcomes.append(self.run_python(block))
            elif block.lang == "json":
                self.outcomes.append(self.check_json(block))
            elif block.lang == "text":
                self.outcomes += self.check_synopsis(block)
        return self.outcomes


def nav_pages(repo: Path = REPO) -> list[str]:
    """The manual's pages in mkdocs.yml's nav order, as paths from the repository root (docs/NAME.md)."""
    import yaml

    mk = yaml.safe_load((repo / "mkdocs.yml").read_text())
    pages: list[str] = []

    def walk(entry):
        if isinstance(entry, str):
            pages.append(entry)
        elif isinstance(entry, list):
            for item in entry:
                walk(item)
        elif isinstance(entry, dict):
            for value in entry.values():
                walk(value)

    walk(mk["nav"])
    docs = mk.get("docs_dir", "docs")
    return [f"{docs}/{p}" for p in pages if not p.startswith(("http://", "https://"))]


def documented_pages(repo: Path = REPO) -> list[str]:
    """Every page whose blocks are run, in order: README.md, then the manual in nav order."""
    return ["README.md", *nav_pages(repo)]


def fresh_copy(repo: Path, dest: Path) -> Path:
    """The files git knows (tracked, and untracked but not ignored) copied to `dest`: what a fresh clone holds."""
    import shutil

    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = repo / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest
