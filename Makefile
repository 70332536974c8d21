# Two commands on a fresh machine:  `make reproduce` (the main job) and `make test`.
# Both create the virtual environment .venv and install the pinned requirements first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test

.PHONY: install reproduce test lab bench clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(TSTAMP): $(STAMP) requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

# Every figure and table that exists so far, quick CPU version, into results/.
reproduce: $(STAMP)
	$(PY) -m pixelfly_lab reproduce --quick --out results

# The whole suite, notebooks included (PIXELFLY_QUICK=1 shrinks their work).
test: $(TSTAMP)
	PIXELFLY_QUICK=1 $(PY) -m pytest -n 2 -q

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

bench: $(STAMP)
	$(PY) -m pixelfly_lab bench

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
