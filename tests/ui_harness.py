"""MLflow servers and a headless browser for the UI tests: real processes, stopped by their PIDs.

``served_mlflow(cmd, ...)`` starts a command that runs an MLflow server (``cluster/mlflow_server.sh``
or ``make ui``) in its own process group, waits for ``/health`` and, whatever the outcome, stops
the whole group (TERM, then KILL). ``render(url, png)`` loads a page in Debian's chromium
(``--headless --dump-dom --screenshot`` with a virtual time budget, so the single-page app has
run its requests before the DOM is taken) and returns the DOM's text and links; no browser is
downloaded and no CDP client is needed.

Without chromium the ``chromium`` fixture skips with the reason, unless ``XLPIPE_REQUIRE_SLURM=1``
(CI, which installs it: .ci/run), where it is a failure. Screenshots are copied into
``$XLPIPE_TEST_ARTIFACTS`` when it is set.
"""
from __future__ import annotations

import contextlib
import dataclasses
import html.parser
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional, Sequence

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def find_chromium() -> Optional[str]:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def get_json(url: str, body: Optional[dict] = None, timeout: float = 10) -> dict:
    """GET (or POST ``body``) a REST endpoint; an HTTP error raises with the server's message."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{url}: HTTP {e.code}: {e.read()[:500]!r}") from None


def get_bytes(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _wait_group(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def stop_group(proc: subprocess.Popen, grace: float = 20) -> bool:
    """TERM to ``proc``'s process group, KILL what is left after ``grace``; True if TERM sufficed.

    Waits until every member is gone (orphans of a leader that exited first included).
    """
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    clean = proc.poll() is not None and _wait_group(proc.pid, grace)
    if not clean:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        _wait_group(proc.pid, 10)
    return clean


@contextlib.contextmanager
def served_mlflow(cmd: Sequence[str], url: str, log_path: Path, cwd: Optional[Path] = None,
                  env: Optional[dict] = None, timeout: float = 120) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` (an MLflow server on ``url``) until the block ends; its process group dies after.

    Afterwards ``proc.stopped_by_term`` says whether SIGTERM alone stopped every process.
    """
    log = open(log_path, "wb")
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own group: make, mlflow and uvicorn die together
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"MLflow did not come up on {url} ({' '.join(cmd)}):\n"
                                   f"{log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.3)
        yield proc
    finally:
        proc.stopped_by_term = stop_group(proc)
        log.close()


class _Page(html.parser.HTMLParser):
    """Visible text (no script/style) and (href, text) of every link."""

    def __init__(self):
        super().__init__()
        self.text: list[str] = []
        self.links: list[tuple[str, str]] = []
        self._skip = 0
        self._href: Optional[str] = None
        self._link_text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "a":
            self._href, self._link_text = dict(attrs).get("href") or "", []

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip -= 1
        elif tag == "a" and self._href is not None:
            self.links.append((self._href, " ".join("".join(self._link_text).split())))
            self._href = None

    def handle_data(self, data):
        if self._skip:
            return
        if data.strip():
            self.text.append(data.strip())
        if self._href is not None:
            self._link_text.append(data)


@dataclasses.dataclass
class Rendered:
    url: str
    dom: str
    text: str                      # visible strings joined by " | "
    links: list[tuple[str, str]]   # (href, link text)
    screenshot: Path

    def link_texts(self, href: str) -> list[str]:
        return [t for h, t in self.links if h == href]


def render(chromium: str, url: str, screenshot: Path, profile: Path, budget_ms: int = 30000,
           size: str = "1400,1600", timeout: float = 180) -> Rendered:
    """The DOM of ``url`` after ``budget_ms`` of virtual time, and a screenshot of it, in one run.

    A fresh profile per page: nothing the UI remembers (its GenAI / Model training switch lives
    in localStorage) carries from one page to the next, so only the URL decides what is shown.
    """
    cmd = [chromium, "--headless", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={size}",
           f"--virtual-time-budget={budget_ms}", f"--screenshot={screenshot}", "--dump-dom", url]
    if os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")  # chromium refuses to run as root with its sandbox
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            stop_group(proc, grace=5)
    if proc.returncode != 0 or not out.strip():
        raise AssertionError(f"chromium failed on {url} (exit {proc.returncode}):\n{err[-3000:]}")
    screenshot.with_suffix(".html").write_text(out)  # beside the screenshot, for a failure's post-mortem
    page = _Page()
    page.feed(out)
    return Rendered(url, out, " | ".join(page.text), page.links, screenshot)


def keep_artifact(path: Path) -> Path:
    """Copy a test's file into $XLPIPE_TEST_ARTIFACTS (if set); returns where it is kept."""
    dest_dir = os.environ.get("XLPIPE_TEST_ARTIFACTS")
    if not dest_dir:
        return path
    Path(dest_dir).mkdir(parents=True, exist_ok=True)
    dest = Path(dest_dir) / path.name
    shutil.copyfile(path, dest)
    return dest


def required() -> bool:
    return os.environ.get("XLPIPE_REQUIRE_SLURM", "") not in ("", "0")


try:
    import pytest

    @pytest.fixture(scope="session")
    def chromium() -> str:
        path = find_chromium()
        if path is None:
            msg = "chromium not installed (apt-get install chromium, or see .ci/run)"
            if required():
                pytest.fail(msg + " — XLPIPE_REQUIRE_SLURM=1 makes this a failure", pytrace=False)
            pytest.skip(msg)
        return path
except ImportError:  # imported without pytest
    pass
