"""Threshold change to updated metrics and chart, in a real browser (Playwright + /usr/bin/chromium).

Starts `streamlit run app.py` on a free loopback port, opens the explorer in headless Chromium
(1400 x 900) and, `--changes` times, types a new exact τ_T for the first stage into its number box
and presses Enter; it times from the key press until both the Accuracy metric and the chart's
operating point show the new policy (read from the page: the metric's text, and the chart's
"these thresholds" point from the description ECharts writes into its aria-label on every redraw).
The values alternate between low and high thresholds, so every change moves the point. Then a burst:
`--burst` ArrowRight presses on the slider with no pause, timed from the last press until the page
is idle with the slider on the last value (coalescing).

Two scenarios (both by default):
- `committed`: the records in --results-dir (e.g. /work/snap5700/results, the frozen 5,700 x 3);
- `14042x4`: synthetic records of the default preset's three stages on all 14,042 MMLU questions
  (records.synthetic_table, written as the benchmark writes them, into a temporary folder), the
  cascade ended by the recorded GPT-4 stage: 4 stages.
No calibrated policy file (an empty policies folder), so the sliders start on the preset's 0.5.

    .venv/bin/python bench/browser_latency.py --results-dir /work/snap5700/results [--changes 30]

Prints each scenario's figures and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from _browser import CHROMIUM, IDLE_JS, OPERATING_POINT_JS, StreamlitApp, chromium_page  # noqa: E402
from app_latency import write_synthetic  # noqa: E402  (the same 14,042-question synthetic records)

STATE_JS = ("() => { const m = document.querySelector('[data-testid=\"stMetricValue\"]');"
            " return JSON.stringify([m ? m.innerText : null, (" + OPERATING_POINT_JS + ")()]); }")


def start_app(results: Path, policies: Path, log_path: Path) -> StreamlitApp:
    return StreamlitApp({"CASCADE_RESULTS_DIR": str(results), "CASCADE_POLICIES_DIR": str(policies),
                         "CASCADE_APP_PRELOAD": "0"}, log_path)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure(url: str, query: str, changes: int, burst: int) -> dict:
    with chromium_page(1400, 900, timeout_ms=120_000) as page:
        page.goto(f"{url}/explore?{query}")
        page.wait_for_function("() => { const s = JSON.parse((" + STATE_JS + ")()); return s[0] && s[1]; }")
        page.wait_for_timeout(500)
        page.wait_for_function(IDLE_JS)
        box = page.get_by_role("spinbutton", name="exact").first  # the first stage's exact τ_T box
        values = [0.05 + 0.9 * ((i * 7) % 30) / 29 for i in range(changes)]
        times, misses = [], 0
        for value in values:
            before = page.evaluate(STATE_JS)
            box.fill(f"{value:.4f}")
            started = time.perf_counter()
            box.press("Enter")
            try:
                page.wait_for_function(
                    "(before) => { const s = JSON.parse((" + STATE_JS + ")()); const b = JSON.parse(before);"
                    " return s[0] !== b[0] && JSON.stringify(s[1]) !== JSON.stringify(b[1]); }",
                    arg=before, polling="raf", timeout=15_000)
                times.append((time.perf_counter() - started) * 1000)
            except Exception:  # noqa: BLE001 - no visible change (same metric text): not timed
                misses += 1
            page.wait_for_function(IDLE_JS)
            page.wait_for_timeout(150)
        slider = page.get_by_test_id("stSlider").first.get_by_role("slider")
        box.fill("0.3000")  # on the slider's 0.01 grid, with room for the burst
        box.press("Enter")
        page.wait_for_function("() => { const s = document.querySelector('[data-testid=\"stSlider\"] input');"
                               " return s && s.getAttribute('aria-valuetext') === '0.30'; }", timeout=60_000)
        page.wait_for_timeout(300)
        page.wait_for_function(IDLE_JS)
        start = 0.3
        slider.focus()
        for _ in range(burst):
            slider.press("ArrowRight", delay=0)
        last = time.perf_counter()
        target = round(start + 0.01 * burst, 2)
        try:  # the exact box follows the slider only once the server has run the last value
            page.wait_for_function(
                "(t) => { const b = document.querySelector('input[aria-label=\"exact\"]');"
                " return b && Math.abs(parseFloat(b.value) - t) < 0.006; }", arg=target, timeout=60_000)
            page.wait_for_timeout(100)
            page.wait_for_function(IDLE_JS, timeout=120_000)
            settle = (time.perf_counter() - last) * 1000
        except Exception:  # noqa: BLE001 - reported: the page never showed the last value within 60 s
            settle = float("nan")
        shown = box.input_value()
    return {"changes": len(times), "unchanged": misses, "median_ms": statistics.median(times),
            "p90_ms": pct(times, 0.9), "min_ms": min(times), "max_ms": max(times),
            "burst": burst, "burst_settle_ms": settle, "burst_final_value": shown}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results-dir", type=Path, default=REPO / "data" / "results",
                        help="records for the 'committed' scenario (default data/results)")
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--scenarios", default="committed,14042x4")
    args = parser.parse_args()
    if not CHROMIUM.exists():
        sys.exit("Chromium is missing at /usr/bin/chromium: run `make browser`")
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "policies").mkdir()
        for scenario in args.scenarios.split(","):
            if scenario == "committed":
                results, query = args.results_dir, "end=(none)"
            elif scenario == "14042x4":
                results, query = tmp / "results-14042", "end=gpt-4-recorded&split=all"
                write_synthetic(results)
            else:
                sys.exit(f"unknown scenario {scenario!r}: use committed, 14042x4")
            with start_app(results, tmp / "policies", tmp / f"streamlit-{scenario}.log") as app:
                figures = measure(app.url, query, args.changes, args.burst)
            print(f"{scenario} (burst target {0.3 + 0.01 * args.burst:.2f}): {figures['changes']} changes timed "
                  f"({figures['unchanged']} left the metric unchanged): "
                  f"median {figures['median_ms']:.0f} ms, p90 {figures['p90_ms']:.0f} ms "
                  f"(min {figures['min_ms']:.0f}, max {figures['max_ms']:.0f}); {figures['burst']} queued arrow "
                  f"presses settled in {figures['burst_settle_ms']:.0f} ms on {figures['burst_final_value']}")
            out[scenario] = figures
    print(json.dumps({f"{k}_{m}": (round(v[m], 1) if v[m] == v[m] else None) if isinstance(v[m], float) else v[m]
                      for k, v in out.items() for m in ("median_ms", "p90_ms", "burst_settle_ms")}))


if __name__ == "__main__":
    main()
