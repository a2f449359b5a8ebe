# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing. CPU machines take torch first, exactly as
# TORCH_SPEC says (a CPU build); GPU images bring their own torch and skip `make venv`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint format venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Until the training job exists (issue 5) the demo shows what runs today: the profiles,
# the resolved local run, and the method core training a tiny model in one process.
demo: $(STAMP)
	$(VENV)/bin/m2d cluster validate
	$(VENV)/bin/m2d launch --cluster local --stage sft --dry-run
	@echo "== launching jobs is not built yet (issue 5); the method core on a tiny model:"
	$(PY) -m mask2dit.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
