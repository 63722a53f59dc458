"""The HTML audit report opened in headless Chromium: console, plots, network, screenshot and print.

The report comes from the real command line on the digits-neural-collapse fixture. The browser is
driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``), so the page under test
is the untouched file and no browser-automation package is needed. Every host name and IP address
is mapped to "not resolved", so even a report that did reference a remote URL could not reach the
network: with Chromium 156, an image on 127.0.0.1 then fails with ERR_NAME_NOT_RESOLVED and no
connection is made. The tests skip only when no Chromium binary is found.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from typer.testing import CliRunner

from stabcheck.cli import app

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "digits-neural-collapse"
CHECKPOINTS = ("epoch-0014.pt", "epoch-0200.pt")

# With two or more checkpoints each of these sections draws at least its trajectory plot.
PLOTTED_ANALYZERS = ("sharpness", "hessian-trace", "gradient-coherence", "softmax-collapse", "neural-collapse")

CHROMIUM_OVERRIDE = "STABCHECK_CHROMIUM"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")

# Seconds one browser run may take before the test fails. With Chromium 156 on two CPU cores a
# run took about 1 s when idle and up to 5 s while other jobs were running.
BROWSER_TIMEOUT = 60

# Window for the screenshot, in CSS pixels.
WINDOW_WIDTH, WINDOW_HEIGHT = 1280, 1600

# Printable width of an A4 page inside 15 mm margins at 96 CSS pixels per inch: (210 - 30) mm.
# Letter paper is wider, so a layout that fits this width fits both.
PRINT_WIDTH = round((210 - 30) / 25.4 * 96)

# Flags for every browser run: a fresh profile and no background fetches, update checks or sync.
# The resolver rule makes every host fail to resolve, so nothing leaves the machine.
BASE_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)


def find_chromium() -> tuple[str | None, str | None]:
    """Return the Chromium binary, from $STABCHECK_CHROMIUM when set, else the first known name on PATH.

    The second item is the error when the variable is set but names no executable.
    """
    override = os.environ.get(CHROMIUM_OVERRIDE)
    if override:
        found = shutil.which(override)
        if found is None:
            return None, f"{CHROMIUM_OVERRIDE}={override!r} is not an executable file or a command on PATH"
        return found, None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found is not None:
            return found, None
    return None, None


CHROMIUM, CHROMIUM_ERROR = find_chromium()

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and CHROMIUM_ERROR is None,
    reason=(
        f"no Chromium binary found (looked for {', '.join(CHROMIUM_NAMES)} on PATH and ${CHROMIUM_OVERRIDE}); "
        "install Debian's chromium package or set the variable to the browser binary"
    ),
)


@pytest.fixture(scope="module", autouse=True)
def require_chromium() -> None:
    # A set but wrong override is a configuration error, not a reason to skip. Autouse fixtures
    # run first in their scope, so this fails each test before any browser is started.
    if CHROMIUM_ERROR is not None:
        pytest.fail(CHROMIUM_ERROR)


# Python source for `python -c PIPE_LAUNCHER COMMAND_FD REPLY_FD BROWSER [FLAG ...]`, which execs
# the browser with the command pipe on descriptor 3 and the reply pipe on descriptor 4. Both are
# first copied to 10 or above, so placing one cannot overwrite the other.
PIPE_LAUNCHER = """
import fcntl, os, sys
command = fcntl.fcntl(int(sys.argv[1]), fcntl.F_DUPFD_CLOEXEC, 10)
reply = fcntl.fcntl(int(sys.argv[2]), fcntl.F_DUPFD_CLOEXEC, 10)
os.dup2(command, 3)
os.dup2(reply, 4)
for passed in (int(sys.argv[1]), int(sys.argv[2])):
    if passed not in (3, 4):
        os.close(passed)
