# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing. CPU machines take torch first, exactly as
# TORCH_SPEC says (a CPU build); GPU images bring their own torch and skip `make venv`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The main job on the embedded `local` cluster: synthetic stories, pre-training, then SFT
# from the pre-trained checkpoint (each a Ray Train + DeepSpeed run on 2 CPU workers,
# logged to MLflow in runs/mlflow.db: `m2d dashboard --cluster local` shows it), then the
# 50 evaluation stories rendered from the pre-trained and the SFT checkpoints into
# runs/samples, scored (consistency and FVD against the synthetic clips) and compared in the
# paper's table. The demo's encoders are tiny random ones (`--encoder-path tiny`, nothing
# downloaded): the table shows the pipeline working, not video quality; give real encoder
# folders (X-CLIP, VideoMAE) for numbers that mean something.
DEMO_DATA := data/synth

demo: $(STAMP)
	test -f $(DEMO_DATA)/sft.jsonl || $(VENV)/bin/m2d data synth --out $(DEMO_DATA) --stories 12 --frames 20
	$(VENV)/bin/m2d launch --cluster local --stage pretrain
	$(VENV)/bin/m2d launch --cluster local --stage sft
	$(VENV)/bin/m2d runs --limit 2
	$(VENV)/bin/m2d sample-batch --cluster local --checkpoint latest-pretrain --checkpoint latest-sft \
		--prompts eval50 --out runs/samples --steps 20 \
		--eval --encoder clip --encoder-path tiny --reference $(DEMO_DATA)/pretrain.jsonl --fvd-path tiny
	$(VENV)/bin/m2d eval --cluster local --compare runs/samples

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The whole suite: what CI runs (.ci/run). Real services and distributed jobs included.
test: lint
	$(PY) -m pytest -q --durations=25

# While working: lint plus every test that starts no server and no Ray or DeepSpeed process
# (those carry the `integration` mark; tests/conftest.py refuses an unmarked one).
test-fast: lint
	$(PY) -m pytest -q -m "not integration" --durations=10

clean-venv:
	rm -rf $(VENV)
