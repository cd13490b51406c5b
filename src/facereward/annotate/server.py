"""Human preference annotation (docs/methods.md 1.1): a local web page that labels candidate pairs.

`AnnotationSession` turns a candidates folder (DIR/candidates.json, written by `facereward
candidates`) into a deterministic list of pairs and records decisions: labels go to a preference
JSONL (`facereward.data.preferences`) line by line, and every decision (label/tie/skip/undo) to an
append-only sidecar log ``LABELS.events``, so a restart continues exactly where it stopped.
`serve` puts a small standard-library HTTP server (JSON API + one page) in front of it.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
import urllib.parse
import warnings
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from facereward.atomic import append_jsonl, atomic_write_text
from facereward.data.imageio import IMAGE_EXTENSIONS
from facereward.data.preferences import PreferencePair, append_pair, load_pairs
from facereward.localweb import (
    NO_BODY,
    LocalHandler,
    LocalServer,
    bind_server,
    is_loopback,
    serve_until_interrupted,
    server_url,
)

__all__ = [
    "CHOICES",
    "AlreadyDecidedError",
    "AnnotationError",
    "AnnotationSession",
    "is_loopback",
    "make_server",
    "run_annotate",
    "serve",
]

CHOICES = ("left", "right", "tie", "skip")
CANDIDATES_FILE = "candidates.json"
_EVENT_OF_CHOICE = {"left": "label", "right": "label", "tie": "tie", "skip": "skip"}


class AnnotationError(ValueError):
    """A bad candidates folder or a request the session cannot honour; one-line message."""


class AlreadyDecidedError(AnnotationError):
    """The pair was already labelled or skipped (undo it first)."""


# ----------------------------------------------------------------------------------------------
# the candidates folder


def _inside(root: Path, rel: Any, where: str) -> str:
    """Check a candidates.json path: a relative path to a file inside `root`; returns it as posix."""
    if not isinstance(rel, str) or not rel.strip():
        raise AnnotationError(f"{where}: expected a path (string) relative to the folder, got {rel!r}")
    posix = rel.replace("\\", "/")
    parts = posix.split("/")
    if Path(rel).is_absolute() or posix.startswith("/") or ".." in parts:
        raise AnnotationError(f"{where}: path {rel!r} must be relative and inside {root}")
    normalized = "/".join(p for p in parts if p not in ("", "."))
    if not (root / normalized).is_file():
        raise AnnotationError(f"{where}: image not found: {root / normalized}")
    return normalized


def _read_candidates(root: Path) -> list[dict[str, Any]]:
    """Items of DIR/candidates.json with checked relative paths; one-line errors naming the file."""
    meta = root / CANDIDATES_FILE
    if not root.is_dir():
        raise AnnotationError(f"{root}: no such folder")
    if not meta.is_file():
        raise AnnotationError(f"{root}: not a candidates folder (no {CANDIDATES_FILE}; make one with `facereward candidates`)")
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{meta}: invalid JSON ({err})") from None
    raw_items = data.get("items") if isinstance(data, dict) else None
    if not isinstance(raw_items, list):
        raise AnnotationError(f"{meta}: expected an object with an 'items' list")
    items: list[dict[str, Any]] = []
    names: set[str] = set()
    for n, raw in enumerate(raw_items):
        where = f"{meta}: items[{n}]"
        if not isinstance(raw, dict):
            raise AnnotationError(f"{where}: expected an object")
        name = raw.get("name", str(n))
        if not isinstance(name, str) or not name:
            raise AnnotationError(f"{where}: 'name' must be a non-empty string")
        if name in names:
            raise AnnotationError(f"{where}: duplicate item name {name!r}")
        names.add(name)
        if "lq" not in raw:
            raise AnnotationError(f"{where}: missing 'lq'")
        lq = _inside(root, raw["lq"], f"{where}.lq")
        gt = _inside(root, raw["gt"], f"{where}.gt") if raw.get("gt") is not None else None
        caption = raw.get("caption") or ""
        if not isinstance(caption, str):
            raise AnnotationError(f"{where}: 'caption' must be a string")
        cands = raw.get("candidates")
        if not isinstance(cands, list):
            raise AnnotationError(f"{where}: missing 'candidates' list")
        candidates = []
        seen: set[str] = set()
        for j, cand in enumerate(cands):
            if not isinstance(cand, dict) or "path" not in cand:
                raise AnnotationError(f"{where}.candidates[{j}]: expected an object with a 'path'")
            path = _inside(root, cand["path"], f"{where}.candidates[{j}].path")
            if path in seen:
                raise AnnotationError(f"{where}.candidates[{j}]: {path} is listed twice")
            seen.add(path)
            candidates.append(dict(cand, path=path))
        items.append({"name": name, "lq": lq, "gt": gt, "caption": caption, "candidates": candidates})
    return items


# ----------------------------------------------------------------------------------------------
# the session


class AnnotationSession:
    """Pairs of candidates to label, in a fixed order, and the decisions taken so far.

    Tasks are all k-choose-2 pairs per item (or `pairs_per_item` of them, drawn by `seed`),
    shuffled by `seed`, with left/right swapped on exactly half of them (position bias balanced).
    Labels go to `labels_path` (default DIR/labels.jsonl) as preference pairs; the decision log
    to `labels_path + ".events"`. Thread-safe.
    """

    def __init__(
        self,
        dir: str | Path,
        labels_path: str | Path | None = None,
        annotator: str = "anonymous",
        pairs_per_item: int | None = None,
        seed: int = 0,
    ) -> None:
        self.root = Path(os.path.abspath(dir))
        self.labels_path = Path(os.path.abspath(labels_path)) if labels_path is not None else self.root / "labels.jsonl"
        self.events_path = self.labels_path.with_name(self.labels_path.name + ".events")
        self.annotator = annotator
        self.seed = seed
        if pairs_per_item is not None and pairs_per_item < 1:
            raise AnnotationError(f"pairs_per_item must be >= 1 (or None for all pairs), got {pairs_per_item}")
        self.pairs_per_item = pairs_per_item
        self._lock = threading.RLock()
        self.items = _read_candidates(self.root)
        self.tasks = self._build_tasks()
        if not self.tasks:
            raise AnnotationError(f"{self.root}: no pairs to label (every item needs at least 2 candidates)")
        self._by_id = {t["pair_id"]: t for t in self.tasks}
        self._by_key = {self._key(t): t["pair_id"] for t in self.tasks}
        self.labels_path.parent.mkdir(parents=True, exist_ok=True)
        self._labelled: set[str] = set()
        self._skipped: set[str] = set()
        self._stack: list[tuple[str, str]] = []  # (pair_id, event) of the decisions in force, oldest first
        self._front: list[str] = []  # undone pairs, to be shown before the rest (most recent first)
        self._restore()

    # -- building -------------------------------------------------------------------------------

    def _build_tasks(self) -> list[dict[str, Any]]:
        pairs: list[tuple[dict[str, Any], int, int]] = []
        for item in self.items:
            k = len(item["candidates"])
            all_pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
            if self.pairs_per_item is not None and self.pairs_per_item < len(all_pairs):
                chosen = random.Random(f"{self.seed}:{item['name']}").sample(all_pairs, self.pairs_per_item)
                all_pairs = sorted(chosen)
            pairs.extend((item, i, j) for i, j in all_pairs)
        rng = random.Random(self.seed)
        rng.shuffle(pairs)
        swaps = [n % 2 == 1 for n in range(len(pairs))]
        rng.shuffle(swaps)
        tasks = []
        for index, ((item, i, j), swap) in enumerate(zip(pairs, swaps)):
            a, b = item["candidates"][i], item["candidates"][j]
            left, right = (b, a) if swap else (a, b)
            tasks.append({
                "pair_id": f"{item['name']}:{i}:{j}",
                "index": index,
                "item": item["name"],
                "lq": item["lq"],
                "gt": item["gt"],
                "caption": item["caption"],
                "left": left["path"],
                "right": right["path"],
            })
        return tasks

    def _abs(self, rel: str) -> Path:
        return Path(os.path.normpath(self.root / rel))

    def _key(self, task: dict[str, Any]) -> frozenset[Path]:
        return frozenset((self._abs(task["left"]), self._abs(task["right"])))

    # -- restoring state -------------------------------------------------------------------------

    def _read_events(self) -> list[dict[str, Any]]:
        if not self.events_path.is_file():
            return []
        lines = self.events_path.read_text(encoding="utf-8").splitlines()
        events = []
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if not isinstance(event, dict) or not isinstance(event.get("pair_id"), str):
                if lineno == len(lines):  # a torn last line from a crash: the decision never happened
                    print(f"warning: {self.events_path}:{lineno}: ignoring an incomplete last line", file=sys.stderr)
                    continue
                raise AnnotationError(f"{self.events_path}:{lineno}: invalid event line (expected a JSON object with a 'pair_id')")
            events.append(event)
        return events

    def _restore(self) -> None:
        labelled_order: list[str] = []
        if self.labels_path.is_file():
            for pair in load_pairs(self.labels_path, check_files=False):
                pid = self._by_key.get(frozenset((pair.chosen, pair.rejected)))
                if pid is not None:
                    labelled_order.append(pid)
        self._labelled = set(labelled_order)
        stack: list[tuple[str, str]] = []
        front: list[str] = []
        for event in self._read_events():
            pid, kind = event["pair_id"], event.get("event")
            if pid not in self._by_id:
                continue  # from another candidates.json or pairs_per_item: not ours
            if kind in ("label", "tie", "skip"):
                stack.append((pid, kind))
                if pid in front:
                    front.remove(pid)
            elif kind == "undo":
                for n in range(len(stack) - 1, -1, -1):
                    if stack[n][0] == pid:
                        del stack[n]
                        break
                if pid in front:
                    front.remove(pid)
                front.insert(0, pid)
        # reconcile with the labels file, the source of truth for labels (a crash between the two writes)
        stack = [(pid, kind) for pid, kind in stack if kind == "skip" or pid in self._labelled]
        in_stack = {pid for pid, _ in stack}
        stack.extend((pid, "label") for pid in labelled_order if pid not in in_stack)
        self._stack = stack
        self._skipped = {pid for pid, kind in stack if kind == "skip"}
        decided = self._labelled | self._skipped
        self._front = [pid for pid in front if pid not in decided]

    # -- queries ---------------------------------------------------------------------------------

    def _decided(self, pair_id: str) -> bool:
        return pair_id in self._labelled or pair_id in self._skipped

    def task(self, pair_id: str) -> dict[str, Any]:
        """The task dict of `pair_id` (pair_id, index, item, lq, gt, caption, left, right: paths relative to DIR)."""
        try:
            return dict(self._by_id[pair_id])
        except KeyError:
            raise AnnotationError(f"unknown pair id {pair_id!r}") from None

    def next_task(self) -> dict[str, Any] | None:
        """The pair to show now: the most recently undone one, else the first undecided in order; None when all are done."""
        with self._lock:
            if self._front:
                return self.task(self._front[0])
            for task in self.tasks:
                if not self._decided(task["pair_id"]):
                    return dict(task)
            return None

    def progress(self) -> tuple[int, int]:
        """(decided, total): pairs labelled, tied or skipped, out of all tasks."""
        with self._lock:
            return len(self._labelled) + len(self._skipped), len(self.tasks)

    def stats(self) -> dict[str, int]:
        """done, total, labelled (incl. ties) and skipped counts."""
        with self._lock:
            done, total = self.progress()
            return {"done": done, "total": total, "labelled": len(self._labelled), "skipped": len(self._skipped)}

    # -- decisions -------------------------------------------------------------------------------

    def _event(self, kind: str, pair_id: str, choice: str | None = None) -> None:
        record = {"event": kind, "pair_id": pair_id, "annotator": self.annotator, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if choice is not None:
            record["choice"] = choice
        append_jsonl(self.events_path, record)

    def _pair_record(self, task: dict[str, Any], choice: str) -> PreferencePair:
        left, right = self._abs(task["left"]), self._abs(task["right"])
        chosen, rejected = (right, left) if choice == "right" else (left, right)
        return PreferencePair(
            chosen=chosen,
            rejected=rejected,
            lq=self._abs(task["lq"]),
            gt=self._abs(task["gt"]) if task["gt"] else None,
            caption=task["caption"] or None,
            source="human",
            annotator=self.annotator,
            tie=choice == "tie",
        )

    def label(self, pair_id: str, choice: str) -> dict[str, Any] | None:
        """Record a decision on a pending pair; left/right/tie append a labels line at once, skip only logs.

        Returns the next task (None when all are done).
        """
        if choice not in CHOICES:
            raise AnnotationError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        with self._lock:
            task = self.task(pair_id)
            if self._decided(pair_id):
                raise AlreadyDecidedError(f"pair {pair_id} was already {'skipped' if pair_id in self._skipped else 'labelled'}; undo it first")
            kind = _EVENT_OF_CHOICE[choice]
            if choice == "skip":
                self._skipped.add(pair_id)
            else:
                append_pair(self.labels_path, self._pair_record(task, choice))
                self._labelled.add(pair_id)
            self._event(kind, pair_id, choice)
            self._stack.append((pair_id, kind))
            if pair_id in self._front:
                self._front.remove(pair_id)
            return self.next_task()

    def _remove_label_line(self, pair_id: str) -> None:
        """Rewrite the labels file atomically without the last line that holds this pair."""
        key = self._key(self._by_id[pair_id])
        lines = self.labels_path.read_text(encoding="utf-8").splitlines(keepends=True)
        base = self.labels_path.parent
        for n in range(len(lines) - 1, -1, -1):
            try:
                record = json.loads(lines[n])
            except ValueError:
                continue
            if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
                continue
            paths = frozenset(Path(os.path.normpath(base / record[k])) for k in ("chosen", "rejected"))
            if paths == key:
                del lines[n]
                atomic_write_text(self.labels_path, "".join(lines))
                return

    def undo(self) -> str | None:
        """Take back the most recent decision (its labels line is removed); that pair becomes next. Returns its id."""
        with self._lock:
            if not self._stack:
                return None
            pair_id, kind = self._stack[-1]
            if kind == "skip":
                self._skipped.discard(pair_id)
            else:
                self._remove_label_line(pair_id)
                self._labelled.discard(pair_id)
            self._event("undo", pair_id)
            self._stack.pop()
            self._front.insert(0, pair_id)
            return pair_id


# ----------------------------------------------------------------------------------------------
# HTTP


def _page_html() -> bytes:
    return resources.files("facereward.annotate").joinpath("page.html").read_bytes()


def _file_url(rel: str | None) -> str | None:
    return None if rel is None else "/files/" + urllib.parse.quote(rel)


def _public_task(task: dict[str, Any] | None) -> dict[str, Any] | None:
    """The task as the page sees it: paths and URLs only (no model names: labelling stays blind)."""
    if task is None:
        return None
    return {
        "pair_id": task["pair_id"],
        "item": task["item"],
        "caption": task["caption"],
        "lq": {"path": task["lq"], "url": _file_url(task["lq"])},
        "gt": None if task["gt"] is None else {"path": task["gt"], "url": _file_url(task["gt"])},
        "left": {"path": task["left"], "url": _file_url(task["left"])},
        "right": {"path": task["right"], "url": _file_url(task["right"])},
    }


class _AnnotationHTTPServer(LocalServer):
    session: AnnotationSession
    allowed_files: frozenset[str]
    root_real: str


class _Handler(LocalHandler):
    server: _AnnotationHTTPServer
    server_version = "facereward-annotate"

    def _state(self, **extra: Any) -> dict[str, Any]:
        session = self.server.session
        return dict(extra, task=_public_task(session.next_task()), progress=session.stats())

    # -- routes --

    def do_GET(self) -> None:
        if not self.host_ok():
            return self.refuse_host()
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        if path in ("/", "/index.html"):
            return self.send_page(_page_html())
        if self.send_shared(path):
            return None
        if path == "/api/next":
            return self.send_json(HTTPStatus.OK, self._state())
        if path == "/api/progress":
            return self.send_json(HTTPStatus.OK, self.server.session.stats())
        if path.startswith("/files/"):
            return self._file(path[len("/files/") :])
        return self.not_found()

    def do_POST(self) -> None:
        if not self.host_ok():
            return self.refuse_host()
        path = self.path.split("?", 1)[0]
        if path not in ("/api/label", "/api/undo"):
            return self.not_found()
        body = self.read_json_body()
        if body is NO_BODY:
            return None
        session = self.server.session
        if path == "/api/undo":
            undone = session.undo()
            return self.send_json(HTTPStatus.OK, self._state(undone=undone))
        if not isinstance(body, dict):
            return self.send_json(HTTPStatus.BAD_REQUEST, {"error": "expected a JSON object {pair_id, choice}"})
        try:
            session.label(str(body.get("pair_id")), str(body.get("choice")))
        except AlreadyDecidedError as err:
            return self.send_json(HTTPStatus.CONFLICT, self._state(error=str(err)))
        except AnnotationError as err:
            return self.send_json(HTTPStatus.BAD_REQUEST, self._state(error=str(err)))
        return self.send_json(HTTPStatus.OK, self._state())

    def _file(self, raw: str) -> None:
        """Serve an image of the task list from inside DIR; anything else (traversal, symlink out) is a 404."""
        rel = urllib.parse.unquote(raw)
        parts = rel.split("/")
        if not rel or "\x00" in rel or "\\" in rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            return self.not_found()
        if rel not in self.server.allowed_files or Path(rel).suffix.lower() not in IMAGE_EXTENSIONS:
            return self.not_found()
        root = self.server.root_real
        real = os.path.realpath(os.path.join(root, *parts))
        if os.path.commonpath([real, root]) != root or not os.path.isfile(real):
            return self.not_found()
        self.send_image(real)


def make_server(session: AnnotationSession, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A bound (not yet serving) HTTP server for `session`; port 0 picks a free port. Warns loudly off loopback."""
    if not is_loopback(host):
        message = (
            f"annotation server bound to {host!r}, not a loopback address: anyone who can reach this machine "
            "can see the images and change the labels (there is no authentication)"
        )
        print("\n" + "!" * 80 + f"\nWARNING: {message}\n" + "!" * 80 + "\n", file=sys.stderr, flush=True)
        warnings.warn(message, UserWarning, stacklevel=2)
    server = bind_server(_AnnotationHTTPServer, _Handler, host, port)
    server.session = session
    server.root_real = os.path.realpath(session.root)
    files = set()
    for task in session.tasks:
        files.update(p for p in (task["lq"], task["gt"], task["left"], task["right"]) if p)
    server.allowed_files = frozenset(files)
    return server


def serve(session: AnnotationSession, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the annotation page for `session` until Ctrl-C (binds 127.0.0.1 unless told otherwise)."""
    serve_until_interrupted(make_server(session, host, port))


def run_annotate(
    dir: str | Path,
    labels: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8765,
    annotator: str = "anonymous",
    pairs_per_item: int | None = None,
    open_browser: bool = False,
    seed: int = 0,
) -> None:
    """`facereward annotate DIR`: print the URL and serve the labelling page until Ctrl-C."""
    session = AnnotationSession(dir, labels_path=labels, annotator=annotator, pairs_per_item=pairs_per_item, seed=seed)
    server = make_server(session, host, port)
    url = server_url(server)
    done, total = session.progress()
    print(f"annotating {session.root}: {done} / {total} pairs done; labels -> {session.labels_path}", flush=True)
    print(f"open {url}  (keys: <- / 1 left, -> / 2 right, t tie, s skip, u undo; Ctrl-C to stop)", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    if serve_until_interrupted(server):
        print(flush=True)
    stats = session.stats()
    print(f"stopped: {stats['labelled']} labelled, {stats['skipped']} skipped, {stats['total'] - stats['done']} left; labels in {session.labels_path}")
