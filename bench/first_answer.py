"""First answer in the app, in a real browser (Playwright + /usr/bin/chromium): how long a user waits
from clicking "Route" to the cascade's answer on screen.

Scenarios (each on a fresh `streamlit run app.py`, real packaged models, one MMLU question typed in):
- `warm`: the shipped calibrated policy, background preloading on (the packaged preset's default);
  the Home page is opened, left `--wait` seconds (60 by default: "the app open for 60 s"), then the
  question is routed.
- `cold-kept`: the preset's own thresholds (no policy file: SmolLM2 first at 0.5 / 0.5), no
  preloading; a question SmolLM2 keeps, so only SmolLM2 loads (the load is inside the time). The
  app is opened `--typing` seconds (10 by default) before Route, as a user typing the question:
  in that time the app imports the model code in the background (no weights).
- `cold-shipped`: the shipped policy, no preloading, `--typing` as above: its first stage's model
  loads inside the time.
- `warm-example`: as `warm`, but Route is pressed on the example the Route page opens on (the
  tightest accuracy promise at which a stage before the last is in use; its first stage keeps it):
  what a newcomer does first.
- `stream`: as `warm`, a free-form question ("What is 48 plus 76?", run with the shipped free-form
  policy): when the answering stage's card says it is running, and when its first text is on screen.

The warm scenarios type the question on the promise the Route page opens on unless `--target`
picks another.

    .venv/bin/python bench/first_answer.py [--scenarios warm,cold-kept,cold-shipped] [--wait 60]

The question is MMLU virology/0020 (test split): SmolLM2 keeps it in the committed records
(P(T) 0.89, P(IK) 0.71). Prints one line per scenario (also the seconds the stages themselves took,
the page's "Seconds" metric, and the model load time the page reports) and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from _browser import CHROMIUM, IDLE_JS, StreamlitApp, chromium_page  # noqa: E402

QID = "virology/0020"
ANSWER_TEXT = "The cascade answers"


def mmlu_question(qid: str) -> dict:
    from cascade_core.records.mmlu import load_mmlu

    frame = load_mmlu(split="test")
    row = frame[frame["qid"] == qid].iloc[0]
    return {"text": row["question"], "options": list(row["options"]), "subject": row["subject"].replace("_", " ")}


def _stages_text(page) -> tuple[list[str], list[float]]:
    text = "\n".join(page.get_by_test_id("stExpander").all_inner_texts())
    stages = re.findall(r"^(.+: (?:kept its answer|escalated|answered \(last stage\)|failed))$", text, re.M)
    return stages, [float(m) for m in re.findall(r"model loaded in ([0-9.]+) s", text)]


def open_route(page, url: str) -> float:
    page.goto(url)
    page.wait_for_function(IDLE_JS)
    opened = time.perf_counter()
    page.get_by_test_id("stSidebarNav").get_by_text("Route a question", exact=True).click()
    page.wait_for_timeout(300)
    page.wait_for_function(IDLE_JS)
    return opened


def route_once(url: str, question: dict | None, wait_s: float, target: str | None = None) -> dict:
    """Route one question: `question` typed in, or None for the example the Route page opens on
    (its first stage keeps it). `target`: the accuracy promise to pick first ("1", "3", ...)."""
    with chromium_page(1400, 1600, timeout_ms=600_000) as page:
        opened = open_route(page, url)
        if target is not None:
            page.get_by_text(f"≤ {target} pt", exact=False).first.click()
            page.wait_for_timeout(300)
            page.wait_for_function(IDLE_JS)
        if question is not None:
            page.get_by_text("Type a question", exact=True).click()
            page.wait_for_timeout(300)
            page.wait_for_function(IDLE_JS)
            page.get_by_role("textbox", name="Question", exact=True).fill(question["text"])
            page.get_by_label("Answer options, one per line (leave empty for a free-form answer)").fill(
                "\n".join(question["options"]))
            page.get_by_label("Subject (optional, goes into the prompt header)").fill(question["subject"])
        page.wait_for_timeout(max(0.0, wait_s - (time.perf_counter() - opened)) * 1000)
        promise = page.get_by_test_id("stRadio").first.locator("label").filter(
            has=page.locator("input:checked")).first.inner_text()  # e.g. "≤ 3 pt"
        started = time.perf_counter()
        page.get_by_role("button", name="Route").click()
        page.get_by_text(ANSWER_TEXT).first.wait_for()
        seconds = time.perf_counter() - started
        page.wait_for_function(IDLE_JS)
        stages, loaded = _stages_text(page)
        answer = page.get_by_text(ANSWER_TEXT).first.inner_text()
        errors = page.get_by_test_id("stAlertContentError").all_inner_texts()
        model_s = float(page.get_by_test_id("stMetric").filter(has_text="Seconds").get_by_test_id(
            "stMetricValue").inner_text())
    return {"seconds": seconds, "stages": stages, "load_s": loaded, "answer": answer, "errors": errors,
            "model_s": model_s, "promise": promise}


FREE_FORM = "What is 48 plus 76?"


def stream_once(url: str, wait_s: float) -> dict:
    """A free-form question (the shipped free-form policy: the 1.5B answers it): from the moment the
    answering stage's card says it is running to the first generated text on screen."""
    with chromium_page(1400, 1600, timeout_ms=600_000) as page:
        opened = open_route(page, url)
        page.get_by_text("Type a question", exact=True).click()
        page.wait_for_timeout(300)
        page.wait_for_function(IDLE_JS)
        page.get_by_role("textbox", name="Question", exact=True).fill(FREE_FORM)
        page.get_by_label("Answer options, one per line (leave empty for a free-form answer)").fill("")
        page.wait_for_timeout(max(0.0, wait_s - (time.perf_counter() - opened)) * 1000)
        started = time.perf_counter()
        page.get_by_role("button", name="Route").click()
        # polled in the page every animation frame: when a stage's card says "running" and when text comes
        marks = page.evaluate("""() => new Promise(resolve => {
            const t0 = performance.now(); let running = null;
            const tick = () => {
                const cards = Array.from(document.querySelectorAll('[data-testid="stExpander"]'));
                const last = cards[cards.length - 1];
                if (last && running === null && /running for/.test(last.innerText)) running = performance.now() - t0;
                const text = Array.from(document.querySelectorAll('[data-testid="stText"]'))
                    .find(e => e.innerText.startsWith('generating:'));
                if (text) { resolve({running_ms: running, first_ms: performance.now() - t0}); return; }
                if (performance.now() - t0 > 300000) { resolve({running_ms: running, first_ms: null}); return; }
                requestAnimationFrame(tick);
            };
            tick();
        })""")
        page.get_by_text("The cascade's free-form answer").first.wait_for()
        seconds = time.perf_counter() - started
        page.wait_for_function(IDLE_JS)
        stages, loaded = _stages_text(page)
    first = marks["first_ms"] / 1000 if marks["first_ms"] is not None else float("nan")
    running = marks["running_ms"] / 1000 if marks["running_ms"] is not None else float("nan")
    return {"seconds": seconds, "first_text_s": first, "stage_running_s": running,
            "first_after_stage_s": first - running, "stages": stages, "load_s": loaded}


