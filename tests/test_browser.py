"""End to end in a real browser: `streamlit run app.py` on a free loopback port, driven by Debian's
Chromium through Playwright. It moves a threshold slider and switches stages off on the explorer
(the metric and the chart's operating point must change, the URL must carry the threshold),
opens the explorer's link in a fresh session (the same accuracy and chart point), routes a
question on SmolLM2 -> the 0.5B (a card per stage, the trace downloaded as JSON), streams a
free-form answer, cancels a long one, and saves a screenshot of every page under
test-artifacts/browser/. Another test checks the explorer at 400 px.

A second test opens a shared explorer link as the first request to a fresh server (pages/ with
st.navigation must still run app.py).

Chromium comes from the project's set-up (`make browser`, Debian's package); never from
`playwright install`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from _browser import ARTIFACTS, BROWSER_MARKS, OPERATING_POINT_JS, StreamlitApp, chromium_page
from _records import write_synthetic_records


pytestmark = [*BROWSER_MARKS, pytest.mark.model]


@pytest.fixture
def server(tmp_path, smollm2_path):
    """The app on a free loopback port, on synthetic records in a temporary results folder."""
    write_synthetic_records(tmp_path / "results")
    env = {"CASCADE_RESULTS_DIR": str(tmp_path / "results"),
           "CASCADE_POLICIES_DIR": str(tmp_path / "policies"),  # no calibrated policy for synthetic records
           "CASCADE_APP_PRELOAD": "0"}  # models load when a question reaches them (the test times nothing)
    with StreamlitApp(env, tmp_path / "streamlit.log", start_timeout_s=60) as app:
        yield app.url


def operating_point(page, other_than: tuple[float, float] | None = None) -> tuple[float, float]:
    """The explorer chart's current point, read from the chart drawn in the page (waiting until it
    is drawn and, with `other_than`, until it has moved away from that point)."""
    page.wait_for_function(f"() => {{ const p = ({OPERATING_POINT_JS})(); return p && JSON.stringify(p) !== "
                           f"{json.dumps(json.dumps(list(other_than)) if other_than else '')}; }}", timeout=60_000)
    return tuple(page.evaluate(OPERATING_POINT_JS))


def wait_idle(page) -> None:
    """Until Streamlit has finished the current run (its 'running' widget gone)."""
    page.wait_for_timeout(300)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=120_000)


def go_to(page, title: str) -> None:
    page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
    wait_idle(page)


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_browser_end_to_end(server):
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)  # the 2-core machine may be busy; Streamlit reruns can take seconds

    with chromium_page(1400, 1800, timeout_ms=60_000) as page:
        page.goto(server)
        expect(page.get_by_role("heading", name="Confidence-driven model cascade")).to_be_visible()
        wait_idle(page)
        expect(page.get_by_text("Headline from the cached benchmark")).to_be_visible()
        shot(page, "1-home")

        # Explore: move SmolLM2's τ_T to its maximum; the metric and the chart's point follow.
        go_to(page, "Explore thresholds")
        accuracy = page.get_by_test_id("stMetricValue").first
        expect(accuracy).to_contain_text("%")
        before_text, before_point = accuracy.inner_text(), operating_point(page)
        slider = page.get_by_test_id("stSlider").filter(has_text="τ_T").first.get_by_role("slider")
        slider.focus()
        slider.press("End")
        expect(accuracy).not_to_have_text(before_text)
        wait_idle(page)
        moved_point = operating_point(page, other_than=before_point)
        assert moved_point[1] != before_point[1]
        assert "t.smollm2-135m=1" in page.url
        shot(page, "2-explore-thresholds")

        # Switch the 1.5B stage off: SmolLM2 (τ_T = 1, so it escalates) -> Qwen2.5-Coder-0.5B.
        text = accuracy.inner_text()
        page.get_by_test_id("stCheckbox").filter(has_text="Qwen2.5-Coder-1.5B-Instruct").locator("label").click()
        expect(accuracy).not_to_have_text(text)
        wait_idle(page)
        assert operating_point(page, other_than=moved_point) != moved_point
        assert "on.qwen2.5-coder-1.5b=0" in page.url

        # A shared link, opened in a fresh session (another browser context: no cookies, no session),
        # shows what the sender saw, to the last digit (issue 22: the stages' on/off were lost).
        sent_url, sent_accuracy, sent_point = page.url, accuracy.inner_text(), operating_point(page)
        fresh = page.context.browser.new_context(viewport={"width": 1400, "height": 1800}).new_page()
        fresh.goto(sent_url)
        fresh_accuracy = fresh.get_by_test_id("stMetricValue").first
        expect(fresh_accuracy).to_have_text(sent_accuracy)
        assert operating_point(fresh) == sent_point
        expect(fresh.get_by_text("Ignored from the link")).to_have_count(0)
        shot(fresh, "2b-shared-link-fresh-session")
        fresh.context.close()

        # Route: the stages and thresholds follow the explorer; the cards appear stage by stage.
        go_to(page, "Route a question")
        page.get_by_text("Type a question", exact=True).click()
        wait_idle(page)
        page.get_by_role("textbox", name="Question", exact=True).fill("Which planet is known as the Red Planet?")
        page.get_by_label("Answer options, one per line (leave empty for a free-form answer)").fill(
            "Venus\nMars\nJupiter\nSaturn")
        page.get_by_role("button", name="Route").click()
        first, second = "SmolLM2-135M-Instruct: escalated", "Qwen2.5-Coder-0.5B-Instruct: answered (last stage)"
        seen: dict[str, float] = {}
        started = time.monotonic()
        while second not in seen and time.monotonic() - started < 240:
            for label in (first, second):
                if label not in seen and page.get_by_text(label).count():
                    seen[label] = time.monotonic()
                    if label == first:
                        shot(page, "3a-route-first-card")  # stage 1 done, stage 2 loading or running
            page.wait_for_timeout(100)
        assert first in seen and second in seen, seen
        assert seen[first] < seen[second]  # stage 1's card was on screen before stage 2 answered
        wait_idle(page)
        assert page.get_by_test_id("stExpander").filter(has_text="answered (last stage)").count() == 1
        expect(page.get_by_text("Routing path")).to_be_visible()
        page.get_by_test_id("stGraphVizChart").locator("svg").first.wait_for()
        shot(page, "3-route-a-question")
        with page.expect_download() as download:  # the trace as JSON
            page.get_by_role("button", name="Download the trace (JSON)").click()
        trace = json.loads(Path(download.value.path()).read_text(encoding="utf-8"))
        assert [s["stage"] for s in trace["steps"]] == ["smollm2-135m", "qwen2.5-coder-0.5b"]
        assert trace["question"]["options"] == ["Venus", "Mars", "Jupiter", "Saturn"] and not trace["cancelled"]

        # A free-form answer streams into the running card, then the card replaces it. SmolLM2 alone:
        # stages picked by hand stay across kinds, and a free-form escalation would load the 1.5B (6 GB).
        sidebar = page.get_by_test_id("stSidebar")
        chips = sidebar.get_by_role("group", name="Selected values").locator("[data-tag]")
        while chips.count() > 1:  # remove the last stage's chip until SmolLM2's alone is left
            sidebar.locator(f'[aria-label="Remove {chips.last.get_attribute("aria-label")}"]').click()
            wait_idle(page)
        expect(chips).to_have_count(1)
        expect(chips.first).to_have_attribute("aria-label", re.compile("SmolLM2"))
        page.get_by_label("Answer options, one per line (leave empty for a free-form answer)").fill("")
        page.get_by_role("textbox", name="Question", exact=True).fill("Name three colours of the rainbow.")
        page.get_by_role("button", name="Route").click()
        streamed = page.get_by_test_id("stText").filter(has_text="generating:")
        streamed.first.wait_for(timeout=240_000)
        pieces = {streamed.first.inner_text()}
        while streamed.count() and len(pieces) < 3:  # the text grows while the model generates
            try:
                pieces.add(streamed.first.inner_text(timeout=1_000))
            except Exception:  # noqa: BLE001 - the card replaced it in the meantime
                break
            page.wait_for_timeout(100)
        wait_idle(page)
        assert len(pieces) >= 2, pieces  # seen at least twice, with different text
        expect(page.get_by_text("The cascade's free-form answer")).to_be_visible()

        # Cancel stops the generation: the run ends with "You cancelled", and the model is free again.
        page.get_by_role("textbox", name="Question", exact=True).fill(
            "Write a long story about a dragon who learns to bake bread, with many details.")
        page.get_by_role("button", name="Route").click()
        streamed.first.wait_for(timeout=240_000)
        clicked = time.monotonic()
        page.get_by_role("button", name="Cancel").click()
        expect(page.get_by_text("You cancelled the run")).to_be_visible()
        stopped_s = time.monotonic() - clicked
        wait_idle(page)
        shot(page, "3b-route-cancelled")
        assert not page.get_by_text("The cascade's free-form answer").count()
        page.get_by_role("textbox", name="Question", exact=True).fill("Name a primary colour.")
        page.get_by_role("button", name="Route").click()  # the model's lock was let go: it answers again
        expect(page.get_by_text("The cascade's free-form answer")).to_be_visible(timeout=240_000)
        print(f"cancel shown {stopped_s:.2f} s after the click")

        go_to(page, "Benchmarks")
        expect(page.get_by_role("heading", name="Per model")).to_be_visible()
        shot(page, "4-benchmarks")

        go_to(page, "Settings and models")
        expect(page.get_by_role("heading", name="Add a stage (this browser session only)")).to_be_visible()
        shot(page, "5-settings")
        assert not page.get_by_test_id("stException").count()

        # A shared link opens the explorer in a new session with its thresholds.
        shared = page.context.browser.new_page(viewport={"width": 1400, "height": 1800})
        shared.goto(f"{server}/explore?t.smollm2-135m=0.7&rule=pt_only")
        expect(shared.get_by_test_id("stSlider").filter(has_text="τ_T").first).to_contain_text("0.70")
        expect(shared.get_by_test_id("stSidebarNav").get_by_text("Home", exact=True)).to_be_visible()
        assert shared.get_by_role("radio", name="P(T) only").is_checked()
        shot(shared, "6-shared-explorer-link")


def test_at_400_px_the_chart_fits_right_under_the_sliders(server):
    """Issue 22, item 7: at 400 px the explorer's chart fits the width and follows the sliders (the
    routing table and calibration form come after it), and nothing overflows sideways."""
    from playwright.sync_api import expect

    with chromium_page(400, 900, timeout_ms=120_000) as page:
        page.goto(f"{server}/explore")
        operating_point(page)
        wait_idle(page)
        chart = page.locator(".stEChartsChart").first
        chart.scroll_into_view_if_needed()
        box = chart.bounding_box()
        sliders = page.get_by_test_id("stSlider")
        last = sliders.nth(sliders.count() - 1).bounding_box()
        table = page.get_by_role("heading", name="Where the questions go").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 400, box
        # right under the sliders: after the last slider, the last stage's box ("it always answers") and
        # the chart's own top margin, within half a screen (it was two screens below)
        assert last["y"] < box["y"] < last["y"] + last["height"] + 450, (last, box)
        assert table["y"] > box["y"]  # the table comes after the chart
        width = page.evaluate("() => document.querySelector('[data-testid=\"stMain\"]').scrollWidth")
        assert width <= 400, width
        expect(page.get_by_test_id("stException")).to_have_count(0)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "7-explore-400px.png"), full_page=False)


def test_a_deep_link_as_the_first_request_shows_the_navigation(server):
    """A shared Explore link opened before any other session on a fresh server runs app.py (the
    navigation is there) and restores the link's state: pages/ and st.navigation together. No
    "Page not found" notice comes up over it (Streamlit's legacy pages/ navigation, which app.py
    switches off at start-up, used to answer that first request)."""
    from playwright.sync_api import expect

    with chromium_page(1400, 1800) as page:
        page.goto(f"{server}/explore?t.smollm2-135m=0.7&rule=pt_only")
        expect(page.get_by_test_id("stSlider").filter(has_text="τ_T").first).to_contain_text("0.70",
                                                                                          timeout=120_000)
        expect(page.get_by_test_id("stSidebarNav").get_by_text("Home", exact=True)).to_be_visible()
        assert page.get_by_role("radio", name="P(T) only").is_checked()
        assert not page.get_by_test_id("stException").count()
        page.wait_for_timeout(2_000)  # a notice sent late would be up by now
        expect(page.get_by_role("dialog")).to_have_count(0)
        expect(page.get_by_text("Page not found")).to_have_count(0)
