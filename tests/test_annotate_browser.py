"""`facereward annotate`: the session (task order, labels, undo, resume), the HTTP server (API, file
serving, loopback bind) and the page driven by keyboard in a real headless Chromium."""

from __future__ import annotations

import http.client
import inspect
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from facereward.annotate import (
    AnnotationError,
    AnnotationSession,
    make_server,
    run_annotate,
    serve,
)
from facereward.data.preferences import load_pairs
from tests.conftest import serve_in_thread


def make_candidates_dir(root: Path, n_items: int = 2, k: int = 3, gt_items: tuple[int, ...] = (0,), size: int = 8) -> Path:
    """Fabricate a candidates folder (as `facereward candidates` writes it) with tiny solid-colour PNGs."""
    rng = np.random.default_rng(0)
    items = []

    def png(rel: str) -> str:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        return rel

    for i in range(n_items):
        name = f"{i + 1:04d}"
        items.append({
            "name": name,
            "lq": png(f"lq/{name}.png"),
            "gt": png(f"gt/{name}.png") if i in gt_items else None,
            "caption": f"a face number {i + 1}",
            "candidates": [
                {"path": png(f"candidates/{name}/c{j:02d}.png"), "model": "base" if j % 2 == 0 else "refl", "seed": j, "eta": 0.5}
                for j in range(k)
            ],
        })
    (root / "candidates.json").write_text(json.dumps({"items": items}, indent=1), encoding="utf-8")
    return root


def label_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def running(session: AnnotationSession):
    """The session's server on a free loopback port, serving in a thread."""
    return serve_in_thread(make_server(session, port=0))


