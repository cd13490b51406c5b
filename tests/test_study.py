"""`facereward study` / `study-results`: the statistics against hand-computed values, the answers file, the session
(folders, per-rater sequences, resume), the HTTP server (loopback only, no traversal, no method names) and the page
driven by keyboard in a real headless Chromium, then the results end to end."""

from __future__ import annotations

import http.client
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from facereward.cli import run as cli_run
from facereward.stats import bootstrap_interval
from facereward.study import (
    Answer,
    StudyError,
    StudyResultsError,
    StudySession,
    analyse,
    bradley_terry,
    cohen_kappa,
    fleiss_kappa,
    load_answers,
    make_server,
    parse_method_args,
    wilson_interval,
)
from facereward.study.results import percent_agreement
from tests.conftest import serve_in_thread

METHODS = ("alphaxq", "betaxq", "gammaxq")  # distinctive: searched for in everything the page gets


def make_study(root: Path, methods: tuple[str, ...] = METHODS, n_images: int = 2, size: int = 8) -> tuple[dict[str, Path], Path]:
    """One folder of tiny random PNGs per method (named after it) and an lq/ folder, all with stems 0001..000n."""
    rng = np.random.default_rng(0)
    folders = {}
    for name in (*methods, "lq"):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(n_images):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i + 1:04d}.png")
        folders[name] = folder
    return {m: folders[m] for m in methods}, folders["lq"]


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def running(session: StudySession, port: int = 0):
    return serve_in_thread(make_server(session, port=port))


