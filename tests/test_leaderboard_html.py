"""The published index.html in a real headless Chromium (Debian's ``chromium`` package).

Chromium is driven over the Chrome DevTools Protocol on a pipe (``--remote-debugging-pipe``: JSON
messages ending in NUL on file descriptors 3 and 4), so the test needs no websocket library and no
port. Clicks are real mouse events at the header's position, not ``element.click()``.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ray_helpers import finished_smoke_search
from test_leaderboard import make_search_dir, record, small_search

from plora_ray import leaderboard as lb

EVIL = "<script>window.__pwned=1</script>"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1400,1000",
]


def chromium_path() -> str:
    for cand in (
        os.environ.get("PLORA_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
        shutil.which("google-chrome"),
    ):
        if cand and os.path.isfile(cand):
            return cand
    pytest.fail(
        "the HTML tests need Chromium: apt-get install -y --no-install-recommends "
        "chromium (.ci/run does), or set PLORA_CHROMIUM to a Chrome/Chromium binary"
    )


class Browser:
    """A headless Chromium with one page, spoken to over the DevTools pipe."""

    def __init__(self, binary: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="plora-chromium-")
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4. Move our ends above any fd
        # the child will use, so the dup2 calls below cannot overwrite one another.
        hi = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w)]
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def child_fds() -> None:
            os.dup2(hi[0], 3)
            os.dup2(hi[1], 4)

        self.proc = subprocess.Popen(
            [
                binary,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={self.profile}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            preexec_fn=child_fds,
            pass_fds=(3, 4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in hi:
            os.close(fd)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=True)

    def _recv(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._r], [], [], max(left, 0))
            if not ready:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the pipe (exit code {self.proc.poll()})")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: bool = False,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._recv(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for i, ev in enumerate(self.events):
            if ev.get("method") == method:
                return self.events.pop(i)
        while True:
            ev = self._recv(deadline)
            if ev.get("method") == method:
                return ev
            self.events.append(ev)

    def open(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", {"url": url}, session=True)
        self.wait_event("Page.loadEventFired")
        self.eval("0")  # drain: every event of the load is in self.events now

    def eval(self, expression: str) -> Any:
        res = self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True
        )
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def click(self, selector: str) -> None:
        """A real left click (mouse pressed + released) at the centre of ``selector``."""
        box = self.eval(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            "e.scrollIntoView({block: 'center', inline: 'center'});"
            "const r = e.getBoundingClientRect();"
            "return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": box[0], "y": box[1], "button": "left", "clickCount": 1},
                session=True,
            )

    def errors(self) -> list[str]:
        """JS exceptions, console errors and browser log errors (CSP violations land here)."""
        out = []
        for ev in self.events:
            m, p = ev.get("method"), ev.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(json.dumps(p.get("exceptionDetails"))[:500])
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(json.dumps(p.get("args"))[:500])
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(p["entry"].get("text", "")[:500])
        return out

    def requested_urls(self) -> list[str]:
        return [
            ev["params"]["request"]["url"]
            for ev in self.events
            if ev.get("method") == "Network.requestWillBeSent"
        ]

    def screenshot(self, path: Path) -> None:
        data = self.call(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=True
        )["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._r)
        os.close(self._w)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    b = Browser(chromium_path())
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def board_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A published board of 11 trials, one of them with <script> in its params, id and reason,
    in a search whose name holds <script> too."""
    root = tmp_path_factory.mktemp("html")
    d = small_search(root, name="unit")
    evil = record(
        "evil" + EVIL,
        "plora",
        8,
        gsm8k=0.05,
        mmlu=0.30,
        minute=10,
        reason=EVIL,
        params={"lora.rank": 8, "optim.lr": 2e-4, "note": EVIL},
    )
    (d / "trials" / "evil.json").write_text(json.dumps(evil))
    named = make_search_dir(
        root, "named" + EVIL, [record("n1", gsm8k=0.26, mmlu=0.42)], study=False, dirname="named"
    )
    out = root / "merged"
    assert lb.leaderboard_command([str(d), str(named)], str(out)) == 0
    return out / "index.html"


@pytest.fixture(scope="module")
def loaded(browser: Browser, board_page: Path) -> Browser:
    browser.open(board_page.as_uri())
    return browser


def test_page_renders_without_errors_or_network_with_one_row_per_trial(loaded: Browser) -> None:
    assert loaded.errors() == []
    assert loaded.requested_urls() and all(u.startswith("file://") for u in loaded.requested_urls())
    assert loaded.eval("document.querySelectorAll('#board tbody tr').length") == 11
    labels = loaded.eval(
        "[...document.querySelectorAll('#board tbody tr')].map(r => r.dataset.trial)"
    )
    assert len(set(labels)) == 11 and "unit/t1" in labels and f"named{EVIL}/n1" in labels
    assert loaded.eval("document.querySelector('#board tbody tr td').textContent") == "1"


