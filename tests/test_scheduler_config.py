"""Every rule of a scheduler config, at its boundary: the last value allowed passes, the first value past it
raises the exact message (field, value, what is allowed). ``validate_config`` checks only the fields a config
has, so each rule is tried on a config holding that field alone (plus what the rule compares it with)."""

import math
import re

import numpy as np
import pytest
import torch

from diffusers_scorekit.schedulers import (
    AnnealedLangevinScheduler,
    PredictorCorrectorScheduler,
    ProbabilityFlowODEScheduler,
)
from diffusers_scorekit.schedulers.scheduling_utils import (
    BETA_SCHEDULES,
    TIME_SPACINGS,
    validate_config,
)

ALL_SDES = ("ve", "vp", "subvp")


def rejects(config, message, error=ValueError, supported=ALL_SDES):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        validate_config(config, supported)


# the last allowed values of each rule: every one passes
ALLOWED = [
    {},
    {"sde_type": "subvp"},
    {"sigma_min": 1e-300},
    {"sigma_min": 0.5, "sigma_max": 0.5000001},
    {"sigma_max": 1e-3},  # no sigma_min to compare with
    {"sigma_min": 2.0},  # no sigma_max to compare with
    {"beta_min": 0},
    {"beta_min": 0.0, "beta_max": 1e-12},
    {"beta_max": 0.0},
    {"beta_schedule": None},
    *({"beta_schedule": name} for name in BETA_SCHEDULES),
    {"num_train_timesteps": 2},
    {"prediction_type": "v_prediction"},
    {"timestep_type": "log_sigma"},
    {"sampling_eps": 0},
    {"sampling_eps": 0.999},
    {"sampling_eps": None, "sde_type": "vp"},
    {"sampling_eps": 0.0, "sde_type": "vp", "beta_schedule": "linear"},  # discrete: sigma(0) > 0
    {"sampling_eps": 0.0, "sde_type": "subvp", "trained_betas": [0.1, 0.2]},
    *({"time_spacing": name} for name in TIME_SPACINGS),
    {"snr": 1e-12, "step_lr": 1e-12, "edm_rho": 1e-12},
    {"noise_scale": 0.0},
    {"num_corrector_steps": 1, "num_annealed_steps": 1},
    # the types each field accepts
    {"sigma_min": np.float32(0.1), "sigma_max": np.int64(3), "snr": 1},
    {"num_train_timesteps": np.int32(10)},
    {"denoise_final": np.bool_(False), "predictor": "none", "beta_schedule": None},
    {"trained_betas": (0.5,)},
    {"trained_betas": np.array([1e-6, 0.999999])},
    {"trained_betas": torch.tensor([0.25, 0.5])},
]


@pytest.mark.parametrize("config", ALLOWED, ids=repr)
def test_the_last_allowed_value_of_each_rule_passes(config):
    validate_config(config, ALL_SDES)


def test_an_absent_sde_type_is_ve():
    validate_config({}, ("ve",))
    rejects({}, "sde_type='ve' is invalid: choose one of ('vp', 'subvp').", supported=("vp", "subvp"))
    rejects({"sde_type": "vp"}, "sde_type='vp' is invalid: choose one of ('ve',).", supported=("ve",))


