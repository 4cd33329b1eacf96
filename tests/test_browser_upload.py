"""The upload flow in a real browser (Chromium through Playwright, `streamlit run app.py` on loopback):
a bad file is refused with its line and column, a good one previewed and registered, its benchmark
started in the background; after a page reload (a new session) the job is still there, its progress
bar comes back, and Stop stops it. Screenshots go to test-artifacts/browser/upload-*.png."""

from __future__ import annotations

import json
import re

import pytest

from _browser import ARTIFACTS, BROWSER_MARKS, IDLE_JS, StreamlitApp, app_folders_env, chromium_page

SUMS = "".join(json.dumps({"question": f"What is {a} + {b}? Answer with the number only.", "answer": str(a + b),
                           "group": "small" if a < 10 else "large"}) + "\n"
               for a, b in ((2, 3), (4, 1), (3, 3), (12, 30), (25, 14), (41, 17)))

pytestmark = [*BROWSER_MARKS, pytest.mark.model]


def upload(page, name: str, content: str) -> None:
    page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(
        {"name": name, "mimeType": "application/jsonl", "buffer": content.encode()})


def test_upload_register_and_a_background_benchmark_that_survives_a_reload(tmp_path, smollm2_path):
    from playwright.sync_api import expect

    expect.set_options(timeout=90_000)  # the 2-core machine may be busy
    env = app_folders_env(tmp_path)
    with StreamlitApp(env, tmp_path / "streamlit.log", start_timeout_s=90) as app, \
            chromium_page(1400, 1800, timeout_ms=90_000) as page:
        page.goto(f"{app.url}/benchmarks")
        page.wait_for_function(IDLE_JS, timeout=120_000)

        upload(page, "bad.jsonl", '{"question": "2+2?", "answer": "4"}\n{"question": "", "answer": "1"}\n')
        expect(page.get_by_text("Not taken: bad.jsonl, line 2, column 'question'").first).to_be_visible()

        upload(page, "sums.jsonl", SUMS)
        expect(page.get_by_text("6 free-form questions in 2 group(s), with answers").first).to_be_visible()
        page.get_by_role("button", name="Register it as a dataset").click()
        expect(page.get_by_text("Registered as").first).to_be_visible()
        expect(page.get_by_role("heading", name="Benchmark sums in the background")).to_be_visible()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "upload-1-registered.png"), full_page=True)

        page.get_by_role("button", name="Start the benchmark in the background").click()
        expect(page.get_by_test_id("stProgress")).to_be_visible()
        expect(page.get_by_text("Job on sums").first).to_be_visible()

        page.reload()  # a new session, on the dataset its URL names (?dataset=sums): the job's progress at once
        page.wait_for_function(IDLE_JS, timeout=120_000)
        expect(page.get_by_role("combobox", name="Dataset")).to_have_value(re.compile(r"^sums"))
        expect(page.get_by_test_id("stProgress")).to_be_visible()
        page.goto(f"{app.url}/benchmarks")  # a new session without it starts on MMLU, and finds the job
        page.get_by_role("button", name="Watch sums").click()
        expect(page.get_by_test_id("stProgress")).to_be_visible()
        expect(page.get_by_text("Job on sums").first).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "upload-2-progress-after-reload.png"), full_page=True)

        page.get_by_role("button", name="Stop the job").click()
        expect(page.get_by_text("Stopped. The records so far are kept").first).to_be_visible()
        assert not page.get_by_test_id("stException").count()
