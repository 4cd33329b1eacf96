"""The real-browser pieces shared by tests/test_browser.py and bench/browser_latency.py: the app on
a loopback port, Debian's Chromium and how to read the explorer chart's operating point."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from _loopback import REPO_ROOT, free_port, stop_process

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# The explorer's chart is ECharts with `aria` on: its container's aria-label describes each series,
# "... representing these thresholds.The data is as follows: <cost>, <accuracy %>." (costs in the axis's
# thousands/millions/..., accuracy in percent). ECharts rewrites it on every redraw, so it changes
# exactly when the drawn point does.
OPERATING_POINT_JS = """() => {
    const el = Array.from(document.querySelectorAll('.stEChartsChart[aria-label], .stEChartsChart [aria-label]'))
        .find(e => (e.getAttribute('aria-label') || '').includes('representing these thresholds'));
    const m = el && el.getAttribute('aria-label')
        .match(/representing these thresholds\\.The data is as follows: ([-0-9.e+]+), ([-0-9.e+]+)/);
    return m ? [parseFloat(m[1]), parseFloat(m[2])] : null;
}"""
IDLE_JS = "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"

ARTIFACTS = REPO_ROOT / "test-artifacts" / "browser"  # screenshots the browser tests leave for a person
# Every browser test file's marks: `pytestmark = [*BROWSER_MARKS]` (plus `pytest.mark.model` where it loads one).
BROWSER_MARKS = [pytest.mark.browser, pytest.mark.slow,
                 pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason="Chromium is missing: run `make browser` (Debian's chromium)")]


def app_folders_env(folder: Path) -> dict[str, str]:
    """The app's environment for a test: records, policies and probes in `folder`, no model preloaded."""
    return {"CASCADE_RESULTS_DIR": str(folder / "results"), "CASCADE_POLICIES_DIR": str(folder / "policies"),
            "CASCADE_PROBES_DIR": str(folder / "probes"), "CASCADE_APP_PRELOAD": "0"}


@contextmanager
def chromium_page(width: int = 1400, height: int = 900, timeout_ms: int = 60_000) -> Iterator:
    """A page of a headless Chromium (Playwright driving Debian's /usr/bin/chromium), closed on exit;
    `page.context.browser.new_page(...)` opens another session in the same browser."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(timeout_ms)
            yield page
        finally:
            browser.close()


class StreamlitApp:
    """`streamlit run app.py` on a free loopback port with `env` added, waited for on its health
    endpoint; stopped on exit. Its output goes to `log_path`."""

    def __init__(self, env: dict[str, str], log_path: Path, start_timeout_s: float = 90.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env}
        self.log_path = Path(log_path)
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "StreamlitApp":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(self.port),
             "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
            cwd=REPO_ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                if httpx.get(f"{self.url}/_stcore/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"streamlit did not start:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)

    def __exit__(self, *exc) -> None:
        stop_process(self.proc)
        self._log.close()