os.execv(sys.argv[3], sys.argv[3:])
"""


class DevToolsPipe:
    """A Chromium process driven over the DevTools protocol on file descriptors 3 and 4.

    Chromium reads null-terminated JSON commands from descriptor 3 and writes null-terminated
    JSON replies and events to descriptor 4. Every event is kept in ``events``.
    """

    def __init__(self, folder: Path):
        command_read, self._command_write = os.pipe()
        self._reply_read, reply_write = os.pipe()

        self.log = folder / "chromium-stderr.log"
        flags = [CHROMIUM, *BASE_FLAGS, f"--user-data-dir={folder / 'profile'}", "--remote-debugging-pipe", "about:blank"]
        # A fresh single-threaded Python places the pipes on descriptors 3 and 4 and then becomes
        # Chromium, because preexec_fn is unsafe in this process, which runs torch's threads.
        launcher = [sys.executable, "-c", PIPE_LAUNCHER, str(command_read), str(reply_write), *flags]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                launcher, pass_fds=(command_read, reply_write),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            )
        os.close(command_read)
        os.close(reply_write)
        self._buffer = b""
        self._next_id = 0
        self._deadline = time.monotonic() + BROWSER_TIMEOUT
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send one command and return its result. An error reply fails the test."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._command_write, json.dumps(message).encode() + b"\0")
        reply = self._read_until(lambda item: item.get("id") == message["id"], f"the reply to {method}")
        if "error" in reply:
            pytest.fail(f"DevTools command {method} failed: {reply['error']}")
        return reply["result"]

    def wait_for_event(self, method: str, start: int) -> dict[str, Any]:
        """Return the first event named `method` from index `start` of ``events`` on, waiting for it."""
        for event in self.events[start:]:
            if event.get("method") == method:
                return event
        return self._read_until(lambda item: item.get("method") == method, f"the event {method}")

    def evaluate(self, expression: str, session: str) -> Any:
        """Evaluate JavaScript in the page and return its value. A thrown exception fails the test."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
        if "exceptionDetails" in result:
            pytest.fail(f"page script failed: {result['exceptionDetails']}")
        return result["result"]["value"]

    def close(self) -> None:
        """Close the browser, killing it when it does not exit within 10 s."""
        try:
            os.write(self._command_write, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
        except BrokenPipeError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._command_write)
        os.close(self._reply_read)

    def _read_until(self, matches, waiting_for: str) -> dict[str, Any]:
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                item = json.loads(raw)
                if "method" in item:
                    self.events.append(item)
                if matches(item):
                    return item
            remaining = self._deadline - time.monotonic()
            ready, _, _ = select.select([self._reply_read], [], [], max(remaining, 0))
            if not ready:
                pytest.fail(f"Chromium timed out after {BROWSER_TIMEOUT} s waiting for {waiting_for}; its log is {self.log}")
            chunk = os.read(self._reply_read, 1 << 20)
            if not chunk:
                pytest.fail(f"Chromium closed the DevTools pipe while the test waited for {waiting_for}; its log is {self.log}")
            self._buffer += chunk


@dataclass
class PageObservation:
    """The DevTools events sent while the report loaded, and the state of the loaded page."""

    url: str
    events: list[dict[str, Any]]
    page: dict[str, Any]
    print_layout: dict[str, Any]


# JavaScript for the loaded page: its images, scripts, resource entries and plots per section.
PAGE_STATE_SCRIPT = """
JSON.stringify({
  images: Array.from(document.images, (image) => ({
    src: image.currentSrc.slice(0, 40),
    alt: image.alt,
    complete: image.complete,
    naturalWidth: image.naturalWidth,
    naturalHeight: image.naturalHeight,
  })),
  scripts: document.scripts.length,
  resources: performance.getEntriesByType("resource").map((entry) => entry.name),
  sections: Array.from(document.querySelectorAll("section"), (section) => {
    const heading = section.querySelector("h2");
    const id = heading && heading.querySelector("small");
    return {
      heading: heading ? heading.textContent : "",
      analyzer: id ? id.textContent.replace(/^\\(|\\)$/g, "") : null,
      images: section.querySelectorAll("img").length,
    };
  }),
})
"""

# JavaScript for the page under print media at PRINT_WIDTH: the elements that would be cut at the
# page edge, and the print-color-adjust value of each status badge.
PRINT_OVERFLOW_SCRIPT = """
(() => {
  const limit = document.documentElement.clientWidth + 1;
  const describe = (element) => element.tagName.toLowerCase()
      + (element.className ? "." + String(element.className).split(" ").join(".") : "")
      + " " + JSON.stringify(element.textContent.slice(0, 60));
  const overflowing = [];
  for (const element of document.body.querySelectorAll("*")) {
    const box = element.getBoundingClientRect();
    const clips = getComputedStyle(element).overflowX !== "visible";
    if (box.right > limit) {
      overflowing.push("past the page edge by " + Math.round(box.right - limit) + " px: " + describe(element));
    } else if (clips && element.scrollWidth > element.clientWidth + 1) {
      overflowing.push("clips " + (element.scrollWidth - element.clientWidth) + " px of its content: " + describe(element));
    }
  }
  const badges = Array.from(document.querySelectorAll(".badge"), (badge) => getComputedStyle(badge).printColorAdjust);
  return JSON.stringify({
    width: document.documentElement.clientWidth,
    overflowing: overflowing.slice(0, 20),
    badgeColorAdjust: badges,
  });
})()
"""


