# Two commands: `make demo` (the whole pipeline on generated data) and `make test` (lint, types, every test);
# `make test-fast` leaves out the slow end-to-end and fault tests; `make bench` measures.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/demo.yaml
ARGS   ?=
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test test-fast lint stages ensemble doctor submit bench clean-demo ablate ablate-quick

# The venv is (re)built only when requirements.txt or constraints.txt change; the stamp makes it idempotent.
# constraints.txt holds the versions the tests last passed with (torch left to the machine).
$(VENV)/.installed: requirements.txt constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	@touch $@

venv: $(VENV)/.installed

demo: venv
	@$(PY) -m lib.demo --config $(CONFIG) $(ARGS)
	@$(MAKE) --no-print-directory stages CONFIG=$(CONFIG) ARGS="$(ARGS)"

# The stages alone, on any config (e.g. make stages CONFIG=configs/fathomnet2025.yaml). With several GPUs visible, 01 and 03
# spread their folds over them, one process per GPU (train.multi_gpu; README "Several GPUs").
stages: venv
	@$(PY) 00_prepare_data.py --config $(CONFIG) $(ARGS)
	@$(PY) 01_train_folds.py  --config $(CONFIG) $(ARGS)
	@$(PY) 02_pseudo_label.py --config $(CONFIG) $(ARGS)
	@$(PY) 03_retrain.py      --config $(CONFIG) $(ARGS)
	@$(PY) 04_infer_submit.py --config $(CONFIG) $(ARGS)
	@$(PY) knn_baseline.py    --config $(CONFIG) $(ARGS)
	@$(PY) -m lib.report      --config $(CONFIG) $(ARGS)

# An ensemble config's member experiments (ensemble.recipes: the stages each member needs), then its own 00 and 04
# (e.g. make ensemble CONFIG=configs/demo_ensemble.yaml; ARGS=--dry-run says what would run).
ensemble: venv
	@$(PY) scripts/train_ensemble.py --config $(CONFIG) $(ARGS)

# Upload output/<exp>/04_submit/submission.csv with the kaggle CLI after checking it again (lib/kaggle/submit.py);
# ARGS=--dry-run prints the command, ARGS="--competition SLUG --message TEXT" as needed.
submit: venv
	@$(PY) -m lib.kaggle.submit --config $(CONFIG) $(ARGS)

# What this machine and CONFIG give the pipeline (python, torch, CUDA, GPUs, precision, faiss, cores, disk, data paths), in seconds.
# Exit 1 on a fatal problem (a missing path; train.device cuda without a GPU this torch can run on); ARGS=--time also
# measures the config's training and eval steps here and prints each stage's expected wall time against 12 h.
doctor: venv
	@$(PY) -m lib.doctor --config $(CONFIG) $(ARGS)

# ruff (pyflakes, pycodestyle, bugbear, security, import order) and mypy on every Python file: lib/, the stage scripts,
# scripts/, benchmarks/, tests/ and the notebook's jupytext pair; settings in pyproject.toml.
lint: venv
	$(PY) -m ruff check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q

# Everything but the tests marked slow (end-to-end stage runs, real kills): under 2 minutes.
test-fast: venv
	$(PY) -m pytest -q -m "not slow"

# Every benchmark (benchmarks/run_all.py) into benchmarks/results.md; `make bench ARGS=--quick` for smaller sizes.
bench: venv
	$(PY) benchmarks/run_all.py $(ARGS)

clean-demo:
	rm -rf output/demo input/demo

# The ablation grid (scripts/ablate.py): output/<exp>/report/ablation.md (ablation_quick.md for the small grid).
ablate: venv
	$(PY) scripts/ablate.py --config $(CONFIG)

ablate-quick: venv
	$(PY) scripts/ablate.py --config $(CONFIG) --quick
