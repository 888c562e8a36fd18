# Every target creates/updates .venv and installs what it needs, so each works on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-fast test-slow lint bench ui clean reference-env reference-fixture

install: $(STAMP)

# torch first, pinned to the local CPU build: a range would pull a multi-GB CUDA wheel.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,hf]'
	touch $(STAMP)

# The reference port (HF TransfoXLLMHeadModel, last maintained in transformers 4.35.2) in its own
# environment, never a dependency of ours: it regenerates tests/fixtures/transfo_xl and is the
# other half of benchmarks/bench_model.py --against-reference.
REF := .venv-ref
REF_STAMP := $(REF)/.installed-stamp

reference-env: $(REF_STAMP)

$(REF_STAMP):
	test -x $(REF)/bin/python || $(PYTHON) -m venv $(REF)
	$(REF)/bin/python -m pip install --quiet torch==2.13.0
	$(REF)/bin/python -m pip install --quiet transformers==4.35.2 "tokenizers<0.19" "huggingface-hub<1.0" safetensors numpy
	touch $(REF_STAMP)

reference-fixture: $(REF_STAMP)
	$(REF)/bin/python tools/make_reference_fixture.py

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# ruff: import order, line length, pyflakes (settings in pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	bash scripts/demo.sh

bench: $(STAMP) $(REF_STAMP)
	bash benchmarks/run_all.sh

# The UI over the default store (training's sqlite:///mlruns.db), lean like cluster/mlflow_server.sh:
# one worker, no job runner. `make ui UI_PORT=5001` when 5000 is taken; UI_STORE names another store.
# Open runs with ?workflowType=machine_learning (or pick "Model training" in the sidebar once).
UI_PORT ?= 5000
UI_STORE ?= sqlite:///mlruns.db
ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --backend-store-uri $(UI_STORE) \
	  --host 127.0.0.1 --port $(UI_PORT) --workers 1

clean:
	rm -rf demo runs shards
