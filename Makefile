# `make demo` and `make test` work from a fresh clone: each creates .venv when it
# is missing. torch is pinned and installed first: an unpinned torch (pulled in by
# `pip install -e .`) would be a CUDA build of several GB instead of the CPU one.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint

venv: $(STAMP)

# The stamp is written last, so an install that failed half-way is redone.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -c "import etcd3, torch, fsspec, tenacity; print('etcd3', etcd3.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	rm -f elastic-demo.events.jsonl
	$(VENV)/bin/elastic run -n 3 --no-checkpoint --event-log elastic-demo.events.jsonl \
		examples/classifier.py --step-time 0.05
	$(VENV)/bin/elastic plot elastic-demo.events.jsonl -o elastic-demo.png

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
