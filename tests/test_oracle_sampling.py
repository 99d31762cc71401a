"""Every scheduler, sampling from the exact score of a Gaussian mixture, lands on the mixture.

Thresholds sit well inside what a correct sampler reaches here (see ``benchmarks/bench_oracle_samplers.py``
for the full picture) and well outside what a subtly wrong one gives: ``test_a_subtly_wrong_sampler_fails``
breaks one factor at a time and checks that these same checks catch it.
"""

import math

import pytest
import torch

from diffusers_scorekit import (
    AnnealedLangevinScheduler,
    PredictorCorrectorScheduler,
    ProbabilityFlowODEScheduler,
    VEEulerMaruyamaScheduler,
    VPEulerMaruyamaScheduler,
)
from diffusers_scorekit.schedulers import (
    scheduling_annealed_langevin,
    scheduling_probability_flow_ode,
    scheduling_utils,
    sde_updates,
)
from oracle import GaussianMixture, exact_score_model, run_loop

MIXTURES = {"ring": (GaussianMixture.ring(), 8000), "64d": (GaussianMixture.high_dimensional(), 2000)}

# (scheduler, num_inference_steps); prediction and timestep types vary across cases on purpose
SAMPLERS = {
    "ve_euler_maruyama": (lambda: VEEulerMaruyamaScheduler(timestep_type="log_sigma"), 500),
    "vp_euler_maruyama": (lambda: VPEulerMaruyamaScheduler(prediction_type="sample"), 500),
    "subvp_euler_maruyama": (lambda: VPEulerMaruyamaScheduler(sde_type="subvp", timestep_type="continuous"), 500),
    "pc_ve_reverse_diffusion_langevin": (lambda: PredictorCorrectorScheduler(), 300),
    "pc_vp_ancestral": (
        lambda: PredictorCorrectorScheduler(
            sde_type="vp", predictor="ancestral", corrector="none", prediction_type="v_prediction", time_spacing="log_snr"
        ),
        500,
    ),
    "pc_subvp_euler_maruyama_annealed": (
        lambda: PredictorCorrectorScheduler(
            sde_type="subvp", predictor="euler_maruyama", corrector="annealed_langevin", prediction_type="epsilon"
        ),
        250,
    ),
    "ode_vp_heun_edm": (lambda: ProbabilityFlowODEScheduler(solver="heun", time_spacing="edm"), 40),
    # NFE 50: at the sampling noise floor on both mixtures (BENCHMARKS.md)
    "ode_vp_dpm_solver_2m": (lambda: ProbabilityFlowODEScheduler(), 50),
    "ode_ve_dpm_solver_2m": (lambda: ProbabilityFlowODEScheduler(sde_type="ve", prediction_type="sample"), 50),
    "ode_ve_heun_log_snr": (
        lambda: ProbabilityFlowODEScheduler(sde_type="ve", prediction_type="score", timestep_type="sigma", solver="heun"),
        25,
    ),
    "ode_subvp_euler": (lambda: ProbabilityFlowODEScheduler(sde_type="subvp", solver="euler", prediction_type="v_prediction"), 200),
    "annealed_langevin": (lambda: AnnealedLangevinScheduler(sigma_max=10.0, num_annealed_steps=50), 30),
}

LIMITS = {"tv": 0.04, "mean_error": 0.25, "variance_error": 0.06, "max_variance_error": 0.25}


def sample_report(make_scheduler, steps, mixture_name, seed=0):
    mixture, num_samples = MIXTURES[mixture_name]
    scheduler = make_scheduler()
    samples = run_loop(scheduler, exact_score_model(mixture, scheduler), (num_samples, mixture.dim), steps, seed=seed)
    return mixture.report(samples)


def assert_on_the_mixture(report):
    assert not report["nonfinite"]
    failures = {name: round(report[name], 4) for name, limit in LIMITS.items() if not report[name] < limit}
    assert not failures, f"beyond {LIMITS}: {failures}"


@pytest.mark.parametrize("mixture_name", sorted(MIXTURES))
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_sampler_recovers_the_mixture(sampler, mixture_name):
    make_scheduler, steps = SAMPLERS[sampler]
    assert_on_the_mixture(sample_report(make_scheduler, steps, mixture_name))


def test_true_samples_pass_the_same_checks():
    """The checks' own noise floor: fresh draws from the mixture sit far inside the limits."""
    for mixture, num_samples in MIXTURES.values():
        report = mixture.report(mixture.sample(num_samples, torch.Generator().manual_seed(1)))
        assert all(report[name] < limit / 2 for name, limit in LIMITS.items()), report


def _noise_missing_sqrt2(x, score, drift_coefficient, diffusion_squared, dt, noise):
    x_mean = x + (drift_coefficient * x - diffusion_squared * score) * dt
    return x_mean if noise is None else x_mean + (diffusion_squared * -dt / 2) ** 0.5 * noise


def _drift_sign_flipped(x, score, drift_coefficient, diffusion_squared, dt, noise):
    x_mean = x + (-drift_coefficient * x - diffusion_squared * score) * dt
    return x_mean if noise is None else x_mean + (diffusion_squared * -dt) ** 0.5 * noise


def _langevin_noise_missing_sqrt2(x, score, step_size, noise):
    return x + step_size * score + step_size**0.5 * noise


def _ode_slope_off_by_sqrt2(x, epsilon, a_hi, noise_ratio_hi, a_lo, noise_ratio_lo):
    return a_lo * (x / a_hi + (noise_ratio_lo - noise_ratio_hi) * epsilon * math.sqrt(2))


def _data_step_sign_flipped(x, sample_0, sigma_hi, noise_ratio_hi, a_lo, sigma_lo, noise_ratio_lo):
    return (sigma_lo / sigma_hi) * x - a_lo * (1 - noise_ratio_lo / noise_ratio_hi) * sample_0


MUTANTS = {
    "em_noise_missing_sqrt2": (scheduling_utils, "euler_maruyama", _noise_missing_sqrt2, "ve_euler_maruyama", "64d"),
    "em_drift_sign_flipped": (scheduling_utils, "euler_maruyama", _drift_sign_flipped, "vp_euler_maruyama", "64d"),
    "ald_noise_missing_sqrt2": (scheduling_annealed_langevin, "langevin", _langevin_noise_missing_sqrt2, "annealed_langevin", "ring"),
    "ode_slope_off_by_sqrt2": (
        scheduling_probability_flow_ode,
        "probability_flow_euler",
        _ode_slope_off_by_sqrt2,
        "ode_vp_heun_edm",
        "64d",
    ),
    "dpm_solver_data_term_sign_flipped": (
        scheduling_probability_flow_ode,
        "probability_flow_data_step",
        _data_step_sign_flipped,
        "ode_vp_dpm_solver_2m",
        "ring",
    ),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_a_subtly_wrong_sampler_fails(mutant, monkeypatch):
    module, name, replacement, sampler, mixture_name = MUTANTS[mutant]
    assert hasattr(module, name) and hasattr(sde_updates, name)
    monkeypatch.setattr(module, name, replacement)
    make_scheduler, steps = SAMPLERS[sampler]
    with pytest.raises(AssertionError, match="beyond"):
        assert_on_the_mixture(sample_report(make_scheduler, steps, mixture_name))
