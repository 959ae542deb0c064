"""`gdc report STATE --html PAGE`: one self-contained page, checked in a real headless browser.

Debian's chromium is driven over the Chrome DevTools protocol through ``--remote-debugging-pipe``
(JSON messages on file descriptors 3 and 4: nothing but the standard library on our side). The
browser is installed by the ``chromium`` session fixture where absent (``apt-get install -y
chromium``, as root); the tests skip only where it cannot be installed.
"""
import base64
import fcntl
import html
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

import gdc_ext
from gdc_ext import cli
from gdc_ext.cartography import QUADRANT_NAMES, score_values, top_k

N = 60
# hang guards only (the CI machine is loaded): no test result depends on them
_HANG_S = 180.0


# ----------------------------------------------------------------------------------------- browser
def _find_chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def chromium():
    """The chromium binary; installed with apt-get when missing (root, apt reachable), else skip."""
    path = _find_chromium()
    if path:
        return path
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be (needs apt-get as root)")
    # one installer at a time (pytest-xdist workers share the machine)
    with open(os.path.join(tempfile.gettempdir(), "gdc-chromium-install.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = _find_chromium()
        if path is None:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            cmd = ["apt-get", "install", "-y", "-o", "DPkg::Lock::Timeout=600", "chromium"]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:  # a fresh machine may need the package lists first
                subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            path = _find_chromium()
            if path is None:
                pytest.skip(f"chromium could not be installed: {done.stderr.strip()[-400:]}")
    return path


class Browser:
    """A headless chromium driven over the DevTools protocol on a pipe (fds 3 and 4 of the child)."""

    def __init__(self, binary, profile):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # the child's ends must not be fds 3 or 4 themselves (the shell below would close them):
        # move them above 9
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child_r, from_child_w)]
        os.close(to_child_r)
        os.close(from_child_w)
        to_child_r, from_child_w = moved
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", f"--user-data-dir={profile}",
                 "--remote-debugging-pipe", "about:blank"]
        # chromium reads the protocol on fd 3 and writes on fd 4: a small Python step puts the pipe
        # ends there before it becomes chromium (no preexec_fn, no shell's fd-number limits)
        step = ("import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); os.dup2(w, 4); "
                "os.close(r); os.close(w); os.execv(sys.argv[3], sys.argv[3:])")
        self.proc = subprocess.Popen([sys.executable, "-c", step, str(to_child_r), str(from_child_w), binary, *flags],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     pass_fds=(to_child_r, from_child_w))
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._next_id = 0
        self.events = []
        self.session = None

    def _read_message(self, deadline):
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from chromium (hang guard)")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
                    raise RuntimeError(f"chromium closed the DevTools pipe: {err[-2000:]}")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method, params=None, session=True):
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session is not None:
            msg["sessionId"] = self.session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._to_child, data):]
        deadline = time.monotonic() + _HANG_S
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method):
        deadline = time.monotonic() + _HANG_S
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while True:
            e = self._read_message(deadline)
            if e.get("method") == method:
                return e
            self.events.append(e)

    def open(self, url, width=1400, height=1000):
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False})
        self.send("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def eval(self, expression):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"page script failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def click(self, selector):
        """A real mouse click (pressed + released) at the middle of the element."""
        box = self.eval(f"(function(){{var e=document.querySelector({json.dumps(selector)}); e.scrollIntoView();"
                        f"var r=e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2];}})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left",
                                                   "clickCount": 1})

    def type_into(self, selector, text):
        self.click(selector)
        for ch in text:  # key by key, as typed
            self.send("Input.dispatchKeyEvent", {"type": "keyDown", "text": ch, "key": ch, "unmodifiedText": ch})
            self.send("Input.dispatchKeyEvent", {"type": "keyUp", "key": ch})

    def screenshot(self, path, full_page=False):
        self.eval("window.scrollTo(0, 0)")
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": full_page})["data"]
        with open(path, "wb") as fh:
            fh.write(base64.b64decode(data))

    def requested_urls(self):
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self):
        try:
            self.send("Browser.close", session=False)
        except Exception:  # already gone
            pass
        try:
            self.proc.wait(timeout=_HANG_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            os.close(fd)
        self.proc.stderr.close()


@pytest.fixture()
def browser(chromium, tmp_path):
    b = Browser(chromium, tmp_path / "profile")
    yield b
    b.close()


# ----------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A saved state with varied scores and a JSONL dataset whose texts need escaping."""
    d = tmp_path_factory.mktemp("report")
    g = torch.Generator().manual_seed(1)
    state = gdc_ext.CartoState(N, burn_in=2, eps=[1.0, 2.0])
    level = torch.rand(N, generator=g) * 5
    for e in range(5):
        noise = torch.rand(N, generator=g)
        state.record(level / (1 + e * noise) + 0.01, torch.arange(N))
        state.end_epoch()
    path = d / "carto.safetensors"
    state.save(path)
    words = ["the", "river", "model", "data", "north", "quiet", "train", "paper", "light", "stone", "market", "song"]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=8 + i % 9)).capitalize() + "." for i in range(N)]
    for i in range(0, N, 7):  # markup in the data must be shown as text, never run
        texts[i] += " <script>alert('x')</script> & <b>bold</b>"
    for i in range(0, N, 5):
        texts[i] += " Contact: needle@example.com, call 555-0100."
    with open(d / "data.jsonl", "w") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")
    return d, str(path), state.scores(), texts


