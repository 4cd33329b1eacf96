"""The picked dataset travels in a real browser (Chromium through Playwright, `streamlit run app.py` on
loopback): a shared /explore?dataset=arith opens a fresh session on arith and keeps the parameter
in the URL beside the thresholds; the Benchmarks page's link to Explore carries it; the Route page
opened on arith states arith's own policy file and its guarantee. No model runs. Screenshot:
test-artifacts/browser/dataset-route.png."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path


from _browser import ARTIFACTS, BROWSER_MARKS, IDLE_JS, StreamlitApp, app_folders_env, chromium_page
from cascade_core.compose.policies import guarantee_summary

REPO = Path(__file__).resolve().parent.parent

pytestmark = [*BROWSER_MARKS]


def test_a_shared_link_and_the_page_links_carry_the_dataset(tmp_path, smollm2_path):
    from playwright.sync_api import expect

    expect.set_options(timeout=90_000)  # the 2-core machine may be busy
    shutil.copytree(REPO / "data" / "results" / "arith", tmp_path / "results" / "arith")
    (tmp_path / "policies" / "arith").mkdir(parents=True)
    shipped = REPO / "data" / "policies" / "arith" / "default.json"
    shutil.copyfile(shipped, tmp_path / "policies" / "arith" / "default.json")
    env = app_folders_env(tmp_path)
    with StreamlitApp(env, tmp_path / "streamlit.log", start_timeout_s=90) as app, \
            chromium_page(1400, 1400, timeout_ms=90_000) as page:
        page.goto(f"{app.url}/explore?dataset=arith")
        page.wait_for_function(IDLE_JS, timeout=120_000)
        expect(page.get_by_role("combobox", name="Dataset")).to_have_value(re.compile(r"^arith \("))
        expect(page.get_by_text("Explore thresholds").first).to_be_visible()
        # kept beside the thresholds the page writes into the URL
        page.wait_for_url(lambda url: "t.smollm2-135m=" in url and "dataset=arith" in url)

        page.goto(f"{app.url}/benchmarks?dataset=arith")  # a new session, on arith by its link
        page.wait_for_function(IDLE_JS, timeout=120_000)
        page.get_by_role("link", name="Explore the thresholds on arith").click()
        page.wait_for_url("**/explore?*dataset=arith*")
        page.wait_for_function(IDLE_JS, timeout=120_000)
        expect(page.get_by_role("combobox", name="Dataset")).to_have_value(re.compile(r"^arith \("))

        page.goto(f"{app.url}/route?dataset=arith")
        page.wait_for_function(IDLE_JS, timeout=120_000)
        expect(page.get_by_text("arith's own calibrated policy").first).to_be_visible()
        # Streamlit's markdown draws ">=" as "≥"
        guarantee = guarantee_summary(json.loads(shipped.read_text())["guarantee"]).replace(">=", "≥")
        expect(page.get_by_text(guarantee, exact=False).first).to_be_visible()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dataset-route.png"), full_page=True)
        assert not page.get_by_test_id("stException").count()
