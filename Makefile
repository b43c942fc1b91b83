# One virtual environment in .venv, created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-min test-latest bench lint docs docs-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[test,examples]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/demo.py

test: install
	$(PY) -m pytest -q -n 2

# The suite again in .venv-min, on the lowest Python the package claims, with
# every runtime and test/examples dependency pinned to its lower bound in
# pyproject.toml (.ci/min_requirements.py reads the bounds from there).
PYTHON_MIN ?= python3.11
VENV_MIN := .venv-min
PY_MIN := $(VENV_MIN)/bin/python

$(VENV_MIN)/.installed: pyproject.toml .ci/min_requirements.py
	rm -rf $(VENV_MIN)
	$(PYTHON_MIN) -m venv $(VENV_MIN)
	$(PY_MIN) .ci/min_requirements.py test examples > $(VENV_MIN)/constraints.txt
	$(PY_MIN) -m pip install --quiet -c $(VENV_MIN)/constraints.txt -e ".[test,examples]"
	touch $@

test-min: $(VENV_MIN)/.installed
	$(PY_MIN) .ci/min_requirements.py --check test examples
	$(PY_MIN) -m pytest -q -n 2

# The suite again in .venv-latest, on the newest Python the machine has, with
# the newest release of jax, jaxlib, optax, chex, numpy and the test/examples
# libraries that resolves there. The upgrade runs on every call (eagerly, so a
# release cached or installed earlier is never kept), and the first line of the
# run names the versions tested. Where pyenv manages the interpreters, its 3.13
# is found even when it is not the active version.
PYTHON_LATEST ?= $(or $(shell p=$$(pyenv prefix 3.13 2>/dev/null) && echo "$$p/bin/python3.13"),python3.13)
VENV_LATEST := .venv-latest
PY_LATEST := $(VENV_LATEST)/bin/python
LATEST_PACKAGES := jax jaxlib optax chex numpy flax orbax-checkpoint equinox

$(VENV_LATEST)/.created:
	rm -rf $(VENV_LATEST)
	$(PYTHON_LATEST) -m venv $(VENV_LATEST)
	touch $@

test-latest: $(VENV_LATEST)/.created
	$(PY_LATEST) -m pip install --quiet --upgrade --upgrade-strategy eager \
		-e ".[test,examples]" $(LATEST_PACKAGES)
	@$(PY_LATEST) -c 'import sys; from importlib.metadata import version; \
		print("test-latest versions: python " + sys.version.split()[0], \
		*(f"{n} {version(n)}" for n in sys.argv[1:]), sep=", ")' $(LATEST_PACKAGES)
	$(PY_LATEST) -m pytest -q -n 2

bench: install
	$(PY) benchmarks/run.py

docs: install
	$(PY) -m pip install --quiet -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Builds the site, then opens its API reference in headless Chromium and checks
# the rendered page (.ci/docs_check.py says what). Installs Chromium and its
# driver from the Debian archive when they are missing (needs root).
docs-check: docs
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "docs-check needs chromium and chromedriver on PATH; install them with your package manager" >&2; exit 1; }; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }
	$(PY) .ci/docs_check.py site

lint: install
	$(PY) -m pip install --quiet ruff pyright
	$(VENV)/bin/ruff check optaxclip tests examples benchmarks
	$(VENV)/bin/ruff format --check optaxclip tests examples benchmarks
	$(VENV)/bin/pyright

clean:
	rm -rf $(VENV) $(VENV_MIN) $(VENV_LATEST) build dist site *.egg-info
