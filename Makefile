# Everything runs in a local virtualenv that the first target builds from nothing but Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and the torchvision built for it (the training data transforms need torchvision); override to pick another pair
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow test-wheel test-lowest print-torch clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,train]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/scorekit demo --output_dir outputs/scorekit-demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" -n 2

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow -n 2

# the lowest versions pyproject.toml declares, and the transformers / tokenizers of their time, in their own venv
LOWEST ?= diffusers==0.30.0 huggingface-hub==0.23.2 accelerate==0.30.0 datasets==2.19.0 transformers==4.41.2 tokenizers==0.19.1
LOWEST_VENV ?= .venv-lowest

$(LOWEST_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(LOWEST_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev,train]" $(LOWEST)
	touch $@

test-lowest: $(LOWEST_VENV)/.installed
	$(LOWEST_VENV)/bin/python -m pytest -q -m "not slow" -n 2

# build the wheel, install it in a fresh venv and train, card, reload and sample from it (.ci/wheel_smoke.sh)
test-wheel:
	PYTHON=$(PYTHON) TORCH="$(TORCH)" .ci/wheel_smoke.sh

print-torch:
	@echo $(TORCH)

clean:
	rm -rf $(VENV) $(LOWEST_VENV) outputs