SCENARIOS = ("warm", "warm-example", "stream", "cold-kept", "cold-shipped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default="warm-example,warm,stream,cold-kept,cold-shipped")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds the app is open before the warm question")
    parser.add_argument("--typing", type=float, default=10.0,
                        help="seconds from opening the app to Route in the cold scenarios (a user typing a question)")
    parser.add_argument("--target", default=None,
                        help="the Route page's accuracy promise to pick (1, 3, 5, 10); default: the one it opens on")
    args = parser.parse_args()
    if not CHROMIUM.exists():
        sys.exit("Chromium is missing at /usr/bin/chromium: run `make browser`")
    question = mmlu_question(QID)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "no-policies").mkdir()
        for scenario in args.scenarios.split(","):
            if scenario not in SCENARIOS:
                sys.exit(f"unknown scenario {scenario!r}: use {', '.join(SCENARIOS)}")
            warm = scenario in ("warm", "warm-example", "stream")
            env = {"CASCADE_APP_PRELOAD": "1" if warm else "0"}
            if scenario == "cold-kept":
                env["CASCADE_POLICIES_DIR"] = str(tmp / "no-policies")
            with StreamlitApp(env, tmp / f"streamlit-{scenario}.log") as app:
                wait = args.wait if warm else args.typing
                if scenario == "stream":
                    figures = stream_once(app.url, wait)
                else:
                    figures = route_once(app.url, None if scenario == "warm-example" else question, wait, args.target)
            if scenario == "stream":
                print(f"stream: the answering stage's card running {figures['stage_running_s']:.2f} s after Route, "
                      f"first text {figures['first_text_s']:.2f} s after Route ({figures['first_after_stage_s']:.2f} s "
                      f"after the "
                      f"stage started), whole answer {figures['seconds']:.2f} s; stages {figures['stages']}")
            else:
                print(f"{scenario}: answer on screen {figures['seconds']:.2f} s after Route (promise "
                      f"{figures['promise']!r}); "
                      f"stages {figures['stages']}; the stages' own seconds {figures['model_s']:.2f}; model load "
                      f"reported {figures['load_s']} s; {figures['answer']!r}"
                      + (f"; errors shown: {figures['errors']}" if figures["errors"] else ""))
            out[scenario] = figures
    summary = {f"{k.replace('-', '_')}_s": round(v["seconds"], 2) for k, v in out.items()}
    if "stream" in out:
        summary["stream_first_token_after_stage_start_s"] = round(out["stream"]["first_after_stage_s"], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
