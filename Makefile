# Two entry points: `make train` and `make test`. Both create .venv when missing and install the
# pinned stack (torch pinned to the CPU wheel so nothing pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
# `make train` runs the recipe data-parallel: TRAIN_PROCS processes (torchrun through vir.cli.launch, which ends on
# a failed worker's one-line error instead of torchrun's traceback; gloo on CPU), the cores split
# between them. On the 2-core machine two 1-thread processes train ~1.2-1.3x faster than one 2-thread one.
TRAIN_PROCS ?= 2
TRAIN_ARGS ?=  # Hydra overrides, e.g. make train TRAIN_ARGS="training.max_steps=4000"
# local_debug: the recipe's stages from the shipped bases (~4 minutes); local_debug_scratch: the bases too (~14)
EXPERIMENT ?= local_debug
TRAIN_THREADS ?= $(shell n=$$(( $$(nproc) / $(TRAIN_PROCS) )); [ $$n -ge 1 ] && echo $$n || echo 1)

.PHONY: install train test browser demo bench plan-check gpu-check interop-check clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -c constraints.txt -e ".[dev]" torch==$(TORCH_VERSION)
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	OMP_NUM_THREADS=$(TRAIN_THREADS) $(PY) -m vir.cli.launch --standalone --nproc_per_node=$(TRAIN_PROCS) \
		-m vir.cli.train experiment=$(EXPERIMENT) $(TRAIN_ARGS)

test: $(STAMP) browser
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo 'pytest collected no tests' >&2; exit 1; fi; exit $$rc

# The browser tests/test_app_browser.py drives: Debian's chromium, installed with apt when missing and possible
# (root); without one that test skips and says why.
browser:
	@sh scripts/ensure_browser.sh

# vir-demo on the newest finished run under runs/ (its training_complete.json), or DEMO_RUN; `make train` first
# only when there is none. http://DEMO_HOST:DEMO_PORT
DEMO_PORT ?= 7860
DEMO_HOST ?= 127.0.0.1
DEMO_RUN ?=
demo: $(STAMP)
	@run="$(DEMO_RUN)"; \
	if [ -z "$$run" ]; then \
		run=$$(ls -t runs/*/training_complete.json 2>/dev/null | head -n 1 | xargs -r dirname); fi; \
	if [ -z "$$run" ]; then \
		echo "make demo: no finished run under runs/: running make train first" >&2; \
		$(MAKE) train || exit $$?; run=runs/$(EXPERIMENT); fi; \
	echo "make demo: serving $$run"; \
	$(VENV)/bin/vir-demo "$$run" --port $(DEMO_PORT) --host $(DEMO_HOST)

# Step-time breakdown of the demo's sizes, then vir against transformers' Llava + Trainer (BENCH_STEPS timed steps
# per run, default 4; more steps, less noise; BENCH_REPEATS runs per side, the median reported, default 1):
# benchmarks/results/train_throughput.json.
bench: $(STAMP)
	$(PY) benchmarks/run_all.py
	$(PY) benchmarks/train_compare.py

# vir-plan's peak against a measured training step, on 30 small configurations (~4 minutes on 2 CPU cores):
# benchmarks/results/plan_check.json.
plan-check: $(STAMP)
	$(PY) benchmarks/plan_check.py

# QLoRA and bf16 LoRA steps of a random-init Llama-3-8B + CLIP-L/336 on one GPU: peak memory, tokens/s, MFU,
# vir-plan's estimate. The venv here holds a CPU torch: on a GPU machine point GPU_PYTHON at a Python with a
# CUDA torch, bitsandbytes and this package installed. GPU_CHECK_ARGS=--tiny runs tiny shapes on the CPU.
GPU_PYTHON ?= $(PY)
gpu-check: $(STAMP)
	$(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# The run read by the stacks users already run: LLaVA's own package (llava-torch 1.2.2.post1 at its pins) loads
# `vir-export --format llava` from a moved copy and builds a checkpoint vir imports; transformers 4.57.6 reads the
# default export. The virtualenvs are built once from PyPI under VIR_INTEROP_HOME (~/.cache/vir-interop; 6.5 GB
# with LLaVA's CUDA torch 2.0.1, ~10 minutes the first time); the checks then take about a minute on the run of
# `make train` (trained first when missing). Not part of `make test`. Prints one line per check; non-zero on a failure.
INTEROP_RUN ?= runs/local_debug
interop-check: $(STAMP)
	@test -f $(INTEROP_RUN)/training_complete.json || [ "$(INTEROP_RUN)" != runs/local_debug ] || $(MAKE) train
	$(PY) scripts/interop/check.py --run $(INTEROP_RUN)

clean:
	rm -rf $(VENV) .pytest_cache
