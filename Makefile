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
# a stopped run keeps what it finished; not in CI (TESTING.md has the time per entry and the last run's findings).
# Each entry is patterns=test files: comma-separated mutant-name patterns (fnmatch; `x[!_]*` is every method of a
# module's classes) and the test files their mutants run. mutmut skips decorated methods and properties
# (inpainting's replacement step is in _sample). Settings in pyproject.toml [tool.mutmut].
SK := diffusers_scorekit
SCHEDULER_TESTS := test_schedulers.py,test_exact_gaps.py,test_scheduler_conventions.py,test_scheduler_config.py
MUTATION_SCOPES ?= \
	'$(SK).sde.*=test_sde.py,test_exact_gaps.py,test_losses.py' \
	'$(SK).parametrization.*=test_sde.py,test_exact_gaps.py,test_schedulers.py' \
	'$(SK).pipelines.score_sde.*_model_output*,$(SK).pipelines.score_sde.*_add_classifier_gradient*,$(SK).pipelines.score_sde.*Pipeline?_sample*=test_pipeline.py,test_exact_gaps.py,test_pipeline_replay.py' \
	'$(SK).metrics.x_gaussian_statistics*,$(SK).metrics.x__psd_square_root*,$(SK).metrics.x_frechet_distance*,$(SK).metrics.x_kth_neighbour_radius*,$(SK).metrics.x__ball_membership*,$(SK).metrics.x_precision_recall*,$(SK).metrics.x_knn_coverage*=test_metrics.py,test_exact_gaps.py' \
	'$(SK).losses.*=test_losses.py,test_exact_gaps.py,test_losses_exact.py' \
	'$(SK).schedulers.sde_updates.*,$(SK).schedulers.linear_combination.*=$(SCHEDULER_TESTS)' \
	'$(SK).schedulers.scheduling_utils.x_validate_config*,$(SK).schedulers.scheduling_utils.x__check_types*,$(SK).schedulers.scheduling_utils.x__is_*=test_scheduler_config.py' \
	'$(SK).schedulers.scheduling_utils.x__source_class*,$(SK).schedulers.scheduling_utils.x__translate*,$(SK).schedulers.scheduling_utils.x_translate_config*,$(SK).schedulers.scheduling_utils.x__diffusers_init_keys*=test_scheduler_config.py,test_scheduler_conventions.py,test_schedulers.py' \
	'$(SK).schedulers.scheduling_utils.x[!_]*,$(SK).schedulers.scheduling_utils.x_level_times*,$(SK).schedulers.scheduling_[!u]*=$(SCHEDULER_TESTS)' \
	'$(SK).likelihood.*,$(SK).ode_solver.*=test_likelihood.py,test_pipeline_likelihood.py,test_likelihood_exact.py,test_ode_solver.py' \
	'$(SK).training.checkpoints.*=test_training_checkpoints.py,test_training.py,test_exact_gaps.py' \
	'$(SK).training.step.x_build_ema*=test_exact_gaps.py,test_training_checkpoints.py'

mutation: $(VENV)/.installed
	set -f; for entry in $(MUTATION_SCOPES); do \
		patterns=$$(echo "$${entry%%=*}" | tr , ' '); start=$$(date +%s); \
		MUTATION_TEST_FILES="$${entry#*=}" OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 $$patterns || exit 1; \
		echo "mutation scope took $$(( $$(date +%s) - start )) s: $$patterns" >> mutants/scope_times.txt; \
	done
	$(PY) tools/mutation_report.py $(VENV)/bin/mutmut

clean:
	rm -rf $(VENV) $(LOWEST_VENV) outputs mutants
