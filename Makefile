# Front door of the pipeline: `make demo` runs everything on the embedded default,
# `make test` runs the tests; both set up .venv first. `make help` lists targets.

PYTHON    ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
DATA      ?= fashion-mnist
BACKBONE  ?= efficientnet_lite0
ARTIFACTS ?= artifacts
TF        ?= cpu
ARGS      ?=
# Fashion-MNIST's images are 28 px: its demo runs at 112 px (CONFIG=benchmarks/fashion_mnist_224.toml: native 224)
CONFIG    ?= $(if $(filter fashion-mnist,$(DATA)),benchmarks/fashion_mnist_112.toml)
SIZES     ?= 50000 200000
ENGINE    ?= local
EXTRAS    ?=
BACKBONES ?= efficientnet_lite0 efficientnet_lite1 efficientnet_lite2
FINETUNE  ?=
IMAGES    ?=
METHOD    ?=
FORMAT    ?= keras
# a user's folder: `make demo` forecasts the full fine-tune first and runs it only within this budget
BUDGET    ?= 1h
EMBEDDED  := fashion-mnist elpv
# `make test`: one pytest worker a core, at most this many (each holds a TensorFlow of its own)
TEST_WORKERS ?= 4

RUN    := $(BIN)/python -m pipeline
space  := $(subst ,, )
# ARGS go only to the stage named on the command line (`make finetune ARGS=...`), not to its prerequisites.
STAGE_ARGS = $(if $(filter $@,$(MAKECMDGOALS)),$(ARGS))
CFG    := $(if $(CONFIG),--config $(CONFIG))
COMMON := --dataset $(DATA) --artifacts $(ARTIFACTS) $(CFG)
STAMP  := $(VENV)/.installed-$(TF)$(if $(EXTRAS),-$(subst $(space),-,$(EXTRAS)))

.DEFAULT_GOAL := help
.PHONY: help setup data extract svm finetune forecast budgeted-finetune report demo curve sweep predict export test test-fast lint docs bench clean

help: ## list targets and variables
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: DATA=$(DATA) BACKBONE=$(BACKBONE) ARTIFACTS=$(ARTIFACTS) TF=$(TF) (cpu|gpu) CONFIG=run.toml ARGS=..."
	@echo "             BACKBONES=\"$(BACKBONES)\" FINETUNE=1 (sweep)  IMAGES=DIR METHOD=... (predict)  FORMAT=... (export)"
	@echo "             BUDGET=$(BUDGET) (demo on your folder: the full fine-tune runs only if forecast within it)"

setup: $(STAMP) ## create .venv and install the project (editable) with test extras

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$(TF),test$(foreach e,$(EXTRAS),,$(e))]"
	touch $@

data: setup ## prepare DATA under data/ (embedded: fashion-mnist, elpv) or check a user's folder
ifeq ($(DATA),elpv)
	@$(BIN)/python -c "import elpv_dataset" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[$(TF),test,elpv]"
endif
	$(RUN) data --dataset $(DATA) $(CFG) $(STAGE_ARGS)

extract: data ## frozen BACKBONE -> HDF5 embedding cache (cached, resumable)
	$(RUN) extract $(COMMON) --backbone $(BACKBONE) --engine $(ENGINE) $(STAGE_ARGS)

svm: extract ## tuned, timed sklearn heads on the cached embeddings (+ metadata when present)
	$(RUN) heads $(COMMON) --backbone $(BACKBONE) $(STAGE_ARGS)

finetune: data ## fine-tune BACKBONE end to end (two phases, timed): the baseline the heads are compared to
	$(RUN) finetune $(COMMON) --backbone $(BACKBONE) $(STAGE_ARGS)

report: setup ## accuracy-vs-time report from whatever results exist
	$(RUN) report $(COMMON) $(STAGE_ARGS)

predict: setup ## apply the verdict's method (METHOD=ridge@all, finetune, ... for another) to new images: IMAGES=DIR
	$(RUN) predict $(COMMON) --backbone $(BACKBONE) $(if $(IMAGES),--images $(IMAGES)) $(if $(METHOD),--method $(METHOD)) $(STAGE_ARGS)

export: setup ## the verdict's method (or METHOD=...) as one model: FORMAT=keras|saved_model|onnx|litert
	$(RUN) export $(COMMON) --backbone $(BACKBONE) --format $(FORMAT) $(if $(METHOD),--method $(METHOD)) $(STAGE_ARGS)

demo: svm $(if $(filter $(EMBEDDED),$(DATA)),finetune,budgeted-finetune) ## set up, prepare the default data and run the whole comparison (a user's folder: the fine-tune only within BUDGET)
	$(RUN) report $(COMMON)

forecast: extract ## forecast the full fine-tune (accuracy, cost, where it beats the heads) from a few small ones
	$(RUN) forecast $(COMMON) --backbone $(BACKBONE) $(STAGE_ARGS)
	$(RUN) report $(COMMON)

budgeted-finetune: extract
	$(RUN) forecast $(COMMON) --backbone $(BACKBONE) --finetune-budget $(BUDGET) $(STAGE_ARGS)

curve: extract ## learning curve: heads (and the fine-tune at the smallest and largest size) on subsets of train
	$(RUN) curve $(COMMON) --backbone $(BACKBONE) $(STAGE_ARGS)
	$(RUN) report $(COMMON)

sweep: data ## extract + svm (+ finetune with FINETUNE=1) for each of BACKBONES="a b", then one report of all
	@set -e; for b in $(BACKBONES); do \
	  echo "== $$b"; \
	  $(RUN) extract $(COMMON) --backbone $$b; \
	  $(RUN) heads $(COMMON) --backbone $$b; \
	  if [ -n "$(FINETUNE)" ]; then $(RUN) finetune $(COMMON) --backbone $$b; fi; \
	done
	$(RUN) report $(COMMON)

test: setup ## run the test suite (tiny backbones and generated images; one pytest worker a core, up to TEST_WORKERS)
	$(BIN)/python -m pytest -q -n auto --maxprocesses $(TEST_WORKERS)

test-fast: setup ## the edit loop: every test that trains no model, starts no Ray and runs no subprocess
	$(BIN)/python -m pytest -q -m "not slow" -n auto --maxprocesses $(TEST_WORKERS)

bench: data ## extraction ratios (ENGINE=ray: ray vs local too), fine-tune input pipeline ÷ in-memory steps, heads-vs-finetune cost, heads at scale, exported runtimes
	$(BIN)/python benchmarks/extract_throughput.py --backbone $(BACKBONE) --artifacts $(ARTIFACTS) --source data/$(DATA)/train --engine $(ENGINE)
	$(BIN)/python benchmarks/finetune_throughput.py --dataset $(DATA) --artifacts $(ARTIFACTS) $(CFG)
	$(BIN)/python benchmarks/heads_vs_finetune.py --dataset $(DATA) --artifacts $(ARTIFACTS) || true
	$(BIN)/python benchmarks/heads_scale.py --sizes $(SIZES)
	$(BIN)/python benchmarks/export_runtimes.py --dataset $(DATA) --artifacts $(ARTIFACTS) || true

lint: setup ## ruff
	$(BIN)/ruff check pipeline tests benchmarks

docs: setup ## build the documentation site into site/ (MkDocs + Material, the `docs` extra; --strict)
	@$(BIN)/python -c "import mkdocs, material" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[$(TF),test,docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

clean: ## remove generated artifacts (keeps data/ and .venv)
	rm -rf $(ARTIFACTS)/features $(ARTIFACTS)/heads $(ARTIFACTS)/models $(ARTIFACTS)/results $(ARTIFACTS)/reports
