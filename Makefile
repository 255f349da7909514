# dicomhub developer targets.
PYTHON ?= python3
VENV   := .venv
PORT   ?= 8080

.PHONY: venv serve test lint bench

venv: $(VENV)/.installed

# Same stamp as scripts/test.sh: reinstall when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

serve: venv
	$(VENV)/bin/dicomhub serve --host 127.0.0.1 --port $(PORT)

test:
	bash scripts/test.sh

lint: venv
	$(VENV)/bin/ruff check dicomhub tests benchmarks

bench: venv
	bash benchmarks/run.sh $(BENCH_ARGS)