def _write(run, *extra):
    d, path, scores, texts = run
    page = d / f"report{len(extra)}.html"
    assert cli.main(["report", path, "--html", str(page), "--dataset", str(d / "data.jsonl"), "--top", "25", *extra]) == 0
    return page


def test_page_is_self_contained_and_escapes_the_text(run):
    d, path, scores, texts = run
    page = _write(run).read_text()
    assert "<script>alert" not in page  # the data's markup is text, never markup
    assert html.escape("<script>alert('x')</script> & <b>bold</b>", quote=True) in page
    # nothing is fetched at view time: no external URL in any src / href, and a CSP forbidding requests
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page, re.I)
    assert "default-src 'none'" in page
    assert page.count("data:image/png;base64,") >= 3  # two data maps (last, the paper's m) and the histograms
    assert "<table id=\"quadrants\"" in page


def test_report_html_in_a_real_browser(run, browser, tmp_path):
    d, path, scores, texts = run
    page = _write(run)
    score = score_values(scores, gdc_ext.DEFAULT_SCORE).numpy()  # the CLI's default
    expected = [int(i) for i in top_k(score, 25, scores.difficulty).numpy()]
    browser.open(page.resolve().as_uri())

    def ids():  # the table's rows in DOM order, and whether each is shown
        return browser.eval("Array.from(document.querySelectorAll('#top tbody tr')).map("
                            "r => [parseInt(r.dataset.id), !r.hidden])")

    rows = ids()
    assert [i for i, _ in rows] == expected and all(shown for _, shown in rows)
    shot = tmp_path / "report.png"  # the page as it opens: header, quadrant counts, the table
    browser.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10000
    if os.environ.get("GDC_SCREENSHOT_DIR"):  # how docs/report.png is made
        shutil.copy(shot, os.path.join(os.environ["GDC_SCREENSHOT_DIR"], "report.png"))
    # the escaped text renders as text: the cell shows the literal markup, and no script ran
    cells = browser.eval("Array.from(document.querySelectorAll('#top tbody tr')).map("
                         "r => r.querySelector('td.text').innerText)")
    assert cells == [texts[i] for i in expected]
    assert browser.eval("document.querySelectorAll('#top td.text script, #top td.text b').length") == 0
    assert browser.eval("document.images.length") >= 3
    assert browser.eval("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    quad = browser.eval("Array.from(document.querySelectorAll('#quadrants tbody tr')).map("
                        "r => [r.cells[1].innerText, parseInt(r.cells[2].innerText)])")
    q = scores.quadrants(0.75, 0.75, by=gdc_ext.DEFAULT_SCORE).counts()
    assert {name: n for name, n in quad} == q

    # a click on the "d" header sorts by difficulty, highest first; a second click reverses
    browser.click("#top th[data-key=difficulty]")
    d_of = scores.difficulty.numpy()
    by_d = sorted(expected, key=lambda i: -d_of[i])
    assert [i for i, _ in ids()] == by_d
    browser.click("#top th[data-key=difficulty]")
    assert [i for i, _ in ids()] == by_d[::-1]
    browser.click("#top th[data-key=id]")
    assert [i for i, _ in ids()] == sorted(expected, reverse=True)

    # typing into the filter hides the rows without the string
    browser.type_into("#filter", "needle")
    shown = {i for i, visible in ids() if visible}
    assert shown == {i for i in expected if "needle" in texts[i]} and 0 < len(shown) < len(expected)
    assert browser.eval("document.getElementById('shown').textContent") == f"{len(shown)} of {len(expected)} rows shown"

    browser.screenshot(tmp_path / "filtered.png", full_page=True)
    assert (tmp_path / "filtered.png").stat().st_size > (tmp_path / "report.png").stat().st_size // 2
    # the only things loaded: the page itself and its inline data: images
    assert all(u == page.resolve().as_uri() or u.startswith("data:") for u in browser.requested_urls())


def test_report_html_quadrant_filter_and_reference(run, browser, tmp_path):
    d, path, scores, texts = run
    ref = np.linspace(1.0, 6.0, N)
    np.save(d / "ref.npy", ref)
    page = _write(run, "--reference", str(d / "ref.npy"))
    browser.open(page.resolve().as_uri())
    heads = browser.eval("Array.from(document.querySelectorAll('#top th')).map(h => h.dataset.key)")
    by = gdc_ext.cartography.DEFAULT_REFERENCE_SCORE  # the CLI's default with a reference
    other = ({"excess", "relative_excess"} - {by}).pop()
    assert f"score_{other}" in heads and "text" in heads  # the other calibrated score shown beside it
    rows = browser.eval("Array.from(document.querySelectorAll('#top tbody tr')).map(r => parseInt(r.dataset.id))")
    score = score_values(scores, by, reference=ref).numpy()
    assert rows == [int(i) for i in top_k(score, 25, scores.difficulty).numpy()]
    browser.eval("(function(){var s=document.getElementById('quadrant-filter'); s.value='2';"
                 "s.dispatchEvent(new Event('change'));})()")
    visible = browser.eval("Array.from(document.querySelectorAll('#top tbody tr')).filter(r => !r.hidden).map("
                           "r => r.dataset.quadrant)")
    codes = scores.quadrants(0.75, 0.75, by=by, reference=ref).codes.numpy()
    assert visible == ["2"] * int(sum(codes[i] == 2 for i in rows))
    assert QUADRANT_NAMES[2] in browser.eval("document.body.innerText")


def test_report_html_errors(run, tmp_path, capsys):
    d, path, scores, texts = run
    assert cli.main(["report", path, "--html", str(tmp_path / "no" / "such" / "dir" / "r.html")]) == 2
    assert "--html" in capsys.readouterr().err
    assert cli.main(["report", path, "--html", str(tmp_path / "r.html"), "--dataset", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--dataset" in err and "missing.jsonl" in err and not (tmp_path / "r.html").exists()
    with pytest.raises(SystemExit):  # --json and --html exclude each other
        cli.main(["report", path, "--html", str(tmp_path / "r.html"), "--json"])


def test_report_html_samples_the_histograms_of_large_runs(run, monkeypatch):
    from gdc_ext import html_report

    d, path, scores, texts = run
    monkeypatch.setattr(html_report, "_MAX_HIST", 20)  # as a run of more than 1e6 samples would
    seen = []
    draw = html_report._histograms
    monkeypatch.setattr(html_report, "_histograms",
                        lambda cols, codes, note="": seen.append(({len(v) for v in cols.values()}, len(codes), note))
                        or draw(cols, codes, note))
    page = html_report.build_report(scores, top=0)
    assert seen == [({20}, 20, " (a seeded sample of 20 of the 60 samples)")]
    assert page.count("data:image/png;base64,") == 3 and "<tbody></tbody>" in page.replace("\n", "")
    with pytest.raises(ValueError, match="top must be an int >= 0"):
        html_report.build_report(scores, top=-1)
    with pytest.raises(ValueError, match="needs reference"):
        html_report.build_report(scores, by="excess")
    with pytest.raises(ValueError, match="texts: 1 texts for the 3 rows"):
        html_report.build_report(scores, top=3, texts=["a"])