@pytest.mark.parametrize(
    "config, message",
    [
        ({"sde_type": "edm"}, "sde_type='edm' is invalid: choose one of ('ve', 'vp', 'subvp')."),
        ({"sigma_min": 0.0}, "sigma_min=0.0 is invalid: it must be positive."),
        ({"sigma_min": -1e-300}, "sigma_min=-1e-300 is invalid: it must be positive."),
        ({"sigma_min": 0.5, "sigma_max": 0.5}, "sigma_max=0.5 is invalid: it must be greater than sigma_min=0.5."),
        ({"beta_min": -1e-12}, "beta_min=-1e-12 is invalid: it must be >= 0."),
        ({"beta_min": 0.1, "beta_max": 0.1}, "beta_max=0.1 is invalid: it must be greater than beta_min=0.1."),
        ({"beta_schedule": "cosine"}, "beta_schedule='cosine' is invalid: choose None (continuous linear beta) or "
         "one of ('linear', 'scaled_linear', 'squaredcos_cap_v2', 'sigmoid')."),
        ({"num_train_timesteps": 1}, "num_train_timesteps=1 is invalid: it must be an integer >= 2."),
        ({"prediction_type": "noise"}, "prediction_type='noise' is invalid: choose one of "
         "('epsilon', 'score', 'sample', 'v_prediction')."),
        ({"timestep_type": "log_snr"}, "timestep_type='log_snr' is invalid: choose one of "
         "('discrete', 'continuous', 'sigma', 'log_sigma')."),
        ({"sampling_eps": 1.0}, "sampling_eps=1.0 is invalid: it must lie in [0, 1)."),
        ({"sampling_eps": -1e-12}, "sampling_eps=-1e-12 is invalid: it must lie in [0, 1)."),
        ({"sampling_eps": 0.0, "sde_type": "vp"},
         "sampling_eps=0.0 is invalid: a continuous VP/sub-VP SDE has sigma(0) = 0, so it must be > 0."),
        ({"sampling_eps": 0, "sde_type": "subvp", "beta_schedule": None, "trained_betas": None},
         "sampling_eps=0 is invalid: a continuous VP/sub-VP SDE has sigma(0) = 0, so it must be > 0."),
        ({"time_spacing": "karras"}, "time_spacing='karras' is invalid: choose one of ('uniform', 'log_snr', 'edm')."),
        ({"snr": 0.0}, "snr=0.0 is invalid: it must be positive."),
        ({"step_lr": -1e-12}, "step_lr=-1e-12 is invalid: it must be positive."),
        ({"edm_rho": 0}, "edm_rho=0 is invalid: it must be positive."),
        ({"noise_scale": -1e-12}, "noise_scale=-1e-12 is invalid: it must be >= 0."),
        ({"num_corrector_steps": 0}, "num_corrector_steps=0 is invalid: it must be an integer >= 1."),
        ({"num_annealed_steps": 0}, "num_annealed_steps=0 is invalid: it must be an integer >= 1."),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_the_first_value_past_each_rule_raises_naming_it(config, message):
    rejects(config, message)


@pytest.mark.parametrize(
    "config, error, message",
    [
        ({"sigma_max": "50"}, TypeError, "sigma_max='50' is invalid: it must be a number, not str."),
        ({"beta_start": True}, TypeError, "beta_start=True is invalid: it must be a number, not bool."),
        ({"noise_scale": np.bool_(True)}, TypeError, "noise_scale=np.True_ is invalid: it must be a number, not bool."),
        ({"edm_rho": math.inf}, ValueError, "edm_rho=inf is invalid: it must be a finite number."),
        ({"beta_end": -math.inf}, ValueError, "beta_end=-inf is invalid: it must be a finite number."),
        ({"step_lr": math.nan}, ValueError, "step_lr=nan is invalid: it must be a finite number."),
        ({"num_train_timesteps": 10.0}, TypeError, "num_train_timesteps=10.0 is invalid: it must be an integer."),
        ({"num_corrector_steps": True}, TypeError, "num_corrector_steps=True is invalid: it must be an integer."),
        ({"num_annealed_steps": None}, TypeError, "num_annealed_steps=None is invalid: it must be an integer."),
        ({"time_spacing": 1}, TypeError, "time_spacing=1 is invalid: it must be a string."),
        ({"solver": b"euler"}, TypeError, "solver=b'euler' is invalid: it must be a string."),
        ({"denoise_final": 1}, TypeError, "denoise_final=1 is invalid: it must be true or false."),
        ({"denoise_final": None}, TypeError, "denoise_final=None is invalid: it must be true or false."),
        ({"trained_betas": [0.5, 1.0]}, TypeError,
         "trained_betas=[0.5, 1.0] is invalid: it must be a list of numbers in (0, 1)."),
        ({"trained_betas": [0.0, 0.5]}, TypeError,
         "trained_betas=[0.0, 0.5] is invalid: it must be a list of numbers in (0, 1)."),
        ({"trained_betas": [0.5, "0.5"]}, TypeError,
         "trained_betas=[0.5, '0.5'] is invalid: it must be a list of numbers in (0, 1)."),
        ({"trained_betas": "0.5"}, TypeError, "trained_betas='0.5' is invalid: it must be a list of numbers in (0, 1)."),
        ({"trained_betas": [True]}, TypeError, "trained_betas=[True] is invalid: it must be a list of numbers in (0, 1)."),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_value_of_the_wrong_type_raises_naming_it(config, error, message):
    rejects(config, message, error)


def test_types_are_checked_before_values_and_fields_in_order():
    # a bad type anywhere is reported before a bad value, and the first bad field of each kind is named
    rejects({"sde_type": "edm", "snr": "1"}, "snr='1' is invalid: it must be a number, not str.", TypeError)
    rejects({"sigma_min": "1", "num_train_timesteps": 1.5},
            "sigma_min='1' is invalid: it must be a number, not str.", TypeError)
    rejects({"num_train_timesteps": 1.5, "prediction_type": 3},
            "num_train_timesteps=1.5 is invalid: it must be an integer.", TypeError)
    rejects({"prediction_type": 3, "denoise_final": 0}, "prediction_type=3 is invalid: it must be a string.", TypeError)
    rejects({"denoise_final": 0, "trained_betas": [2.0]},
            "denoise_final=0 is invalid: it must be true or false.", TypeError)
    rejects({"sigma_min": -1.0, "beta_min": -1.0}, "sigma_min=-1.0 is invalid: it must be positive.")
    rejects({"snr": 0.0, "step_lr": 0.0}, "snr=0.0 is invalid: it must be positive.")
    rejects({"num_corrector_steps": 0, "num_annealed_steps": 0},
            "num_corrector_steps=0 is invalid: it must be an integer >= 1.")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PredictorCorrectorScheduler(sde_type="vp", beta_max=0.1),
         "beta_max=0.1 is invalid: it must be greater than beta_min=0.1."),
        (lambda: ProbabilityFlowODEScheduler(sampling_eps=0.0),
         "sampling_eps=0.0 is invalid: a continuous VP/sub-VP SDE has sigma(0) = 0, so it must be > 0."),
        (lambda: AnnealedLangevinScheduler(num_annealed_steps=0),
         "num_annealed_steps=0 is invalid: it must be an integer >= 1."),
        (lambda: PredictorCorrectorScheduler(sde_type="ve", sigma_min=1.0, sigma_max=1.0),
         "sigma_max=1.0 is invalid: it must be greater than sigma_min=1.0."),
    ],
)
def test_every_scheduler_checks_its_config_when_built(make, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        make()


def test_annealed_langevin_has_no_sde_type_and_runs_ve():
    scheduler = AnnealedLangevinScheduler()
    assert "sde_type" not in scheduler.config and scheduler.sde_type == "ve"
    # the discrete VP schedule allows t = 0 exactly: its sigma(0) is that of beta_1
    ProbabilityFlowODEScheduler(sampling_eps=0.0, beta_schedule="linear").set_timesteps(3)
