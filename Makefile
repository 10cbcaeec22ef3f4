# Two commands do all the set-up on a fresh machine with Python 3.10+ and git:
#   make demo   annotate the bundled sample with the bundled default model
#   make test   run the test suite (everything but the `slow` marker; make test-slow runs the rest)
# CI (.ci/run) runs make lint, make typecheck and make test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-slow lint typecheck install clean screenshot

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	# The reference implementation used by the parity tests; its own pins (torch 2.0, transformers 4.33)
	# are ignored on purpose: its code runs unchanged on the current stack.
	$(BIN)/python -m pip install -q --no-deps open-flamingo==2.0.1
	touch $@

demo: install
	$(BIN)/flamingo-annotate demo

test: install
	$(BIN)/python -m pytest -q -m "not slow"

# The bundled model's evaluation floors, the full training recipe and the OpenFlamingo benchmark.
test-slow: install
	$(BIN)/python -m pytest -q -m slow

# docs/report.png, the README's picture of `flamingo-annotate report`: the demo's output in headless Chromium
# (Debian's package: apt-get install chromium).
screenshot: install
	test -d out/demo || $(BIN)/flamingo-annotate demo
	$(BIN)/python jobs/report_screenshot.py out/demo docs/report.png

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy

clean:
	rm -rf $(VENV) out