def observe_page(html: Path, folder: Path) -> PageObservation:
    """Load the report in Chromium and record its events, its page state and its print layout."""
    browser = DevToolsPipe(folder)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            browser.call(f"{domain}.enable", session=session)
        browser.call("Emulation.setDeviceMetricsOverride", {"width": WINDOW_WIDTH, "height": WINDOW_HEIGHT, "deviceScaleFactor": 1, "mobile": False}, session=session)

        url = html.as_uri()
        # Only a load event after the navigation counts, not one of the blank start page.
        start = len(browser.events)
        browser.call("Page.navigate", {"url": url}, session=session)
        browser.wait_for_event("Page.loadEventFired", start)
        page = json.loads(browser.evaluate(PAGE_STATE_SCRIPT, session))

        browser.call("Emulation.setEmulatedMedia", {"media": "print"}, session=session)
        browser.call("Emulation.setScrollbarsHidden", {"hidden": True}, session=session)
        browser.call("Emulation.setDeviceMetricsOverride", {"width": PRINT_WIDTH, "height": WINDOW_HEIGHT, "deviceScaleFactor": 1, "mobile": False}, session=session)
        print_layout = json.loads(browser.evaluate(PRINT_OVERFLOW_SCRIPT, session))
    finally:
        browser.close()
    return PageObservation(url=url, events=browser.events, page=page, print_layout=print_layout)


