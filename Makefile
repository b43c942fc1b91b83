# One virtual environment in .venv, created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench lint docs clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[test,examples]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/demo.py

test: install
	$(PY) -m pytest -q -n 2

bench: install
	$(PY) benchmarks/run.py

docs: install
	$(PY) -m pip install --quiet -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: install
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check optaxclip tests examples benchmarks
	$(VENV)/bin/ruff format --check optaxclip tests examples benchmarks

clean:
	rm -rf $(VENV) build dist site *.egg-info
