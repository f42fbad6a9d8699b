# One-command setup: `make test` and `make demo` build .venv/ from scratch.
PYTHON ?= python3.10
# pyenv's python3.10 shim needs a selected version; harmless without pyenv.
export PYENV_VERSION ?= 3.10.13
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: venv test demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	# chainer and chainercv ship sdists whose setup.py imports pkg_resources,
	# so build them against the pinned setuptools, without isolation.
	$(PIP) setuptools wheel numpy
	$(PIP) --no-build-isolation -e '.[experiments,fast,test]'
	touch $@

test: venv
	$(BIN)/python -m pytest tests

bench: venv
	$(BIN)/python benchmarks/bench_sampler.py

clean:
	rm -rf $(VENV) .pytest_cache