def raw_get(server: Any, path: str, host: str | None = None) -> tuple[int, bytes, str]:
    """GET with the path sent byte for byte (no client-side '..' normalisation)."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=5)
    try:
        conn.putrequest("GET", path, skip_host=host is not None)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        res = conn.getresponse()
        return res.status, res.read(), res.getheader("Content-Type") or ""
    finally:
        conn.close()


def post(server: Any, path: str, body: Any, content_type: str = "application/json") -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=5)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": content_type})
        res = conn.getresponse()
        return res.status, json.loads(res.read() or b"{}")
    finally:
        conn.close()


# ----------------------------------------------------------------------------------------------
# session


def test_tasks_are_deterministic_complete_and_position_balanced(tmp_path: Path) -> None:
    root = make_candidates_dir(tmp_path / "c", n_items=3, k=4)
    a, b = AnnotationSession(root, seed=3), AnnotationSession(root, seed=3)
    assert a.tasks == b.tasks
    assert [t["pair_id"] for t in AnnotationSession(root, seed=4).tasks] != [t["pair_id"] for t in a.tasks]
    assert len(a.tasks) == 3 * 6
    unordered = {frozenset((t["left"], t["right"])) for t in a.tasks}
    assert len(unordered) == 18 and all(t["left"].split("/")[1] == t["right"].split("/")[1] == t["item"] for t in a.tasks)
    swapped = sum(t["left"] > t["right"] for t in a.tasks)  # the later candidate shown on the left
    assert swapped == 9
    items_in_order = [t["item"] for t in a.tasks]
    assert items_in_order != sorted(items_in_order)  # shuffled across items

    few = AnnotationSession(root, pairs_per_item=2, seed=3)
    assert len(few.tasks) == 6 and {t["item"]: 0 for t in few.tasks}.keys() == {"0001", "0002", "0003"}
    assert all(sum(t["item"] == name for t in few.tasks) == 2 for name in ("0001", "0002", "0003"))
    assert few.progress() == (0, 6)


def test_session_labels_undo_and_resume(tmp_path: Path) -> None:
    root = make_candidates_dir(tmp_path / "c")
    s = AnnotationSession(root, annotator="ann")
    labels = root / "labels.jsonl"
    t = [task["pair_id"] for task in s.tasks]
    assert s.next_task()["pair_id"] == t[0] and s.progress() == (0, 6)

    first = s.next_task()
    assert s.label(t[0], "right")["pair_id"] == t[1]
    (line,) = label_lines(labels)
    assert line["chosen"] == first["right"] and line["rejected"] == first["left"]
    assert line["lq"] == first["lq"] and line["source"] == "human" and line["annotator"] == "ann" and "tie" not in line
    s.label(t[1], "tie")
    assert label_lines(labels)[1]["tie"] is True
    s.label(t[2], "skip")
    assert len(label_lines(labels)) == 2 and s.progress() == (3, 6) and s.stats()["skipped"] == 1
    with pytest.raises(AnnotationError, match="already skipped"):
        s.label(t[2], "left")
    with pytest.raises(AnnotationError, match="choice must be one of"):
        s.label(t[3], "both")
    with pytest.raises(AnnotationError, match="unknown pair id"):
        s.label("nope", "left")

    assert s.undo() == t[2] and s.next_task()["pair_id"] == t[2] and s.progress() == (2, 6)
    assert s.undo() == t[1] and s.next_task()["pair_id"] == t[1]
    assert len(label_lines(labels)) == 1  # the tie line is gone
    s.label(t[3], "left")  # out of order is allowed through the API
    events = label_lines(root / "labels.jsonl.events")
    assert [e["event"] for e in events] == ["label", "tie", "skip", "undo", "undo", "label"]
    assert all(e["annotator"] == "ann" for e in events)

    # a new session on the same folder: the same decisions, and the undone pairs come first again
    r = AnnotationSession(root, annotator="ann")
    assert r.progress() == s.progress() == (2, 6)
    assert r.next_task() == s.next_task() and r.next_task()["pair_id"] == t[1]
    assert r.undo() == t[3] and len(label_lines(labels)) == 1
    assert AnnotationSession(root).next_task()["pair_id"] == t[3]
    loaded = load_pairs(labels)  # the labels file is a valid preference file
    assert loaded[0].chosen == root / first["right"]


def test_session_reconciles_a_crash_between_label_and_event(tmp_path: Path) -> None:
    root = make_candidates_dir(tmp_path / "c")
    s = AnnotationSession(root)
    t = s.tasks
    s.label(t[0]["pair_id"], "left")
    # the labels line of t[1] was written, then the process died before its event
    from facereward.data.preferences import append_pair

    append_pair(root / "labels.jsonl", {"chosen": t[1]["left"], "rejected": t[1]["right"]})
    with open(root / "labels.jsonl.events", "a") as f:
        f.write('{"event": "skip", "pair_id": "00')  # and a torn event line
    r = AnnotationSession(root)
    assert r.progress() == (2, 6) and r.next_task()["pair_id"] == t[2]["pair_id"]
    assert r.undo() == t[1]["pair_id"] and len(label_lines(root / "labels.jsonl")) == 1


def test_bad_candidates_folders_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="not a candidates folder"):
        AnnotationSession(tmp_path)
    root = make_candidates_dir(tmp_path / "c")
    meta = json.loads((root / "candidates.json").read_text())
    meta["items"][0]["candidates"][1]["path"] = "../../etc/passwd"
    (root / "candidates.json").write_text(json.dumps(meta))
    with pytest.raises(AnnotationError, match=r"items\[0\]\.candidates\[1\]\.path: path '../../etc/passwd' must be relative and inside"):
        AnnotationSession(root)
    meta["items"][0]["candidates"][1]["path"] = "candidates/0001/missing.png"
    (root / "candidates.json").write_text(json.dumps(meta))
    with pytest.raises(AnnotationError, match="image not found"):
        AnnotationSession(root)


# ----------------------------------------------------------------------------------------------
# HTTP server


def test_server_binds_loopback_by_default_and_warns_otherwise(tmp_path: Path) -> None:
    for fn in (serve, run_annotate, make_server):
        assert inspect.signature(fn).parameters["host"].default == "127.0.0.1"
    session = AnnotationSession(make_candidates_dir(tmp_path / "c"))
    server = make_server(session, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()
    with pytest.warns(UserWarning, match="not a loopback address"):
        server = make_server(session, host="0.0.0.0", port=0)
    server.server_close()


def test_http_api_and_file_serving_refuses_traversal(tmp_path: Path) -> None:
    root = make_candidates_dir(tmp_path / "c")
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    # a listed image that is a symlink pointing out of DIR
    (root / "gt" / "0001.png").unlink()
    (root / "gt" / "0001.png").symlink_to(secret)
    (root / "candidates" / "0001" / "out.png").symlink_to(secret)
    session = AnnotationSession(root)
    with running(session) as server:
        status, body, ctype = raw_get(server, "/")
        assert status == 200 and ctype.startswith("text/html") and b'href="/localweb.css"' in body
        status, body, ctype = raw_get(server, "/localweb.css")  # the pages' shared style
        assert status == 200 and ctype.startswith("text/css") and b"image-rendering: pixelated" in body
        assert not re.search(rb"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(""", body), "the page must not load external resources"

        lq = session.tasks[0]["lq"]
        status, body, ctype = raw_get(server, "/files/" + lq)
        assert status == 200 and ctype == "image/png" and body == (root / lq).read_bytes()
        for bad in [
            "/files/../../etc/passwd",
            "/files/%2e%2e/%2e%2e/etc/passwd",
            "/files/..%2F..%2Fetc%2Fpasswd",
            "/files//etc/passwd",
            "/files/%2Fetc%2Fpasswd",
            "/files/lq/../candidates.json",
            "/files/candidates.json",
            "/files/gt/0001.png",  # listed, but a symlink out of DIR
            "/files/candidates/0001/out.png",  # a symlink out of DIR, not listed
            "/files/lq/nothere.png",
            "/../../etc/passwd",
        ]:
            status, body, _ = raw_get(server, bad)
            assert status == 404, (bad, status)
            assert b"root:" not in body

        status, _, _ = raw_get(server, "/api/next", host="evil.example:80")
        assert status == 403  # DNS-rebinding guard on a loopback bind
        status, data = post(server, "/api/label", {"pair_id": session.tasks[0]["pair_id"], "choice": "left"}, content_type="text/plain")
        assert status == 415 and session.progress() == (0, 6)

        status, body, _ = raw_get(server, "/api/next")
        state = json.loads(body)
        assert state["progress"] == {"done": 0, "total": 6, "labelled": 0, "skipped": 0}
        task = state["task"]
        assert task["pair_id"] == session.tasks[0]["pair_id"] and task["left"]["url"] == "/files/" + task["left"]["path"]
        assert "model" not in task["left"]  # blind labelling

        status, data = post(server, "/api/label", {"pair_id": task["pair_id"], "choice": "right"})
        assert status == 200 and data["progress"]["done"] == 1 and data["task"]["pair_id"] == session.tasks[1]["pair_id"]
        assert label_lines(root / "labels.jsonl")[0]["chosen"] == task["right"]["path"]
        status, data = post(server, "/api/label", {"pair_id": task["pair_id"], "choice": "left"})
        assert status == 409 and "already labelled" in data["error"] and data["progress"]["done"] == 1
        status, data = post(server, "/api/label", {"pair_id": data["task"]["pair_id"], "choice": "maybe"})
        assert status == 400 and "choice must be one of" in data["error"]
        status, data = post(server, "/api/undo", {})
        assert status == 200 and data["undone"] == task["pair_id"] and data["task"]["pair_id"] == task["pair_id"]
        assert not label_lines(root / "labels.jsonl")
        status, body, _ = raw_get(server, "/api/progress")
        assert json.loads(body) == {"done": 0, "total": 6, "labelled": 0, "skipped": 0}


