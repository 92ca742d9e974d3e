"""`lepton-fleet dashboard` as a process and Debian's Chromium driven by Playwright, for the dashboard tests and
scripts/bench_dashboard.py."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FLEET = [sys.executable, "-c", "import sys; from agent.cli import fleet_main; sys.exit(fleet_main())"]
CHROMIUM = os.environ.get("LEPTON_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IMG = ROOT / "docs" / "img"
"""Where README's screenshots live: the tests write them there only when LEPTON_SCREENSHOTS=1 (so a test run
leaves the checkout clean), else into their own temporary directory."""


def screenshot(page: Any, tmp: Path, name: str, **options: Any) -> Path:
    """Take the page's screenshot `name`; it is checked to be a real PNG, and kept for README on demand."""
    out = (IMG if os.environ.get("LEPTON_SCREENSHOTS") == "1" else tmp) / name
    page.screenshot(path=str(out), **options)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", out
    return out


def have_chromium() -> bool:
    return Path(CHROMIUM).is_file() or shutil.which(CHROMIUM) is not None


class DashboardProcess:
    """The dashboard on a free loopback port; `url` (with no token) and `token` from its first line."""

    def __init__(self, broker_url: str, prefix: str, *extra: str, log: Path) -> None:
        self.log_path = log
        self.log = log.open("w")
        self.proc = subprocess.Popen([*FLEET, "dashboard", "--broker", broker_url, "--prefix", prefix,
                                      "--listen", "127.0.0.1:0", *extra], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        found = re.match(r"dashboard (http://\S+?/)(?:#token=(\S+))?[ \n]", first)
        assert found, (first, self.stderr())
        self.url, self.token = found.group(1), found.group(2)

    def stderr(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text() if self.log_path.exists() else ""

    def post(self, path: str, body: dict[str, Any], token: str | None = None,
             operator: str = "test") -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/json", "X-Lepton-Operator": operator}
        if token is not None:
            headers["X-Lepton-Token"] = token
        request = urllib.request.Request(self.url + path.lstrip("/"), json.dumps(body).encode(),  # noqa: S310
                                         headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - our own loopback server
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def get(self, path: str) -> tuple[int, bytes, str]:
        try:
            with urllib.request.urlopen(self.url + path.lstrip("/"), timeout=30) as response:  # noqa: S310
                return response.status, response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), ""

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.log.close()
        return self.proc.returncode


@contextlib.contextmanager
def dashboard(broker_url: str, prefix: str, *extra: str, log: Path) -> Iterator[DashboardProcess]:
    d = DashboardProcess(broker_url, prefix, *extra, log=log)
    try:
        yield d
    finally:
        rc = d.close()
        assert rc == 0, (rc, d.stderr())


@contextlib.contextmanager
def browser() -> Iterator[Any]:
    """A Playwright browser context in Debian's Chromium with a fresh profile directory."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="lepton-chromium-") as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                       headless=True, viewport={"width": 1500, "height": 900})
        try:
            yield context
        finally:
            context.close()


# -- the page, as the tests drive it ---------------------------------------------------------------------------


def row(device: str, presence: str | None = None) -> str:
    """The fleet table's row of `device` (in that presence, if given), as a selector."""
    state = f'[data-presence="{presence}"]' if presence else ""
    return f'#fleet-rows tr[data-device="{device}"]{state}'


def confirm(page: Any) -> None:
    page.locator("#confirm-ok").click()


def is_hidden(page: Any, selector: str) -> bool:
    return bool(page.eval_on_selector(selector, "e => e.hidden"))


def trail(progress_row: Any) -> list[tuple[str, str]]:
    """The (state, phase) steps a progress row lists, in order."""
    return [(li.get_attribute("data-state"), li.get_attribute("data-phase"))
            for li in progress_row.query_selector_all(".trail li")]


def deploy_from_page(page: Any, version: str, shadow_items: int | None = None) -> None:
    """Deploy the model and target already in the models view's form at `version` (shadow first on
    `shadow_items`), confirmed."""
    form = page.locator("#deploy-form")
    form.locator("input[name=version]").fill(version)
    form.locator("input[name=shadow]").set_checked(shadow_items is not None)
    if shadow_items is not None:
        form.locator("input[name=shadow_items]").fill(str(shadow_items))
        form.locator("input[name=min_agreement]").fill("0.9")
        # A generous bound: the trial is judged on agreement here, never on a shared machine's timing.
        form.locator("input[name=max_latency_ratio]").fill("100")
    page.locator("#deploy-button").click()
    confirm(page)
