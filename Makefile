# Everything runs in a local virtualenv that the first target builds from nothing but Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# a CPU build of torch, where this machine keeps one, saves downloading a CUDA build of several GB
TORCH_WHEEL := $(firstword $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl))
TORCH := $(if $(TORCH_WHEEL),$(TORCH_WHEEL),torch>=2.1)

.PHONY: demo test test-slow clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/scorekit demo --output_dir outputs/scorekit-demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" -n 2

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow -n 2

clean:
	rm -rf $(VENV) outputs