def test_run_annotate_prints_the_url_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    root = make_candidates_dir(tmp_path / "c")
    code = "import sys; from facereward.annotate import run_annotate; run_annotate(sys.argv[1], port=0, annotator='cli')"
    # a job started in the background by a non-interactive shell (a CI runner, `cmd &`) ignores SIGINT, and a child
    # inherits that, so Python would install no KeyboardInterrupt handler: give the server Ctrl-C's default back
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = proc.stdout.readline()
        assert "0 / 6 pairs done" in first, first + proc.stderr.read() if proc.poll() is not None else first
        url_line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", url_line)
        assert match, url_line
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=5)
        conn.request("GET", "/api/progress")
        assert json.loads(conn.getresponse().read())["total"] == 6
        conn.close()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "stopped: 0 labelled, 0 skipped, 6 left" in out


# ----------------------------------------------------------------------------------------------
# the page in a real browser


_SHOWN_JS = """
const $ = (id) => document.getElementById(id);
const img = (id) => ({path: $(id).dataset.path || null, src: $(id).getAttribute('src'), loaded: $(id).naturalWidth > 0,
                      rendering: getComputedStyle($(id)).imageRendering});
return {state: document.body.dataset.state, pair: $('task').dataset.pairId, progress: $('progress').textContent,
        left: img('left'), right: img('right'), lq: img('lq'), gt: img('gt'),
        gtVisible: $('gt-fig').offsetParent !== null, caption: $('caption').textContent,
        doneVisible: $('done').offsetParent !== null, hint: $('hint').innerText, error: $('error').textContent};
"""


