# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing. CPU machines take torch first, exactly as
# TORCH_SPEC says (a CPU build); GPU images bring their own torch and skip `make venv`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo ablation test test-fast lint format venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The method on the toy world (docs/ablation.md), on the embedded `toy` cluster (the
# `local` one: Ray started inside m2d, 2 CPU workers): toy stories, pre-training, then SFT
# from it twice - under the paper's v2 mask and under `isolated` (each scene sees only its
# own prompt and video) - each a Ray Train + DeepSpeed run logged to MLflow in
# runs/mlflow.db (`m2d dashboard --cluster toy`). Then the 50 held-out stories rendered
# from both SFT checkpoints, scored by the toy world's exact oracle and compared: v2's
# scenes agree on the background no prompt names far more often than isolated's.
DEMO_DATA := data/toy
DEMO := demo-$(shell date -u +%Y%m%d-%H%M%S)
DEMO_STEPS := --set recipe.steps=1000 --set fault_tolerance.checkpoint_every=500

demo: $(STAMP)
	test -f $(DEMO_DATA)/sft.jsonl || $(VENV)/bin/m2d data synth --world toy --out $(DEMO_DATA) --stories 400
	$(VENV)/bin/m2d launch --cluster toy --stage pretrain --name $(DEMO)-pretrain $(DEMO_STEPS)
	$(VENV)/bin/m2d launch --cluster toy --stage sft --from $(DEMO)-pretrain --name $(DEMO)-v2 $(DEMO_STEPS)
	$(VENV)/bin/m2d launch --cluster toy --stage sft --from $(DEMO)-pretrain --name $(DEMO)-isolated \
		$(DEMO_STEPS) --set recipe.mask_policy=isolated
	$(VENV)/bin/m2d runs --limit 3
	$(VENV)/bin/m2d sample-batch --cluster toy --checkpoint $(DEMO)-v2 --checkpoint $(DEMO)-isolated \
		--prompts $(DEMO_DATA)/eval.jsonl --out runs/samples/$(DEMO) --steps 25 --guidance 1 \
		--batch-size 8 \
		--eval --encoder evaluation.toy_oracle:oracle
	$(VENV)/bin/m2d eval --cluster toy --compare runs/samples/$(DEMO)
	@echo "one story, both checkpoints:" runs/samples/$(DEMO)/*/eval000/0/contact.png

# The paper's mask ablation on the toy world (docs/ablation.md): every policy, 2 seeds, plus
# the training-settings ablation under v2 (pre-training only, SFT only), a
# few hours on 2 cores; resumable (run it again after a stop).
ablation: $(STAMP)
	$(PY) benchmarks/mask_ablation.py

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
