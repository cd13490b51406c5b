"""A blind pairwise user study between restoration methods: a local page that shows one input restored by two
methods side by side and records which one each rater prefers.

`StudySession` matches the methods' output folders by file stem and gives every rater a deterministic sequence of
comparisons (the pairs of methods, the image order and the sides are drawn from `seed` and the rater's name, so a
restart shows the same sequence); answers are appended to a JSONL file (`facereward.study.results`) at once, and
a restart resumes each rater after their answered comparisons. `make_server` puts the page and a small JSON API
in front of it (loopback only); images are served by random token ids, so no method name reaches the page.
"""

from __future__ import annotations

import os
import random
import secrets
import sys
import threading
import time
import unicodedata
import urllib.parse
from collections import Counter
from collections.abc import Mapping
from http import HTTPStatus
from importlib import resources
from itertools import combinations
from pathlib import Path
from typing import Any

from facereward.atomic import append_jsonl, atomic_write_text
from facereward.data.imageio import IMAGE_EXTENSIONS
from facereward.localweb import (
    NO_BODY,
    LocalHandler,
    LocalServer,
    bind_server,
    is_loopback,
    serve_until_interrupted,
    server_url,
)
from facereward.study.results import (
    Answer,
    StudyResultsError,
    parse_answer,
    read_answers,
)

__all__ = ["CHOICES", "KEYS_HELP", "StudyError", "StudySession", "make_server", "parse_method_args", "run_study"]

CHOICES = {"left": "a", "right": "b", "tie": "tie"}  # what the page sends -> the answer's choice
KEYS_HELP = "<- / 1 left better, -> / 2 right better, down / = / 3 tie (can't tell), Backspace / u undo"
MAX_RATER = 64


class StudyError(ValueError):
    """A bad study setup or request; one-line message."""


class AlreadyAnsweredError(StudyError):
    """The rater already answered this comparison (undo it first)."""


# ----------------------------------------------------------------------------------------------
# the folders


def parse_method_args(values: list[str]) -> dict[str, Path]:
    """Output folders as given on the command line, DIR or NAME=DIR, -> {method name: folder}.

    The name is the folder's own name unless given; an existing path containing '=' is a folder.
    """
    methods: dict[str, Path] = {}
    for value in values:
        if "=" in value and not Path(value).exists():
            name, folder = value.split("=", 1)
            if not name.strip():
                raise StudyError(f"{value!r}: empty method name before '='")
            path = Path(folder)
        else:
            path = Path(value)
            name = Path(os.path.abspath(path)).name
        if name in methods:
            raise StudyError(f"{path}: the method name {name!r} is given twice (also {methods[name]}); name them with NAME=DIR")
        methods[name] = path
    return methods


