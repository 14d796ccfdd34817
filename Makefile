# lungcad — every entry point a researcher needs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE ?= offline
export PYTHONHASHSEED := 0
export PYTHONUTF8 := 1
# idle OpenMP threads sleep: spinning ones slow 3D convolutions ~10x on a busy few-core machine
export OMP_WAIT_POLICY ?= PASSIVE

.DEFAULT_GOAL := help
.PHONY: help install demo reproduce-table3 learning-report test test-slow lint format bench bench-gpu clean-venv

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install the toolkit with pinned versions (constraints.txt)

demo: $(STAMP) ## CLAF (+ official FROC), GLANCE, M3Net briefly on CPU -> bundle -> lungcad analyze of a DICOM series
	$(PY) -m lungcad.demo --out demo_out

reproduce-table3: $(STAMP) ## GLANCE Table 3 for GLANCE + CLAF from LUNA16_ROOT / TIANCHI_ROOT; DATA=demo: synthetic stand-ins
ifeq ($(DATA),demo)
	@mkdir -p demo_out/table3
	cd demo_out/table3 \
	  && (test -d luna16 || ../../$(PY) -m common.cli synth luna16 --out luna16 --scans 20 --size small --subsets 5) \
	  && (test -d tianchi || ../../$(PY) -m common.cli synth tianchi --out tianchi --scans 20 --size small) \
	  && LUNA16_ROOT=luna16 TIANCHI_ROOT=tianchi ../../$(PY) -m common.cli table render glance_table3 --runs-dir runs --jobs 2 \
	       --extra-config lungseg:configs/demo/table3_glance_small.yaml \
	       --extra-config claf_luna16:configs/demo/claf_demo.yaml \
	       --extra-config mppn_luna16:configs/demo/mppn_demo.yaml
else
	$(PY) -m common.cli table render glance_table3
endif

MODEL ?= all
LEARNING_PARTS := $(if $(filter all,$(MODEL)),claf glance m3net pathology,$(MODEL))
learning-report: $(STAMP) ## train + score on phantoms, 95% intervals over patients -> docs/learning.md (slow; MODEL=claf|glance|m3net|pathology)
	@for m in $(LEARNING_PARTS); do \
	  case $$m in \
	    claf) module=lungdet.learning;; \
	    glance) module=lungseg.learning;; \
	    m3net|pathology) module="lungcls.learning --model $$m";; \
	    *) echo "unknown MODEL=$$m: choose claf, glance, m3net or pathology"; exit 2;; \
	  esac; \
	  echo "[learning-report] $$m"; \
	  $(PY) -m $$module --out learning_out/$$m --docs docs || exit 1; \
	done
	$(PY) -m common.experiments.learning_report --docs docs

test: $(STAMP) ## run the default test suite (CPU, a few minutes)
	$(PY) -m pytest -q -p no:cacheprovider -n auto --dist loadfile

test-slow: $(STAMP) ## the slow learning checks: the learning-report runs with assertions on their intervals
	$(PY) -m pytest -q -p no:cacheprovider -m slow -s

lint: $(STAMP) ## ruff lint + format check
	$(VENV)/bin/ruff check common lungdet lungseg lungcls lungcad tests bench
	$(VENV)/bin/ruff format --check common lungdet lungseg lungcls lungcad tests bench

format: $(STAMP) ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix common lungdet lungseg lungcls lungcad tests bench
	$(VENV)/bin/ruff format common lungdet lungseg lungcls lungcad tests bench

bench: $(STAMP) ## run every benchmark; prints ratios and writes bench/results.md
	$(PY) -m bench.run

bench-gpu: $(STAMP) ## on a CUDA machine: inference + training fp32 vs bf16 -> bench/results_gpu.md (~8 min)
	PYTHON=$(PY) bash bench/gpu.sh

clean-venv: ## remove the virtual environment
	rm -rf $(VENV)