def console_problems(events: list[dict[str, Any]]) -> list[str]:
    """List the console calls, uncaught exceptions and warning or error log entries among `events`.

    Log entries cover failed resource loads, Content-Security-Policy violations and the browser's
    own interventions. The report contains no script, so any console call at all is a problem.
    """
    problems = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(argument.get("value", argument.get("description", ""))) for argument in params.get("args", []))
            problems.append(f"console.{params.get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            description = details.get("exception", {}).get("description") or details.get("text")
            problems.append(f"uncaught exception: {description}")
        elif method == "Log.entryAdded" and params["entry"].get("level") in ("warning", "error"):
            entry = params["entry"]
            problems.append(f"{entry['level']} from {entry.get('source')}: {entry.get('text')} ({entry.get('url', '')})")
    return problems


def fetched_urls(events: list[dict[str, Any]], document_url: str) -> list[str]:
    """Return the URLs the page requested other than the report file itself and data: URIs.

    Chromium reports data: URIs as requests too, but their content is in the URI itself.
    Long URLs are cut to 120 characters for the failure message.
    """
    urls = [event["params"]["request"]["url"] for event in events if event.get("method") == "Network.requestWillBeSent"]
    return [url[:120] for url in urls if url != document_url and not url.startswith("data:")]


def run_chromium(html: Path, profile: Path, *flags: str) -> subprocess.CompletedProcess:
    """Run Chromium once on `html` with extra command-line flags and browser logging on stderr."""
    command = [CHROMIUM, *BASE_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *flags, html.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT, stdin=subprocess.DEVNULL)


def console_log_lines(stderr: str) -> list[str]:
    """Return the page's console lines from Chromium's stderr log.

    Chromium 156 logs every console message, uncaught exception and CSP violation as
    INFO:CONSOLE whatever its level, so every such line counts.
    """
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def count_pdf_objects(pdf: bytes, kind: bytes) -> int:
    """Count the PDF dictionaries that contain `kind`, such as b"/Type /Page" or b"/Subtype /Image".

    Chromium 156 writes these dictionaries uncompressed, so a byte search finds them. The
    lookahead keeps b"/Type /Page" from matching the page tree's b"/Type /Pages".
    """
    name, value = kind.split()
    return len(re.findall(re.escape(name) + rb"\s*" + re.escape(value) + rb"(?![a-zA-Z])", pdf))


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    """Write the HTML report of the digits-neural-collapse fixture with the real command line."""
    folder = tmp_path_factory.mktemp("report")
    html, document = folder / "report.html", folder / "report.json"
    # lr, momentum and batch size are the fixture's training settings (its README), so the
    # thresholds and gates are filled in. Small estimator budgets keep the run to a few seconds.
    arguments = [
        "analyze", *(str(FIXTURE / name) for name in CHECKPOINTS),
        "--config", str(FIXTURE / "stabcheck.toml"),
        "--lr", "0.05", "--momentum", "0.9", "--batch-size", "128",
        "--max-samples", "128", "--top-k", "1", "--lanczos-iters", "30",
        "--trace-probes", "4", "--density-probes", "1", "--density-steps", "20",
        "--html", str(html), "--json", str(document), "--quiet",
    ]
    # One torch thread: on this small model a second one made the run slower (2.3 s against 3.7 s
    # on two CPU cores), and far slower while other processes shared the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, arguments)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code in (0, 1), result.output

    results = json.loads(document.read_text())["results"]
    for analyzer_id in PLOTTED_ANALYZERS:
        statuses = [entry["analyzers"][analyzer_id]["status"] for entry in results]
        assert statuses == ["ok"] * len(CHECKPOINTS), f"{analyzer_id}: {statuses}"
    return html


@pytest.fixture(scope="module")
def observation(report_html, tmp_path_factory) -> PageObservation:
    return observe_page(report_html, tmp_path_factory.mktemp("browser"))


def test_report_has_no_console_errors(observation):
    assert console_problems(observation.events) == []


def test_report_contains_no_script(observation):
    assert observation.page["scripts"] == 0


def test_every_plot_loads(observation):
    images = observation.page["images"]
    assert images, "the report contains no <img>"
    broken = [image for image in images if not (image["complete"] and image["naturalWidth"] > 0 and image["naturalHeight"] > 0)]
    assert broken == []


def test_each_analyzer_section_has_a_plot(observation):
    plots_per_analyzer = {section["analyzer"]: section["images"] for section in observation.page["sections"] if section["analyzer"]}
    for analyzer_id in PLOTTED_ANALYZERS:
        assert plots_per_analyzer.get(analyzer_id, 0) >= 1, f"no plot in the {analyzer_id} section: {plots_per_analyzer}"


def test_report_makes_no_network_requests(observation):
    assert fetched_urls(observation.events, observation.url) == []
    failed = [event["params"] for event in observation.events if event.get("method") == "Network.loadingFailed"]
    assert failed == []
    assert [name for name in observation.page["resources"] if not name.startswith("data:")] == []


def test_print_layout_fits_page_width(observation):
    assert observation.print_layout["width"] == PRINT_WIDTH
    assert observation.print_layout["overflowing"] == []


def test_badges_keep_colours_in_print(observation):
    adjust = observation.print_layout["badgeColorAdjust"]
    assert adjust, "the report contains no status badge"
    assert set(adjust) == {"exact"}


def test_screenshot_shows_report(report_html, tmp_path):
    screenshot = tmp_path / "report.png"
    result = run_chromium(report_html, tmp_path / "profile", f"--screenshot={screenshot}", f"--window-size={WINDOW_WIDTH},{WINDOW_HEIGHT}", "--hide-scrollbars")
    assert result.returncode == 0, result.stderr[-2000:]
    assert console_log_lines(result.stderr) == []

    data = screenshot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 20_000, f"{screenshot}: {len(data)} bytes"

    pixels = imread(screenshot)[..., :3]
    assert pixels.shape[:2] == (WINDOW_HEIGHT, WINDOW_WIDTH)
    # A blank page is one colour. The report has black text, coloured badges and plots.
    not_white = np.any(pixels < 0.9, axis=-1).mean()
    assert not_white > 0.02, f"{screenshot}: only {not_white:.1%} of the pixels are not white"
    colours = np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50, f"{screenshot}: {len(colours)} distinct colours"


def test_report_prints_to_pdf(report_html, tmp_path):
    pdf_path = tmp_path / "report.pdf"
    result = run_chromium(report_html, tmp_path / "profile", f"--print-to-pdf={pdf_path}", "--no-pdf-header-footer")
    assert result.returncode == 0, result.stderr[-2000:]
    assert console_log_lines(result.stderr) == []

    pdf = pdf_path.read_bytes()
    assert pdf.startswith(b"%PDF-")
    assert pdf.rstrip().endswith(b"%%EOF")
    # The plots are embedded as images, so a complete print is far larger than its text alone.
    assert len(pdf) > 100_000, f"{pdf_path}: {len(pdf)} bytes"
    assert count_pdf_objects(pdf, b"/Type /Page") > 1

    # Each distinct plot becomes at least one image object, so none was left out of the print.
    plots = set(re.findall(r'<img [^>]*src="(data:image/png;base64,[^"]+)"', report_html.read_text()))
    assert count_pdf_objects(pdf, b"/Subtype /Image") >= len(plots) > 0