def request(server: Any, method: str, path: str, body: Any = None, host: str | None = None) -> tuple[int, bytes]:
    """A request with the path sent byte for byte (no client-side '..' normalisation)."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=5)
    try:
        conn.putrequest(method, path, skip_host=host is not None)
        if host is not None:
            conn.putheader("Host", host)
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(data)))
        conn.endheaders(data)
        res = conn.getresponse()
        return res.status, res.read()
    finally:
        conn.close()


# ----------------------------------------------------------------------------------------------
# statistics against hand-computed values


def test_wilson_interval_by_hand() -> None:
    # 7 of 10, z = 1.959964: p = 0.7, z^2/n = 0.3841459, centre = (0.7 + 0.1920729) / 1.3841459 = 0.6444934,
    # half = 1.959964 / 1.3841459 * sqrt(0.021 + 0.0096036) = 1.4160097 * 0.1749390 = 0.2477153
    low, high = wilson_interval(7, 10)
    assert low == pytest.approx(0.6444934 - 0.2477153, abs=2e-7) and high == pytest.approx(0.6444934 + 0.2477153, abs=2e-7)
    assert (round(low, 4), round(high, 4)) == (0.3968, 0.8922)
    low, high = wilson_interval(0, 5)  # never 0 width, never below 0
    assert low == 0 and high == pytest.approx(0.4345, abs=1e-4)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    lows, highs = wilson_interval(np.array([7, 3]), np.array([10, 10]))  # elementwise, symmetric
    assert lows[0] == pytest.approx(1 - highs[1]) and highs[0] == pytest.approx(1 - lows[1])
    # a tie as half a success: 7.5 of 10 lies between 7 and 8 of 10
    assert wilson_interval(7, 10)[0] < wilson_interval(7.5, 10)[0] < wilson_interval(8, 10)[0]


def test_bradley_terry_matches_the_mle_by_hand() -> None:
    # strengths (1, 2, 4): when every pair's wins equal their expected counts under g, the score equations
    # W_i = sum_j N_ij g_i / (g_i + g_j) hold, so g (up to scale) is the MLE: 1:2 of 3, 2:4 of 3 (1 vs 2 wins), 1:4 of 5
    wins = np.array([[0, 1, 1], [2, 0, 1], [4, 2, 0]], dtype=float)
    log_g = bradley_terry(wins)
    assert log_g == pytest.approx(np.log([0.5, 1, 2]), abs=1e-8)  # geometric mean 1: log-strengths sum to 0
    assert log_g.sum() == pytest.approx(0, abs=1e-12)
    # two methods, ties as half wins: 3 wins, 1 loss, 2 ties -> W = (4, 2): g1 / g2 = 2, log-strengths +-ln(2)/2
    two = np.array([[0, 4], [2, 0]], dtype=float)
    assert bradley_terry(two) == pytest.approx([math.log(2) / 2, -math.log(2) / 2], abs=1e-9)
    # the prior: `prior` virtual ties per pair -> W = (4 + 0.5, 2 + 0.5) -> g1 / g2 = 1.8
    assert bradley_terry(two, prior=1.0) == pytest.approx([math.log(1.8) / 2, -math.log(1.8) / 2], abs=1e-9)
    # a method that never lost (or never won): no finite MLE without a prior
    never_lost = np.array([[0, 2, 1], [0, 0, 1], [0, 1, 0]], dtype=float)
    with pytest.raises(ValueError, match="not strongly connected"):
        bradley_terry(never_lost)
    finite = bradley_terry(never_lost, prior=1.0)
    assert np.isfinite(finite).all() and finite.argmax() == 0


def test_kappa_and_agreement_by_hand() -> None:
    # Cohen: p_o = 3/4; a: (0: 1/2, 1: 1/2), b: (0: 1/4, 1: 3/4) -> p_e = 1/8 + 3/8 = 1/2; kappa = (3/4 - 1/2) / (1/2) = 1/2
    assert cohen_kappa([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx(0.5)
    assert cohen_kappa(["a", "b"], ["a", "b"]) == 1.0 and math.isnan(cohen_kappa(["a", "a"], ["a", "a"]))
    # Fleiss, 3 items x 3 raters, categories (x, y): item counts (3, 0), (2, 1), (0, 3)
    # P_i = 1, 1/3, 1 -> P-bar = 7/9; p = (5/9, 4/9) -> P_e = 41/81; kappa = (63/81 - 41/81) / (40/81) = 22/40
    counts = np.array([[3, 0], [2, 1], [0, 3]])
    assert percent_agreement(counts) == pytest.approx(7 / 9)
    assert fleiss_kappa(counts) == pytest.approx(0.55)
    # the worked example of Fleiss (1971) as on Wikipedia: 10 items, 14 raters, 5 categories -> 0.210
    wiki = np.array([[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
                     [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]])
    assert fleiss_kappa(wiki) == pytest.approx(0.2099, abs=1e-4)
    with pytest.raises(ValueError, match="at least 2 ratings"):
        fleiss_kappa(np.array([[1, 0], [2, 0]]))


def test_bootstrap_interval_is_seeded() -> None:
    data = np.random.default_rng(3).normal(size=40)

    def mean(idx: np.ndarray) -> np.ndarray:
        return np.array([data[idx].mean()])

    a = bootstrap_interval(40, mean, n_resamples=300, seed=7)
    b = bootstrap_interval(40, mean, n_resamples=300, seed=7)
    c = bootstrap_interval(40, mean, n_resamples=300, seed=8)
    assert a[0][0] == b[0][0] and a[1][0] == b[1][0] and a[2] == 300
    assert (a[0][0], a[1][0]) != (c[0][0], c[1][0])
    assert a[0][0] < data.mean() < a[1][0]
    # a statistic that fails on some resamples (about half have 25 or fewer distinct items): dropped and counted
    def picky(idx: np.ndarray) -> np.ndarray:
        if len(set(idx.tolist())) <= 25:
            raise ValueError("no estimate")
        return np.array([1.0])

    low, high, used = bootstrap_interval(40, picky, n_resamples=50, seed=0)
    assert 0 < used < 50 and low[0] == high[0] == 1.0


# ----------------------------------------------------------------------------------------------
# the answers file


GOOD = {"rater": "ana", "image": "0001", "method_a": "x", "method_b": "y", "choice": "a"}


def test_answers_file_errors_name_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "answers.jsonl"
    cases = [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({**GOOD, "choice": "left"}), "'choice' must be one of a, b, tie"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "rater"}), "'rater' must be a non-empty string"),
        (json.dumps({**GOOD, "method_b": "x"}), "method_a and method_b are the same"),
        (json.dumps({**GOOD, "image": 3}), "'image' must be a non-empty string"),
    ]
    for bad, message in cases:
        path.write_text(json.dumps(GOOD) + "\n\n" + bad + "\n" + json.dumps(GOOD) + "\n")
        with pytest.raises(StudyResultsError, match=f"^{path}:3: .*{message}"):
            load_answers(path)
    assert cli_run(["study-results", str(path)]) == 2  # the last case, through the command
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}:3: ") and "\n" not in err
    path.write_text("\n")
    with pytest.raises(StudyResultsError, match="no answers"):
        load_answers(path)
    with pytest.raises(StudyResultsError, match="no such file"):
        load_answers(tmp_path / "missing.jsonl")


def test_analyse_a_small_study_by_hand() -> None:
    a = Answer
    answers = [
        a("r1", "1", "x", "y", "a"), a("r2", "1", "y", "x", "b"),    # both: x beats y (sides swapped): agree
        a("r1", "2", "x", "y", "tie"), a("r2", "2", "x", "y", "a"),  # tie vs x: disagree
        a("r1", "1", "y", "z", "a"), a("r1", "1", "x", "z", "a"),
    ]
    res = analyse(answers, n_bootstrap=50, seed=0, prior=1.0)
    rank = {r["method"]: r for r in res["ranking"]}
    # x: 5 comparisons, 4 wins + 1 tie -> 4.5 / 5; y: 1 win (vs z), 1 tie, 3 losses -> 1.5 / 5; z: 0 of 2
    assert rank["x"]["win_rate"] == pytest.approx(0.9) and (rank["x"]["wins"], rank["x"]["ties"], rank["x"]["losses"], rank["x"]["n"]) == (4, 1, 0, 5)
    assert rank["y"]["win_rate"] == pytest.approx(0.3) and (rank["y"]["wins"], rank["y"]["ties"], rank["y"]["losses"]) == (1, 1, 3)
    assert rank["z"]["win_rate"] == 0.0 and rank["z"]["n"] == 2
    assert rank["x"]["win_rate_ci"] == pytest.approx(list(wilson_interval(4.5, 5)))
    assert [r["method"] for r in res["ranking"]] == ["x", "y", "z"] and rank["x"]["rank"] == 1
    assert sum(r["bt_log_strength"] for r in res["ranking"]) == pytest.approx(0, abs=1e-9)
    for r in res["ranking"]:
        assert r["bt_ci"][0] <= r["bt_log_strength"] <= r["bt_ci"][1]
    xy = next(h for h in res["head_to_head"] if {h["method"], h["opponent"]} == {"x", "y"})
    assert (xy["method"], xy["n"], xy["wins"], xy["ties"], xy["win_rate"]) == ("x", 4, 3, 1, 0.875)
    ag = res["agreement"]
    assert ag["comparisons"] == 2 and ag["percent_agreement"] == 0.5
    assert ag["pairs"] == [{"raters": ["r1", "r2"], "shared": 2, "agreement": 0.5, "cohen_kappa": 0.0}]
    assert "Fleiss" in ag["kappa"] and "half a win" in res["settings"]["ties"]
    assert "sum to 0" in res["settings"]["bradley_terry"]


# ----------------------------------------------------------------------------------------------
# the session


def test_folder_errors_are_one_line_and_name_the_folder(tmp_path: Path) -> None:
    methods, lq = make_study(tmp_path)
    out = tmp_path / "a.jsonl"
    with pytest.raises(StudyError, match="at least 2 methods"):
        StudySession({"alphaxq": methods["alphaxq"]}, out)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(StudyError, match=f"^{empty}: no images"):
        StudySession({**methods, "empty": empty}, out)
    with pytest.raises(StudyError, match=f"^{tmp_path / 'nope'}: no such folder"):
        StudySession({**methods, "nope": tmp_path / "nope"}, out)
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (4, 4)).save(other / "zzz.png")
    with pytest.raises(StudyError, match=f"^{other}: none of its 1 image"):
        StudySession({**methods, "other": other}, out)
    Image.new("RGB", (4, 4)).save(methods["betaxq"] / "0001.jpg")
    with pytest.raises(StudyError, match=f"^{methods['betaxq']}: two images with the stem '0001'"):
        StudySession(methods, out)
    (methods["betaxq"] / "0001.jpg").unlink()
    # partly matching sets: only the common stems are used, with a warning naming the folder
    Image.new("RGB", (4, 4)).save(methods["betaxq"] / "0009.png")
    s = StudySession(methods, out, lq=lq)
    assert s.images == ["0001", "0002"] and any(w.startswith(f"{methods['betaxq']}: 1 of 3") for w in s.warnings)

    assert parse_method_args([str(methods["alphaxq"]), f"b={methods['betaxq']}"]) == {"alphaxq": methods["alphaxq"], "b": methods["betaxq"]}
    with pytest.raises(StudyError, match="given twice"):
        parse_method_args([str(methods["alphaxq"]), f"alphaxq={methods['betaxq']}"])


def test_sequences_are_per_rater_deterministic_and_balanced(tmp_path: Path) -> None:
    methods, lq = make_study(tmp_path, methods=("m1", "m2", "m3", "m4"), n_images=4)
    s = StudySession(methods, tmp_path / "a.jsonl", lq=lq, seed=1)
    t = StudySession(methods, tmp_path / "a.jsonl", lq=lq, seed=1)
    ana = s.sequence("ana")
    assert ana == t.sequence("ana") and ana != s.sequence("bob") and ana != StudySession(methods, tmp_path / "a.jsonl", seed=2).sequence("ana")
    assert len(ana) == 4 * 6 == s.per_rater and len({(im, frozenset((a, b))) for im, a, b in ana}) == 24
    assert sum(a > b for _, a, b in ana) == 12  # the later method on the left in exactly half
    assert [im for im, _, _ in ana] != sorted(im for im, _, _ in ana)
    few = StudySession(methods, tmp_path / "b.jsonl", pairs_per_image=2)
    assert len(few.sequence("ana")) == 8 == few.per_rater
    assert all(sum(im == x for im, _, _ in few.sequence("ana")) == 2 for x in few.images)


# ----------------------------------------------------------------------------------------------
# the server


def test_server_is_loopback_only_blind_and_refuses_traversal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    methods, lq = make_study(tmp_path)
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    (methods["alphaxq"] / "0003.png").symlink_to(secret)  # a link out of the folder: never served
    out = tmp_path / "answers.jsonl"
    session = StudySession(methods, out, lq=lq, rater="ana")
    for host in ("0.0.0.0", "192.168.1.2", "example.com", "::"):
        with pytest.raises(StudyError, match="loopback addresses only"):
            make_server(session, host=host, port=0)
    code = cli_run(["study", *map(str, methods.values()), "--host", "0.0.0.0", "--port", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: refusing to serve the study on '0.0.0.0'") and "\n" not in err
    assert secret not in [Path(p) for p in session.file_of_token.values()]

    with running(session) as server:
        assert server.server_address[0] == "127.0.0.1"
        seen = b""
        for path in ("/", "/api/config", "/api/next", "/api/next?rater=ana"):
            status, body = request(server, "GET", path)
            assert status == 200, path
            seen += body
        assert b"://" not in request(server, "GET", "/")[1]  # nothing loaded from elsewhere
        state = json.loads(request(server, "GET", "/api/next")[1])
        task = state["task"]
        assert set(task) == {"index", "left", "right", "lq"} and state["progress"] == {"done": 0, "total": 6}
        for side in ("left", "right", "lq"):
            status, body = request(server, "GET", task[side])
            assert status == 200 and body == Path(session.file_of_token[task[side][len("/img/"):]]).read_bytes()
        status, body = request(server, "POST", "/api/answer", {"index": task["index"], "choice": "left", "response_ms": 1234})
        seen += body
        assert status == 200 and json.loads(body)["progress"]["done"] == 1
        (line,) = lines(out)
        assert line["rater"] == "ana" and line["choice"] == "a" and line["response_ms"] == 1234
        status, body = request(server, "POST", "/api/answer", {"index": task["index"], "choice": "right"})
        assert status == 409 and "already answered" in json.loads(body)["error"]
        status, body = request(server, "POST", "/api/answer", {"rater": "bob", "index": 0, "choice": "left"})
        assert status == 400 and "one rater only" in json.loads(body)["error"]
        status, body = request(server, "POST", "/api/answer", {"index": 0, "choice": "maybe"})
        seen += body
        assert status == 400 and len(lines(out)) == 1
        for name in METHODS:
            assert name.encode() not in seen, name  # blind: no method name in the page or any reply
        good = task["left"]
        for bad in [
            "/img/../alphaxq/0001.png", "/img/%2e%2e/alphaxq/0001.png", "/img/..%2Falphaxq%2F0001.png",
            f"/img/{methods['alphaxq'] / '0001.png'}", "/img/" + str(methods["alphaxq"] / "0001.png").replace("/", "%2F"),
            "/alphaxq/0001.png", "/files/alphaxq/0001.png", "/img/", "/img/nottoken", good + "x", good + "/..",
            "/img/../../../etc/passwd", "/../../etc/passwd", "/img/" + "A" * 24,
        ]:
            status, body = request(server, "GET", bad)
            assert status == 404, (bad, status)
            assert b"root:" not in body
        assert request(server, "GET", "/api/next", host="evil.example:80")[0] == 403  # DNS-rebinding guard
        assert request(server, "GET", "/api/next?rater=ana", host="localhost:1")[0] == 200


def test_resume_after_a_restart_and_a_torn_line(tmp_path: Path) -> None:
    methods, lq = make_study(tmp_path)
    out = tmp_path / "answers.jsonl"
    s = StudySession(methods, out, lq=lq)
    first = [s.next_index("ana")]
    s.answer("ana", first[0], "left")
    first.append(s.next_index("ana"))
    s.answer("ana", first[1], "tie")
    s.answer("bob", s.next_index("bob"), "right")
    assert s.undo("ana").choice == "tie" and s.next_index("ana") == first[1] and len(lines(out)) == 2
    s.answer("ana", first[1], "right")
    with open(out, "a") as f:
        f.write('{"rater": "ana", "ima')  # a write cut off by a crash
    r = StudySession(methods, out, lq=lq)
    assert any("dropped an incomplete last line" in w for w in r.warnings) and len(lines(out)) == 3
    answered = {(im, frozenset((a, b))) for im, a, b in (s.sequence("ana")[i] for i in first)}
    assert r.progress("ana") == {"done": 2, "total": 6} and r.progress("bob")["done"] == 1
    nxt = r.sequence("ana")[r.next_index("ana")]
    assert (nxt[0], frozenset(nxt[1:])) not in answered
    (out.parent / "bad.jsonl").write_text(json.dumps(GOOD) + "\nnope\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(StudyError, match=r"bad\.jsonl:2: not valid JSON"):
        StudySession(methods, out.parent / "bad.jsonl")


# ----------------------------------------------------------------------------------------------
# the page in a real browser, then the results


_SHOWN_JS = """
const $ = (id) => document.getElementById(id);
return {state: document.body.dataset.state, index: $('task').dataset.index, progress: $('progress').textContent,
        left: $('left').getAttribute('src'), right: $('right').getAttribute('src'), lq: $('lq').getAttribute('src'),
        loaded: $('left').naturalWidth > 0 && $('right').naturalWidth > 0 && $('lq').naturalWidth > 0,
        hint: $('hint').innerText, who: $('who').textContent, error: $('error').textContent};