def test_clicking_a_column_header_sorts_the_table(loaded: Browser) -> None:
    headers = loaded.eval("[...document.querySelectorAll('#board th')].map(h => h.textContent)")
    col = headers.index("gsm8k")
    values = (
        f"[...document.querySelectorAll('#board tbody tr')].map(r => r.cells[{col}].textContent)"
    )
    before = loaded.eval(values)
    sel = f"#board th:nth-child({col + 1})"
    loaded.click(sel)
    up = loaded.eval(values)
    numbers = [float(v) for v in up if v]
    assert numbers == sorted(numbers) and up != before
    assert up[-3:] == ["", "", ""]  # early-stopped, diverged, failed: missing values last
    assert loaded.eval(f"document.querySelector('{sel}').getAttribute('aria-sort')") == "ascending"
    loaded.click(sel)
    down = [float(v) for v in loaded.eval(values) if v]
    assert down == sorted(numbers, reverse=True)
    # A text column sorts too (status), and the rank column restores the original order.
    status_col = headers.index("status") + 1
    loaded.click(f"#board th:nth-child({status_col})")
    statuses = loaded.eval(
        "[...document.querySelectorAll('#board tbody tr .status')].map(s => s.textContent)"
    )
    assert statuses == sorted(statuses)
    loaded.click("#board th:nth-child(1)")
    assert loaded.eval(values) == before
    assert loaded.errors() == []


def test_plots_are_inline_svg_with_their_marks(loaded: Browser) -> None:
    ids = loaded.eval("[...document.querySelectorAll('svg.plot')].map(s => s.id)")
    assert {"plot-objective-time", "plot-pareto", "plot-loss", "plot-importance-unit"} <= set(ids)
    # Completed trials with both GSM8K and MMLU: 6 of unit, the evil one, and named's one.
    assert loaded.eval("document.querySelectorAll('#plot-pareto .pt').length") == 8
    assert loaded.eval("document.querySelectorAll('#plot-pareto path.front').length") == 1
    assert loaded.eval("document.querySelectorAll('#plot-loss path.curve').length") == 5
    assert loaded.eval("document.querySelectorAll('#plot-importance-unit rect.bar').length") == 2
    size = loaded.eval(
        "(() => { const r = document.querySelector('#plot-pareto')"
        ".getBoundingClientRect(); return [r.width, r.height]; })()"
    )
    assert size[0] > 300 and size[1] > 150  # laid out, not collapsed


def test_script_in_user_text_shows_as_text_and_never_runs(loaded: Browser) -> None:
    assert loaded.eval("typeof window.__pwned") == "undefined"
    assert loaded.eval("document.scripts.length") == 2  # our JSON data and our sorting script
    body = loaded.eval("document.body.innerText")
    assert body.count(EVIL) >= 3  # the param, the trial id, the reason (and the search name)
    assert EVIL in loaded.eval("document.querySelector('h1').textContent")
    data = json.loads(loaded.eval("document.getElementById('leaderboard-data').textContent"))
    assert any(r["params"].get("note") == EVIL for r in data["rows"])
    assert loaded.errors() == []


def test_screenshot_of_the_page(loaded: Browser, tmp_path: Path) -> None:
    shot = tmp_path / "leaderboard.png"
    loaded.eval("window.scrollTo(0, 0)")
    loaded.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("PLORA_SCREENSHOT_DIR"):  # to look at it: PLORA_SCREENSHOT_DIR=/tmp/x
        shutil.copy(shot, Path(os.environ["PLORA_SCREENSHOT_DIR"]) / shot.name)


