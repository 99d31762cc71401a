# Everything runs in a local virtualenv that the first target builds from nothing but Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and the torchvision built for it (the training data transforms need torchvision); override to pick another pair
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow mutation clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/scorekit demo --output_dir outputs/scorekit-demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" -n 2

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow -n 2

# Mutation testing of the core modules, one module (or part of one) at a time so that a stopped run keeps what it
# finished; about an hour on 2 cores, so not in CI. Settings in pyproject.toml [tool.mutmut]; findings in TESTING.md.
MUTATION_SCOPES ?= \
	'diffusers_scorekit.sde.*' \
	'diffusers_scorekit.parametrization.*' \
	'diffusers_scorekit.losses.*' \
	'diffusers_scorekit.schedulers.*' \
	'diffusers_scorekit.likelihood.*' \
	'diffusers_scorekit.pipelines.score_sde.*_model_output*' \
	'diffusers_scorekit.pipelines.score_sde.*_add_classifier_gradient*' \
	'diffusers_scorekit.pipelines.score_sde.*null_class_label*' \
	'diffusers_scorekit.pipelines.score_sde.*inpaint*' \
	'diffusers_scorekit.metrics.x_gaussian_statistics*' \
	'diffusers_scorekit.metrics.x__psd_square_root*' \
	'diffusers_scorekit.metrics.x_frechet_distance*' \
	'diffusers_scorekit.metrics.x_kth_neighbour_radius*' \
	'diffusers_scorekit.metrics.x__ball_membership*' \
	'diffusers_scorekit.metrics.x_precision_recall*' \
	'diffusers_scorekit.metrics.x_knn_coverage*'

mutation: $(VENV)/.installed
	for scope in $(MUTATION_SCOPES); do OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 "$$scope" || exit 1; done
	$(PY) tools/mutation_report.py $(VENV)/bin/mutmut

clean:
	rm -rf $(VENV) outputs mutants