"""


def test_study_with_the_keyboard_in_chromium_then_results(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    methods, lq = make_study(tmp_path)
    out = tmp_path / "answers.jsonl"
    session = StudySession(methods, out, lq=lq, seed=5)

    def method_of(url: str, s: StudySession) -> str:
        return Path(s.file_of_token[url[len("/img/"):]]).parent.name

    def shown() -> dict[str, Any]:
        return browser.execute_script(_SHOWN_JS)

    def wait(progress: str, done: bool = False) -> dict[str, Any]:
        def settled(_: Any) -> dict[str, Any] | bool:
            s = shown()
            return s if s["progress"] == progress and s["state"] == ("done" if done else "task") and (done or s["loaded"]) else False

        return WebDriverWait(browser, 10).until(settled, message=f"wanted {progress!r}; saw {shown()}")

    def press(key: str, s: StudySession, expect: str, choice: str | None) -> dict[str, Any]:
        before = shown()
        n = len(lines(out))
        ActionChains(browser).send_keys(key).perform()
        after = wait(expect, done=expect.startswith("6 /"))
        if choice is not None:  # the answer reached the file at once, with the sides as shown
            assert len(lines(out)) == n + 1
            line = lines(out)[-1]
            assert (line["method_a"], line["method_b"]) == (method_of(before["left"], s), method_of(before["right"], s))
            assert line["choice"] == choice and line["rater"] == "ana" and line["image"] in ("0001", "0002")
            assert line["response_ms"] >= 0 and line["time"]
        return after

    def key_of(line: dict[str, Any]) -> tuple[str, frozenset[str]]:
        return line["image"], frozenset((line["method_a"], line["method_b"]))

    with running(session) as server:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
        WebDriverWait(browser, 10).until(lambda d: shown()["state"] == "name")
        field = browser.find_element(By.ID, "rater-name")
        field.send_keys("an1")  # digits typed into the name are not answers
        field.send_keys(Keys.BACKSPACE, "a", Keys.ENTER)
        s = wait("0 / 6 answered")
        assert "rater: ana" in s["who"] and not lines(out)
        for key in ("←", "→", "↓", "=", "Backspace", "1", "2", "3"):
            assert key in s["hint"]
        press(Keys.ARROW_LEFT, session, "1 / 6 answered", "a")
        press(Keys.ARROW_RIGHT, session, "2 / 6 answered", "b")
        press(Keys.ARROW_DOWN, session, "3 / 6 answered", "tie")
        undone_key = key_of(lines(out)[-1])
        before_undo = shown()
        s = press(Keys.BACKSPACE, session, "2 / 6 answered", None)  # undo: the tie's line is gone, its pair is back
        assert len(lines(out)) == 2 and (s["left"], s["right"]) != (before_undo["left"], before_undo["right"])
        assert (session.sequence("ana")[int(s["index"])][0], frozenset(session.sequence("ana")[int(s["index"])][1:])) == undone_key
        press("=", session, "3 / 6 answered", "tie")
        press("2", session, "4 / 6 answered", "b")
        source = browser.page_source
        for name in METHODS:
            assert name not in source
        answered = {key_of(x) for x in lines(out)}
        assert len(answered) == 4

        port = server.server_address[1]

    # a new server on the same file and port: the rater (remembered by the page) resumes at the first unanswered one
    session2 = StudySession(methods, out, lq=lq, seed=5)
    with running(session2, port) as server:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
        s = wait("4 / 6 answered")
        im, a, b = session2.sequence("ana")[int(s["index"])]
        assert (im, frozenset((a, b))) not in answered and {method_of(s["left"], session2), method_of(s["right"], session2)} == {a, b}
        press("1", session2, "5 / 6 answered", "a")
        s = shown()
        im, a, b = session2.sequence("ana")[int(s["index"])]
        assert (im, frozenset((a, b))) not in answered
        press("3", session2, "6 / 6 answered", "tie")
        assert len({key_of(x) for x in lines(out)}) == 6  # every comparison once, none shown twice
        assert shown()["state"] == "done"
        # a second rater through the API, answering the same comparisons (for agreement)
        for _ in range(6):
            task = session2.state("bob")["task"]
            session2.answer("bob", task["index"], "left")

    result_dir = tmp_path / "results"
    assert cli_run(["study-results", str(out), "--out", str(result_dir), "--bootstrap", "200", "--seed", "3"]) == 0
    data = json.loads((result_dir / "study_results.json").read_text())
    assert data["n_answers"] == 12 and data["raters"] == {"ana": 6, "bob": 6} and set(data["methods"]) == set(METHODS)
    assert data["agreement"]["comparisons"] == 6 and data["agreement"]["pairs"][0]["shared"] == 6
    assert data["settings"]["bootstrap_used"] == 200
    md = (result_dir / "study_results.md").read_text()
    assert "| rank | method |" in md and "Fleiss' kappa" in md
    again = tmp_path / "again"
    assert cli_run(["study-results", str(out), "--out", str(again), "--bootstrap", "200", "--seed", "3"]) == 0
    assert json.loads((again / "study_results.json").read_text())["ranking"] == data["ranking"]  # seeded: reproducible