@pytest.mark.slow
def test_board_of_a_real_smoke_search_in_the_browser(
    browser: Browser, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    d = finished_smoke_search(tmp_path_factory)  # the session's one smoke search
    n = len(list((d / "trials").glob("*.json")))
    browser.open((d / "leaderboard" / "index.html").as_uri())
    assert browser.errors() == []
    assert browser.eval("document.querySelectorAll('#board tbody tr').length") == n
    assert browser.eval("document.querySelectorAll('svg.plot').length") >= 4
    assert browser.eval("document.querySelectorAll('#plot-loss path.curve').length") >= 1
    headers = browser.eval("[...document.querySelectorAll('#board th')].map(h => h.textContent)")
    col = headers.index("final loss" if "final loss" in headers else "loss")
    browser.click(f"#board th:nth-child({col + 1})")
    losses = browser.eval(
        f"[...document.querySelectorAll('#board tbody tr')].map(r => r.cells[{col}].textContent)"
    )
    numbers = [float(v) for v in losses if v]
    assert numbers and numbers == sorted(numbers)
    shot = tmp_path / "smoke_leaderboard.png"
    browser.eval("window.scrollTo(0, 0)")
    browser.screenshot(shot)
    if os.environ.get("PLORA_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["PLORA_SCREENSHOT_DIR"]) / shot.name)


def test_objective_is_next_to_the_rank_and_on_screen_at_1400px(
    browser: Browser, board_page: Path, tmp_path: Path
) -> None:
    pareto = make_search_dir(
        tmp_path,
        "front",
        [
            record("p1", gsm8k=0.1, mmlu=0.5, params={"lora.rank": 8, "optim.lr": 1e-4}),
            record("p2", gsm8k=0.4, mmlu=0.2, params={"lora.rank": 8, "optim.lr": 3e-4}),
        ],
        objective={"metrics": ["gsm8k", "mmlu"], "directions": ["max", "max"], "pareto": True},
        study=False,
    )
    lb.publish(pareto)
    pages = [
        (board_page, ["objective"]),
        (pareto / "leaderboard" / "index.html", ["gsm8k", "mmlu"]),
    ]
    browser.call(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        session=True,
    )
    try:
        for page, objective_headers in pages:
            browser.open(page.as_uri())
            assert browser.eval("[window.innerWidth, window.innerHeight]") == [1400, 900]
            headers = browser.eval(
                "[...document.querySelectorAll('#board th')].map(h => h.textContent)"
            )
            status = headers.index("status")
            want = list(range(status + 1, status + 1 + len(objective_headers)))
            assert [headers.index(h) for h in objective_headers] == want, headers
            for col in want:
                box = browser.eval(
                    "(() => { const r = document.querySelector('#board tbody tr')"
                    f".cells[{col}].getBoundingClientRect(); return [r.left, r.right, r.top]; }})()"
                )
                assert 0 <= box[0] < box[1] <= 1400 and box[2] < 900, (page, headers[col], box)
            assert browser.errors() == []
    finally:
        browser.call("Emulation.clearDeviceMetricsOverride", session=True)


def test_trial_files_are_relative_links_or_plain_text(browser: Browser, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    d = storage / "linked"
    odd = 't 1#?"<x>'  # characters that mean something in a URL and in HTML

    def files(trial_id: str) -> dict[str, Any]:
        run = d / "runs" / trial_id
        (run / "model").mkdir(parents=True)
        (run / "metrics.jsonl").write_text('{"step": 1}\n')
        return {"run_dir": str(run), "model_path": str(run / "model")}

    recs = [
        record(odd, gsm8k=0.3, **files(odd)),
        record("t2", gsm8k=0.2, **files("t2")),
        record("cloud", gsm8k=0.1, run_dir="s3://bucket/runs/cloud", model_path="s3://b/model"),
        record("remote", gsm8k=0.05, run_dir="/cluster/other/runs/remote"),
    ]
    make_search_dir(storage, "linked", recs, study=False)
    out = lb.publish(d)
    page = (out / "index.html").read_text()
    assert "file://" not in page
    browser.open((out / "index.html").as_uri())
    assert browser.errors() == []
    links = browser.eval(
        "[...document.querySelectorAll('#board a')].map(a => "
        "[a.closest('tr').dataset.trial, a.textContent, a.getAttribute('href'), a.href])"
    )
    want = {}
    for tid in (odd, "t2"):
        run = d / "runs" / tid
        want[f"linked/{tid}", "run"] = run.as_uri() + "/"
        want[f"linked/{tid}", "metrics"] = (run / "metrics.jsonl").as_uri()
        want[f"linked/{tid}", "model"] = (run / "model").as_uri() + "/"
    assert {(trial, text): url for trial, text, _, url in links} == want
    for _, _, href, _ in links:
        assert href.startswith("../runs/") and not href.startswith(("/", "file:")), href
    # Cloud and another machine's paths are plain text in their cells.
    rows = browser.eval(
        "Object.fromEntries([...document.querySelectorAll('#board tbody tr')]"
        ".map(r => [r.dataset.trial, r.innerText]))"
    )
    assert (
        "s3://bucket/runs/cloud" in rows["linked/cloud"] and "s3://b/model" in rows["linked/cloud"]
    )
    assert "/cluster/other/runs/remote" in rows["linked/remote"]
    # A board written outside the storage directory links nothing but its own best_config.yaml.
    elsewhere = tmp_path / "elsewhere"
    assert lb.leaderboard_command([str(d)], str(elsewhere)) == 0
    assert (elsewhere / "index.html").read_text().count("<a ") == 1
