"""The dataset the pages work on: one sidebar picker, the same choice on every page of a session.

Every page calls `dataset_picker(PAGE)` near its top. The choice lives under a key of its own
(Streamlit forgets a widget's value when a page without that widget runs, as for the preset in
`state`), so the Benchmarks page can also switch it to a file just registered (`choose`).
The names are the registry's (`dataset_registry.known_datasets`: the built-in sets and every
file registered under the results folder); the pages ask cascade_core for the records, splits and
policies of the chosen one. `question_picker` lets the Route page take a question from any of them.

The choice travels in the URL too, as `?dataset=<name>` (MMLU, the default, leaves the URL
clean): a shared link such as `/explore?dataset=arith` opens a fresh session on arith, and a link
between pages carries it (`link_params`). The URL's value is taken when it is new (a link was
followed), never over a choice made in the picker since.
"""

from __future__ import annotations

import streamlit as st

from app_ui.data import where

DATASET_KEY = "_dataset_name"
DEFAULT = "mmlu"
PARAM = "dataset"  # the URL's query parameter
URL_KEY = "_dataset_in_url"  # the value this session last put in (or took from) the URL


def known() -> list[str]:
    """The datasets a user can pick: the built-in ones and the files registered here."""
    from cascade_core.records.registry import known_datasets

    return known_datasets(where().results)


def describe(name: str) -> str:
    """'sums: free-form, graded numeric, with answers' (what the registry's metadata says)."""
    from cascade_core.records.registry import read_metadata

    try:
        meta = read_metadata(name, where().results)
    except ValueError:
        return name
    kind = "multiple choice" if meta.get("kind") == "mc" else "free-form"
    size = f"{meta['questions']:,} " if meta.get("questions") else ""
    answers = "" if meta.get("has_answers", True) else ", no answers (label-free)"
    return f"{name} ({size}{kind}{answers})".replace("( ", "(")


def registered_as(path) -> dict | None:
    """The metadata of the dataset registered from the file at `path` with its present content, or
    None (not registered, or registered from other content: registering again says what changed)."""
    import hashlib
    from pathlib import Path

    from cascade_core.records.registry import dataset_name, read_metadata

    path = Path(path)
    try:
        meta = read_metadata(dataset_name(str(path), where().results), where().results)
    except ValueError:
        return None
    same = (meta.get("source") == str(path.resolve())
            and meta.get("sha256") == hashlib.sha256(path.read_bytes()).hexdigest())
    return meta if same else None


def current() -> str:
    """The session's dataset (MMLU until one is picked)."""
    return st.session_state.get(DATASET_KEY) or DEFAULT


def choose(name: str) -> None:
    """Make `name` the session's dataset from the next run on (the picker follows)."""
    st.session_state[DATASET_KEY] = name


def _remember(widget_key: str) -> None:
    st.session_state[DATASET_KEY] = st.session_state[widget_key]


def link_params(name: str | None = None) -> dict[str, str]:
    """The query parameters that carry a dataset (the session's by default) in a link or a page's
    URL: `{"dataset": name}`, or {} for MMLU."""
    name = name or current()
    return {} if name == DEFAULT else {PARAM: name}


def _from_url(names: list[str], container) -> None:
    """Take `?dataset=` when it is new to this session (a followed link); an unknown name is said,
    and the session's dataset kept."""
    wanted = st.query_params.get(PARAM)
    if wanted is None or wanted == st.session_state.get(URL_KEY):
        return
    st.session_state[URL_KEY] = wanted
    if wanted in names:
        choose(wanted)
    else:
        container.warning(f"The link's dataset={wanted!r} is not a dataset here (known: {', '.join(names)}); "
                          f"showing {current() if current() in names else DEFAULT}.")


def _to_url(name: str) -> None:
    """The URL says the dataset shown (no parameter for MMLU), so that it can be shared."""
    wanted = link_params(name).get(PARAM)
    if st.query_params.get(PARAM) != wanted:
        if wanted is None:
            del st.query_params[PARAM]
        else:
            st.query_params[PARAM] = wanted
    st.session_state[URL_KEY] = wanted


def dataset_picker(page: str, container=None) -> str:
    """A dataset selectbox (in the sidebar by default) shared by every page, following the URL's
    `?dataset=` when a link brings a new one and writing the choice back into it; returns the name."""
    container = container or st.sidebar
    names = known()
    _from_url(names, container)
    chosen = current() if current() in names else DEFAULT
    key = f"dataset@{page}"
    if st.session_state.get(key) != chosen:
        st.session_state[key] = chosen
    container.selectbox("Dataset", names, key=key, on_change=_remember, args=(key,), format_func=describe,
                        help="The questions the Explore and Benchmarks pages show the records of, and the Route "
                             "page offers; upload your own on the Benchmarks page.")
    st.session_state[DATASET_KEY] = st.session_state[key]
    _to_url(st.session_state[key])
    return st.session_state[key]


@st.cache_data(show_spinner=False, max_entries=8)
def _questions(name: str, root: str, split: str, signature: tuple):
    from cascade_core.records.registry import resolve_dataset, select_questions

    return select_questions(resolve_dataset(name, root, write=False), split)


def questions(name: str, split: str = "test"):
    """A dataset's questions of one split (qid, subject, question, options, answer, references),
    as the registry resolves them, cached while its metadata file is unchanged; nothing is written."""
    meta = where().results / name / "dataset.json"
    try:
        stat = meta.stat()
        signature = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        signature = (None, None)
    return _questions(name, str(where().results), split, signature)


def question_picker(name: str, key: str):
    """A question of dataset `name` (test split) chosen by group and number, shown in a box with the
    right answer when the dataset has one (a free-form reference; a multiple-choice answer is shown
    by the Route page after routing); returns the `types.Question`, or None after saying why there
    is none."""
    from cascade_core.types import OPTION_LETTERS, Question

    try:
        pool = questions(name, "test")
    except (OSError, ValueError) as err:
        st.error(f"The questions of {name} cannot be read: {err}")
        return None
    if pool.empty:
        st.info(f"{name} has no question in its test split.")
        return None
    groups = list(dict.fromkeys(pool["subject"]))
    left, right = st.columns([3, 1])
    group = left.selectbox("Group", groups, key=f"{key}_group::{name}") if len(groups) > 1 else groups[0]
    in_group = pool[pool["subject"] == group].reset_index(drop=True)
    number = right.number_input(f"Question (1–{len(in_group)})", 1, len(in_group), 1, key=f"{key}_n::{name}::{group}")
    row = in_group.iloc[int(number) - 1]
    options = tuple(row["options"])
    answer = int(row["answer"]) if options and row["answer"] is not None and int(row["answer"]) >= 0 else None
    references = [str(r) for r in row["references"]] if row["references"] is not None else []
    # The prompt as the benchmark built it: a multiple-choice question with its group as the subject
    # (bench.run_stage), a free-form one without (freeform_bench).
    question = Question(text=row["question"], options=options, subject=str(row["subject"]) if options else "",
                        answer=answer, qid=row["qid"])
    with st.container(border=True):
        st.text(question.text)  # a user's text: never markup
        if options:
            st.text("\n".join(f"{OPTION_LETTERS[i]}. {o}" for i, o in enumerate(options)))
        told = ("the right answer is shown after routing" if answer is not None
                else f"the right answer is {' / '.join(references)}" if references and not options
                else "no right answer in the file")
        st.caption(f"{name} `{question.qid}` ({'multiple choice' if options else 'free-form'}); {told}.")
    return question
