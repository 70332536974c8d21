# Two commands on a fresh machine:  `make reproduce` (the main job) and `make test`.
# Both create the virtual environment .venv and install the pinned requirements first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test

.PHONY: install reproduce test lab bench clean chromium docs docs-html

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -c "from pixelfly_lab.ops.native import main; main()"   # compiled CPU kernels (optional: warns where no compiler)
	touch $@

$(TSTAMP): $(STAMP) requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

# The JupyterLab browser test drives Debian's chromium; install it where we may (root or
# password-less sudo). Elsewhere the test is skipped (and fails under CI=true).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; \
	  elif sudo -n true 2>/dev/null; then SUDO=sudo; \
	  else echo "note: chromium is missing and cannot be installed without root: the browser test will skip"; exit 0; fi; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# Every study's figures, tables and claims at the quick preset (CPU minutes), into results/;
# `--preset full` is the paper-scale run, `--preset tiny` what the tests run.
reproduce: $(STAMP)
	$(PY) -m pixelfly_lab reproduce --preset quick --out results

# The whole suite, notebooks included (PIXELFLY_QUICK=1 shrinks their work). One thread per
# process: xdist runs two processes, and oversubscribed cores slow small matmuls 5x.
test: $(TSTAMP) chromium
	PIXELFLY_QUICK=1 OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 -q

# The test requirements too: notebook 07 builds Hugging Face models (transformers is test-only).
lab: $(TSTAMP)
	$(VENV)/bin/jupyter lab notebooks/

bench: $(STAMP)
	$(PY) -m pixelfly_lab bench

# Executed copies of the notebooks for readers who do not run them: docs/<notebook>.html (nbconvert), at full
# size (each notebook about 3 minutes or less on 2 cores; 06 reads results/, so run `make reproduce` first or it
# runs the quick reproduction itself). `make docs DOCS_QUICK=1` renders the quick mode in about two minutes.
# The executed notebooks stay in build/docs (ignored); docs/render.py renders them with nbconvert's lab template,
# every page linking one stylesheet, docs/style.css, instead of embedding it. `make docs-html` re-renders the
# pages from build/docs without running the notebooks again.
DOCS_QUICK ?= 0
DOCS_BUILD := build/docs
docs: $(TSTAMP)
	PIXELFLY_QUICK=$(DOCS_QUICK) $(VENV)/bin/jupyter nbconvert --to notebook --execute \
	  --ExecutePreprocessor.timeout=900 --output-dir $(DOCS_BUILD) notebooks/*.ipynb
	$(MAKE) docs-html

docs-html: $(TSTAMP)
	$(PY) docs/render.py --out docs $(DOCS_BUILD)/*.ipynb

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
