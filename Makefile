PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean-venv

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU torch wheel first, so nothing below resolves to a CUDA build.
	$(BIN)/pip install -q -c constraints-cpu.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints-cpu.txt -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m workers.demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not gpu" tests

bench: $(BIN)/.installed
	$(BIN)/python bench/engine_bench.py

clean-venv:
	rm -rf $(VENV)