def _check_rater(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise StudyError("a rater name is needed")
    name = name.strip()
    if len(name) > MAX_RATER or any(unicodedata.category(c).startswith("C") for c in name):
        raise StudyError(f"a rater name must be 1 to {MAX_RATER} printable characters")
    return name


def _images_by_stem(folder: Path, what: str, warnings: list[str]) -> dict[str, str]:
    """{stem: real path} of the images directly in `folder`; files whose real path leaves the folder are left out."""
    if not folder.is_dir():
        raise StudyError(f"{folder}: no such folder ({what})")
    root = os.path.realpath(folder)
    by_stem: dict[str, str] = {}
    outside = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        real = os.path.realpath(path)
        if os.path.commonpath([real, root]) != root:
            outside.append(path.name)
            continue
        if path.stem in by_stem:
            raise StudyError(f"{folder}: two images with the stem {path.stem!r} ({Path(by_stem[path.stem]).name}, {path.name}); "
                             "images are matched across folders by stem")
        by_stem[path.stem] = real
    if outside:
        warnings.append(f"{folder}: {len(outside)} image(s) link outside the folder and are left out (e.g. {outside[0]})")
    if not by_stem:
        raise StudyError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder ({what})")
    return by_stem


# ----------------------------------------------------------------------------------------------
# the session


class StudySession:
    """The methods' images, each rater's sequence of comparisons, and the answers so far. Thread-safe.

    A rater's sequence: for every image, all pairs of methods (or `pairs_per_image` of them, drawn at random),
    shuffled across images, with the later method of the pair on the left in exactly half of the comparisons
    (position bias balanced) - all drawn from random.Random(f"{seed}:{rater}"). Answered comparisons (same
    image and pair of methods, either side) are not shown again to the same rater.
    """

    def __init__(
        self,
        methods: Mapping[str, str | Path],
        out: str | Path,
        lq: str | Path | None = None,
        rater: str | None = None,
        pairs_per_image: int | None = None,
        seed: int = 0,
    ) -> None:
        if len(methods) < 2:
            raise StudyError(f"a study needs at least 2 methods (output folders), got {len(methods)}")
        if pairs_per_image is not None and pairs_per_image < 1:
            raise StudyError(f"pairs_per_image must be >= 1 (or None for all pairs), got {pairs_per_image}")
        self.out = Path(os.path.abspath(out))
        self.seed = seed
        self.pairs_per_image = pairs_per_image
        self.fixed_rater = None if rater is None else _check_rater(rater)
        self.warnings: list[str] = []
        self.methods = list(methods)
        folders = {name: Path(folder) for name, folder in methods.items()}
        images = {name: _images_by_stem(folder, f"method {name}", self.warnings) for name, folder in folders.items()}
        lq_images = _images_by_stem(Path(lq), "the inputs, --lq", self.warnings) if lq is not None else None
        every = [(folders[n], images[n]) for n in self.methods] + ([(Path(lq), lq_images)] if lq_images is not None else [])
        common = set(every[0][1])
        for folder, stems in every[1:]:
            if not common & set(stems):
                raise StudyError(f"{folder}: none of its {len(stems)} image(s) matches by file stem the images of "
                                 f"{every[0][0] if folder != every[0][0] else every[1][0]} and the folders before it")
            common &= set(stems)
        for folder, stems in every:
            extra = sorted(set(stems) - common)
            if extra:
                self.warnings.append(f"{folder}: {len(extra)} of {len(stems)} image(s) are not in every folder and are "
                                     f"left out (e.g. {extra[0]!r})")
        self.images = sorted(common)
        # every servable file behind a random token: the page never sees a name or a path
        self._token_of: dict[str, str] = {}
        self.file_of_token: dict[str, str] = {}
        for stems in [images[n] for n in self.methods] + ([lq_images] if lq_images is not None else []):
            for stem in self.images:
                token = secrets.token_urlsafe(18)
                self._token_of[stems[stem]] = token
                self.file_of_token[token] = stems[stem]
        self._files = images
        self._lq = lq_images
        self._lock = threading.RLock()
        self._sequences: dict[str, list[tuple[str, str, str]]] = {}
        self._front: dict[str, list[int]] = {}  # undone comparisons to show first, most recent first
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._answered: dict[str, Counter[tuple[str, frozenset[str]]]] = {}
        self._order: list[Answer] = []
        self._restore()

    @property
    def has_lq(self) -> bool:
        return self._lq is not None

    @property
    def per_rater(self) -> int:
        """Comparisons in each rater's sequence."""
        pairs = len(self.methods) * (len(self.methods) - 1) // 2
        return len(self.images) * (pairs if self.pairs_per_image is None else min(self.pairs_per_image, pairs))

    # -- state --

    def _restore(self) -> None:
        try:
            answers, torn = read_answers(self.out, allow_torn_tail=True)
        except StudyResultsError as err:
            raise StudyError(str(err)) from None
        if torn is not None:  # a write cut off by a crash: that answer never happened
            lines = self.out.read_text(encoding="utf-8").splitlines(keepends=True)
            atomic_write_text(self.out, "".join(lines[: torn - 1]))
            self.warnings.append(f"{self.out}:{torn}: dropped an incomplete last line (a write cut off by a crash)")
        for answer in answers:
            self._answered.setdefault(answer.rater, Counter())[answer.key] += 1
        self._order = answers

    def rater(self, name: Any) -> str:
        """The checked rater name for a request: the fixed rater when the study has one (None or the same name)."""
        if self.fixed_rater is not None:
            if name in (None, "", self.fixed_rater):
                return self.fixed_rater
            raise StudyError("this study records one rater only (set when it was started)")
        return _check_rater(name)

    def sequence(self, rater: str) -> list[tuple[str, str, str]]:
        """The rater's comparisons in order: (image stem, method on the left, method on the right)."""
        with self._lock:
            if rater not in self._sequences:
                rng = random.Random(f"{self.seed}:{rater}")
                pairs = list(combinations(self.methods, 2))
                chosen: list[tuple[str, str, str]] = []
                for image in self.images:
                    some = pairs if self.pairs_per_image is None or self.pairs_per_image >= len(pairs) else rng.sample(pairs, self.pairs_per_image)
                    chosen.extend((image, a, b) for a, b in some)
                rng.shuffle(chosen)
                swaps = [k % 2 == 1 for k in range(len(chosen))]
                rng.shuffle(swaps)
                self._sequences[rater] = [(im, b, a) if swap else (im, a, b) for (im, a, b), swap in zip(chosen, swaps)]
            return self._sequences[rater]

    def _is_answered(self, rater: str, comparison: tuple[str, str, str]) -> bool:
        image, a, b = comparison
        return self._answered.get(rater, Counter())[(image, frozenset((a, b)))] > 0

    def next_index(self, rater: str) -> int | None:
        """The index (in the rater's sequence) to show now: the last undone one, else the first unanswered; None when done."""
        with self._lock:
            seq = self.sequence(rater)
            for i in self._front.get(rater, []):
                if not self._is_answered(rater, seq[i]):
                    return i
            return next((i for i, c in enumerate(seq) if not self._is_answered(rater, c)), None)

    def progress(self, rater: str) -> dict[str, int]:
        """{'done', 'total'}: comparisons of the rater's sequence answered, out of all."""
        with self._lock:
            seq = self.sequence(rater)
            return {"done": sum(self._is_answered(rater, c) for c in seq), "total": len(seq)}

    def public_task(self, rater: str, index: int | None) -> dict[str, Any] | None:
        """What the page sees of a comparison: its index and image URLs (tokens), no method name, no path."""
        if index is None:
            return None
        image, left, right = self.sequence(rater)[index]
        url = lambda real: "/img/" + self._token_of[real]
        return {"index": index, "left": url(self._files[left][image]), "right": url(self._files[right][image]),
                "lq": url(self._lq[image]) if self._lq is not None else None}

    def state(self, rater: str) -> dict[str, Any]:
        with self._lock:
            return {"task": self.public_task(rater, self.next_index(rater)), "progress": self.progress(rater)}

    # -- answers --

    def answer(self, rater: str, index: Any, choice: Any, response_ms: Any = None) -> Answer:
        """Record the rater's answer to comparison `index` ('left', 'right' or 'tie'): one line appended and fsynced."""
        if choice not in CHOICES:
            raise StudyError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        with self._lock:
            seq = self.sequence(rater)
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(seq):
                raise StudyError(f"no comparison number {index!r} for this rater")
            if self._is_answered(rater, seq[index]):
                raise AlreadyAnsweredError("this comparison is already answered; undo it first")
            image, left, right = seq[index]
            ms = int(response_ms) if isinstance(response_ms, (int, float)) and not isinstance(response_ms, bool) and 0 <= response_ms < 1e9 else None
            answer = Answer(rater, image, left, right, CHOICES[choice], time.strftime("%Y-%m-%dT%H:%M:%S%z"), ms)
            append_jsonl(self.out, answer.to_record())
            self._order.append(answer)
            self._answered.setdefault(rater, Counter())[answer.key] += 1
            front = self._front.get(rater, [])
            if index in front:
                front.remove(index)
            return answer

    def undo(self, rater: str) -> Answer | None:
        """Take back the rater's most recent answer (its line is removed from the file); that comparison comes next."""
        with self._lock:
            last = next((n for n in range(len(self._order) - 1, -1, -1) if self._order[n].rater == rater), None)
            if last is None:
                return None
            lines = self.out.read_text(encoding="utf-8").splitlines(keepends=True)
            for n in range(len(lines) - 1, -1, -1):
                try:
                    found = parse_answer(lines[n], "") if lines[n].strip() else None
                except StudyResultsError:
                    continue
                if found is not None and found.rater == rater:
                    del lines[n]
                    atomic_write_text(self.out, "".join(lines))
                    break
            answer = self._order.pop(last)
            self._answered[rater][answer.key] -= 1
            seq = self.sequence(rater)
            index = next((i for i, (im, a, b) in enumerate(seq) if (im, frozenset((a, b))) == answer.key), None)
            if index is not None:
                front = self._front.setdefault(rater, [])
                if index in front:
                    front.remove(index)
                front.insert(0, index)
            return answer

    def summary(self) -> str:
        raters = Counter(a.rater for a in self._order)
        who = ", ".join(f"{r} {n}" for r, n in sorted(raters.items())) or "none yet"
        return f"{len(self._order)} answers in {self.out} ({who})"


# ----------------------------------------------------------------------------------------------
# HTTP


def _page_html() -> bytes:
    return resources.files("facereward.study").joinpath("page.html").read_bytes()


class _StudyHTTPServer(LocalServer):
    session: StudySession


class _Handler(LocalHandler):
    server: _StudyHTTPServer
    server_version = "facereward-study"

    def _reply(self, rater: str, status: int = HTTPStatus.OK, **extra: Any) -> None:
        self.send_json(status, dict(extra, **self.server.session.state(rater)))

    def do_GET(self) -> None:
        if not self.host_ok():
            return self.refuse_host()
        path, _, query = self.path.split("#", 1)[0].partition("?")
        session = self.server.session
        if path in ("/", "/index.html"):
            return self.send_page(_page_html())
        if self.send_shared(path):
            return None
        if path == "/api/config":
            return self.send_json(HTTPStatus.OK, {"rater": session.fixed_rater, "lq": session.has_lq})
        if path == "/api/next":
            raw = urllib.parse.parse_qs(query).get("rater", [None])[0]
            try:
                rater = session.rater(raw)
            except StudyError as err:
                return self.send_json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
            return self._reply(rater)
        if path.startswith("/img/"):
            real = session.file_of_token.get(path[len("/img/") :])
            if real is None or not os.path.isfile(real):
                return self.not_found()
            return self.send_image(real)
        return self.not_found()

    def do_POST(self) -> None:
        if not self.host_ok():
            return self.refuse_host()
        path = self.path.split("?", 1)[0]
        if path not in ("/api/answer", "/api/undo"):
            return self.not_found()
        body = self.read_json_body()
        if body is NO_BODY:
            return None
        if not isinstance(body, dict):
            return self.send_json(HTTPStatus.BAD_REQUEST, {"error": "expected a JSON object"})
        session = self.server.session
        try:
            rater = session.rater(body.get("rater"))
        except StudyError as err:
            return self.send_json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
        if path == "/api/undo":
            undone = session.undo(rater)
            return self._reply(rater, undone=undone is not None)
        try:
            session.answer(rater, body.get("index"), body.get("choice"), body.get("response_ms"))
        except AlreadyAnsweredError as err:
            return self._reply(rater, HTTPStatus.CONFLICT, error=str(err))
        except StudyError as err:
            return self._reply(rater, HTTPStatus.BAD_REQUEST, error=str(err))
        return self._reply(rater)


def make_server(session: StudySession, host: str = "127.0.0.1", port: int = 8765) -> LocalServer:
    """A bound (not yet serving) server for `session` on a loopback address; port 0 picks a free port."""
    if not is_loopback(host):
        raise StudyError(f"refusing to serve the study on {host!r}: it binds loopback addresses only (127.0.0.1, ::1, localhost)")
    server = bind_server(_StudyHTTPServer, _Handler, host, port)
    server.session = session
    return server


def run_study(
    methods: Mapping[str, str | Path],
    out: str | Path = "study.jsonl",
    lq: str | Path | None = None,
    rater: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8765,
    pairs_per_image: int | None = None,
    seed: int = 0,
    open_browser: bool = False,
) -> None:
    """`facereward study`: check the folders, print the URL and serve the study page until Ctrl-C."""
    if not is_loopback(host):  # before reading any folder
        raise StudyError(f"refusing to serve the study on {host!r}: it binds loopback addresses only (127.0.0.1, ::1, localhost)")
    session = StudySession(methods, out, lq=lq, rater=rater, pairs_per_image=pairs_per_image, seed=seed)
    for warning in session.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    server = make_server(session, host, port)
    url = server_url(server)
    print(f"study: {len(session.methods)} methods, {len(session.images)} images, {session.per_rater} comparisons per rater; "
          f"{session.summary()}", flush=True)
    print(f"open {url}  (keys: {KEYS_HELP}; Ctrl-C to stop)", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    if serve_until_interrupted(server):
        print(flush=True)
    print(f"stopped: {session.summary()}; analyse with: facereward study-results {session.out}")