def test_label_with_the_keyboard_in_chromium(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    started = time.monotonic()
    root = make_candidates_dir(tmp_path / "c")
    labels = root / "labels.jsonl"
    session = AnnotationSession(root, annotator="tester")
    order = [t["pair_id"] for t in session.tasks]
    by_id = {t["pair_id"]: t for t in session.tasks}

    def shown() -> dict[str, Any]:
        return browser.execute_script(_SHOWN_JS)

    def press(key: str, expect_progress: str, expect_pair: str | None) -> dict[str, Any]:
        ActionChains(browser).send_keys(key).perform()

        def settled(_: Any) -> dict[str, Any] | bool:
            s = shown()
            ok = s["progress"] == expect_progress and (s["state"] == "done" if expect_pair is None else s["pair"] == expect_pair)
            return s if ok else False

        return WebDriverWait(browser, 10).until(settled, message=f"after {key!r}: wanted {expect_progress!r}, pair {expect_pair}; saw {shown()}")

    def check_pair_on_screen(s: dict[str, Any]) -> None:
        task = by_id[s["pair"]]
        assert (s["left"]["path"], s["right"]["path"], s["lq"]["path"]) == (task["left"], task["right"], task["lq"])
        for side in ("left", "right", "lq"):
            assert s[side]["src"] == "/files/" + s[side]["path"] and s[side]["loaded"], s
        assert s["left"]["rendering"] == "pixelated"  # 8x8 images blown up: nearest neighbour
        assert s["caption"] == task["caption"]
        assert s["gtVisible"] == (task["gt"] is not None) and s["gt"]["path"] == task["gt"]

    with running(session) as server:
        assert server.server_address[0] == "127.0.0.1"
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        browser.get(url)
        s = WebDriverWait(browser, 10).until(lambda d: shown() if shown()["state"] == "task" else False)
        assert s["pair"] == order[0] and s["progress"] == "0 / 6 labelled"
        for key in ("←", "→", "1", "2", "t", "3", "s", "space", "u", "Backspace"):
            assert key in s["hint"]
        check_pair_on_screen(s)

        # ArrowLeft: left is chosen
        before = s
        s = press(Keys.ARROW_LEFT, "1 / 6 labelled", order[1])
        (line,) = label_lines(labels)
        assert (line["chosen"], line["rejected"]) == (before["left"]["path"], before["right"]["path"])
        assert line["annotator"] == "tester" and line["source"] == "human" and line["lq"] == before["lq"]["path"]
        check_pair_on_screen(s)

        # ArrowRight: right is chosen
        before = s
        s = press(Keys.ARROW_RIGHT, "2 / 6 labelled", order[2])
        line = label_lines(labels)[1]
        assert (line["chosen"], line["rejected"]) == (before["right"]["path"], before["left"]["path"]) and "tie" not in line
        check_pair_on_screen(s)

        # t: a tie
        before = s
        first_two = label_lines(labels)
        s = press("t", "3 / 6 labelled", order[3])
        line = label_lines(labels)[2]
        assert line["tie"] is True and {line["chosen"], line["rejected"]} == {before["left"]["path"], before["right"]["path"]}

        # s: skip writes no label, only an event
        s = press("s", "4 / 6 labelled", order[4])
        assert len(label_lines(labels)) == 3
        event = label_lines(root / "labels.jsonl.events")[-1]
        assert (event["event"], event["pair_id"]) == ("skip", order[3])

        # u: undo the skip (the pair comes back), u again: undo the tie (its line is removed)
        s = press("u", "3 / 6 labelled", order[3])
        assert len(label_lines(labels)) == 3
        s = press("u", "2 / 6 labelled", order[2])
        assert label_lines(labels) == first_two  # the tie line is gone, the others untouched

        # 2: relabel the un-tied pair as right-better; the undone skip comes next
        before = s
        s = press("2", "3 / 6 labelled", order[3])
        line = label_lines(labels)[2]
        assert before["pair"] == order[2] and (line["chosen"], line["rejected"]) == (before["right"]["path"], before["left"]["path"])

    # a new server and session on the same folder continue at the first pair not handled
    session2 = AnnotationSession(root, annotator="tester")
    handled = {order[0], order[1], order[2]}
    first_open = next(t["pair_id"] for t in session2.tasks if t["pair_id"] not in handled)
    assert session2.next_task()["pair_id"] == first_open == order[3]
    assert session2.progress() == (3, 6)
    with running(session2) as server:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
        s = WebDriverWait(browser, 10).until(lambda d: shown() if shown()["state"] == "task" else False)
        assert s["pair"] == order[3] and s["progress"] == "3 / 6 labelled"
        check_pair_on_screen(s)

        # finish with the digit keys and Space
        s = press("1", "4 / 6 labelled", order[4])
        s = press("3", "5 / 6 labelled", order[5])
        s = press(" ", "6 / 6 labelled", None)
        assert s["doneVisible"] and len(label_lines(labels)) == 5
        # Backspace undoes from the done screen: the skipped last pair comes back
        s = press(Keys.BACKSPACE, "5 / 6 labelled", order[5])
        assert not s["doneVisible"] and len(label_lines(labels)) == 5
        s = press(Keys.BACKSPACE, "4 / 6 labelled", order[4])
        assert len(label_lines(labels)) == 4 and s["error"] == ""
    pairs = load_pairs(labels)
    assert len(pairs) == 4 and all(p.annotator == "tester" for p in pairs)
    assert time.monotonic() - started < 60
