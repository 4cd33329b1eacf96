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
    from cascade_core.datasets import load_mmlu

    frame = load_mmlu(split="test")
    row = frame[frame["qid"] == qid].iloc[0]
    return {"text": row["question"], "options": list(row["options"]), "subject": row["subject"].replace("_", " ")}


def route_once(url: str, question: dict, wait_s: float) -> dict:
    with chromium_page(1400, 1600, timeout_ms=600_000) as page:
        page.goto(url)
        page.wait_for_function(IDLE_JS)
        opened = time.perf_counter()
        page.get_by_test_id("stSidebarNav").get_by_text("Route a question", exact=True).click()
        page.wait_for_timeout(300)
        page.wait_for_function(IDLE_JS)
        page.get_by_role("textbox", name="Question", exact=True).fill(question["text"])
        page.get_by_label("Answer options, one per line (leave empty for a free-form answer)").fill(
            "\n".join(question["options"]))
        page.get_by_label("Subject (optional, goes into the prompt header)").fill(question["subject"])
        page.wait_for_timeout(max(0.0, wait_s - (time.perf_counter() - opened)) * 1000)
        started = time.perf_counter()
        page.get_by_role("button", name="Route").click()
        page.get_by_text(ANSWER_TEXT).first.wait_for()
        seconds = time.perf_counter() - started
        page.wait_for_function(IDLE_JS)
        text = "\n".join(page.get_by_test_id("stExpander").all_inner_texts())
        stages = re.findall(r"^(.+: (?:kept its answer|escalated|answered \(last stage\)|failed))$", text, re.M)
        loaded = [float(m) for m in re.findall(r"model loaded in ([0-9.]+) s", text)]
        answer = page.get_by_text(ANSWER_TEXT).first.inner_text()
        errors = page.get_by_test_id("stAlertContentError").all_inner_texts()
        model_s = float(page.get_by_test_id("stMetric").filter(has_text="Seconds").get_by_test_id(
            "stMetricValue").inner_text())
    return {"seconds": seconds, "stages": stages, "load_s": loaded, "answer": answer, "errors": errors, "model_s": model_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default="warm,cold-kept,cold-shipped")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds the app is open before the warm question")
    parser.add_argument("--typing", type=float, default=10.0,
                        help="seconds from opening the app to Route in the cold scenarios (a user typing a question)")
    args = parser.parse_args()
    if not CHROMIUM.exists():
        sys.exit("Chromium is missing at /usr/bin/chromium: run `make browser`")
    question = mmlu_question(QID)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "no-policies").mkdir()
        for scenario in args.scenarios.split(","):
            env = {"CASCADE_APP_PRELOAD": "1" if scenario == "warm" else "0"}
            if scenario == "cold-kept":
                env["CASCADE_POLICIES_DIR"] = str(tmp / "no-policies")
            elif scenario not in ("warm", "cold-shipped"):
                sys.exit(f"unknown scenario {scenario!r}: use warm, cold-kept, cold-shipped")
            with StreamlitApp(env, tmp / f"streamlit-{scenario}.log") as app:
                figures = route_once(app.url, question, args.wait if scenario == "warm" else args.typing)
            print(f"{scenario}: answer on screen {figures['seconds']:.2f} s after Route; stages "
                  f"{figures['stages']}; the stages' own seconds {figures['model_s']:.2f}; model load reported {figures['load_s']} s; {figures['answer']!r}"
                  + (f"; errors shown: {figures['errors']}" if figures["errors"] else ""))
            out[scenario] = figures
    print(json.dumps({f"{k.replace('-', '_')}_s": round(v["seconds"], 2) for k, v in out.items()}))


if __name__ == "__main__":
    main()
