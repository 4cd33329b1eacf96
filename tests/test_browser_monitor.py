"""The Monitor page in a real browser (Chromium through Playwright, `streamlit run app.py` on
loopback) on a real SQLite trace database written by the monitor's own arith drift scenario
(`monitor.scenario`: 200 easy then 300 hard questions, replayed from the records, no model): the
page shows the broken re-certification, the drift alarm and the fallback, and its screenshot is
not blank. The screenshot goes to test-artifacts/browser/monitor.png."""

from __future__ import annotations



from _browser import ARTIFACTS, BROWSER_MARKS, IDLE_JS, StreamlitApp, chromium_page
from cascade_core.monitor.scenario import arith_scenario, run_stream, stream


# No model: the scenario replays recorded outcomes, so no `model` mark (the other browser tests load SmolLM2).
pytestmark = [*BROWSER_MARKS]


def test_monitor_page_shows_the_broken_promise_and_the_alarm(tmp_path):
    from PIL import Image
    from playwright.sync_api import expect

    expect.set_options(timeout=90_000)  # the 2-core machine may be busy
    db = tmp_path / "traces.db"
    scn = arith_scenario()
    run_stream(scn, stream(scn, 200, 300, 0), db, audit_share=0.25, seed=0, fallback=True)
    env = {"CASCADE_TRACES_DB": str(db), "CASCADE_POLICIES_DIR": str(tmp_path / "policies"),
           "CASCADE_APP_PRELOAD": "0"}
    with StreamlitApp(env, tmp_path / "streamlit.log", start_timeout_s=90) as app, \
            chromium_page(1400, 1800, timeout_ms=90_000) as page:
        page.goto(f"{app.url}/monitor")
        page.wait_for_function(IDLE_JS, timeout=120_000)
        expect(page.get_by_role("heading", name="Monitor")).to_be_visible()
        expect(page.get_by_text("500 questions in").first).to_be_visible()
        expect(page.get_by_test_id("stMetricValue").filter(has_text="broken").first).to_be_visible()
        expect(page.get_by_test_id("stMetricValue").filter(has_text="ALARM").first).to_be_visible()
        expect(page.get_by_text("FALLBACK: the last stage answers every question").first).to_be_visible()
        expect(page.get_by_test_id("stVegaLiteChart").nth(1)).to_be_visible()  # keep rates; loss and bound
        expect(page.get_by_test_id("stDataFrame").nth(1)).to_be_visible()  # drifted streams; alarm history
        page.wait_for_function(IDLE_JS, timeout=120_000)
        page.wait_for_timeout(1000)  # the charts' canvases draw after their elements appear
        assert not page.get_by_test_id("stException").count()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / "monitor.png"
        page.screenshot(path=str(path), full_page=True)
    image = Image.open(path).convert("L")
    low, high = image.getextrema()
    assert high - low > 100, "the screenshot is blank"
    assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20, "the screenshot is nearly one colour"
