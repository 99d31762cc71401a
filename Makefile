# Everything runs in a local virtualenv that the first target builds from nothing but Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and the torchvision built for it (the training data transforms need torchvision); override to pick another pair
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow test-wheel test-lowest print-torch mutation clean

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


# Mutation testing of the core modules, one module (or part of one) at a time against its own test files, so that
# a stopped run keeps what it finished; about two hours from nothing on 2 cores (TESTING.md has the times per
# entry), so not in CI. Each entry is
# mutant-name-pattern=test files (mutmut skips decorated methods and properties: inpainting's replacement step is
# in _sample). Settings in pyproject.toml [tool.mutmut]; the last run's findings in TESTING.md.
MUTATION_SCOPES ?= \
	'diffusers_scorekit.sde.*=test_sde.py,test_exact_gaps.py,test_losses.py' \
	'diffusers_scorekit.parametrization.*=test_sde.py,test_exact_gaps.py,test_schedulers.py' \
	'diffusers_scorekit.pipelines.score_sde.*_model_output*=test_pipeline.py,test_exact_gaps.py,test_pipeline_replay.py' \
	'diffusers_scorekit.pipelines.score_sde.*_add_classifier_gradient*=test_pipeline.py,test_exact_gaps.py,test_pipeline_replay.py' \
	'diffusers_scorekit.pipelines.score_sde.*Pipeline?_sample*=test_pipeline.py,test_exact_gaps.py,test_pipeline_replay.py' \
	'diffusers_scorekit.metrics.x_gaussian_statistics*=test_metrics.py,test_exact_gaps.py' \
	'diffusers_scorekit.metrics.x__psd_square_root*=test_metrics.py,test_exact_gaps.py' \
	'diffusers_scorekit.metrics.x_frechet_distance*=test_metrics.py,test_exact_gaps.py' \
	'diffusers_scorekit.metrics.x_kth_neighbour_radius*=test_metrics.py,test_exact_gaps.py' \
	'diffusers_scorekit.metrics.x__ball_membership*=test_metrics.py,test_exact_gaps.py' \
	'diffusers_scorekit.metrics.x_precision_recall*=test_metrics.py,test_exact_gaps.py' \
	'diffusers_scorekit.metrics.x_knn_coverage*=test_metrics.py,test_exact_gaps.py' \
	'diffusers_scorekit.losses.*=test_losses.py,test_exact_gaps.py,test_losses_exact.py' \
	'diffusers_scorekit.schedulers.sde_updates.*=test_schedulers.py,test_oracle_sampling.py,test_exact_gaps.py,test_scheduler_conventions.py' \
	'diffusers_scorekit.schedulers.linear_combination.*=test_schedulers.py,test_oracle_sampling.py,test_exact_gaps.py,test_scheduler_conventions.py' \
	'diffusers_scorekit.schedulers.scheduling_*=test_schedulers.py,test_oracle_sampling.py,test_exact_gaps.py,test_scheduler_conventions.py' \
	'diffusers_scorekit.likelihood.*=test_likelihood.py,test_pipeline_likelihood.py,test_likelihood_exact.py' \
	'diffusers_scorekit.training.checkpoints.*=test_training_checkpoints.py,test_training.py,test_exact_gaps.py' \
	'diffusers_scorekit.training.step.x_prepare_training*=test_exact_gaps.py,test_training.py'

mutation: $(VENV)/.installed
	for entry in $(MUTATION_SCOPES); do \
		MUTATION_TEST_FILES="$${entry#*=}" OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 "$${entry%%=*}" || exit 1; \
	done
	$(PY) tools/mutation_report.py $(VENV)/bin/mutmut

clean:
	rm -rf $(VENV) $(LOWEST_VENV) outputs mutants
