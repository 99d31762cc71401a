"""The SDEs against their closed forms, and the conversions between model outputs."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_scorekit.parametrization import (
    epsilon_and_sample,
    model_output_from_epsilon,
    model_target,
    t_from_timestep,
    timestep_from_t,
)
from diffusers_scorekit.sde import VESDE, VPSDE, SubVPSDE, build_sde

TIMES = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)


def test_ve_marginal_and_diffusion():
    sde = VESDE(0.01, 50.0)
    a, sigma = sde.marginal(TIMES)
    assert torch.all(a == 1)
    assert torch.allclose(sigma, 0.01 * (5000.0 ** TIMES))
    # g^2 = d sigma^2 / dt, checked by finite differences
    h = 1e-6
    numeric = (sde.sigma(TIMES + h) ** 2 - sde.sigma(TIMES - h) ** 2) / (2 * h)
    assert torch.allclose(sde.diffusion_squared(TIMES), numeric, rtol=1e-6)
    assert sde.prior_std == 50.0


@pytest.mark.parametrize("sde_cls", [VPSDE, SubVPSDE])
def test_vp_family_matches_closed_form(sde_cls):
    sde = sde_cls(0.1, 20.0)
    integral = 0.1 * TIMES + 0.5 * (20.0 - 0.1) * TIMES**2
    a, sigma = sde.marginal(TIMES)
    assert torch.allclose(a, torch.exp(-0.5 * integral))
    expected_sigma = torch.sqrt(1 - torch.exp(-integral)) if sde_cls is VPSDE else 1 - torch.exp(-integral)
    assert torch.allclose(sigma, expected_sigma)


@pytest.mark.parametrize("sde", [VESDE(0.01, 50.0), VPSDE(0.1, 20.0), SubVPSDE(0.1, 20.0)], ids=repr)
def test_variance_ode_links_marginal_and_sde(sde):
    """For a linear SDE, d sigma^2/dt = 2 f sigma^2 + g^2 and d a/dt = f a: the marginal and (f, g) agree."""
    t = TIMES[5:-5]
    h = 1e-6
    a_plus, sigma_plus = sde.marginal(t + h)
    a_minus, sigma_minus = sde.marginal(t - h)
    a, sigma = sde.marginal(t)
    f = sde.drift_coefficient(t)
    assert torch.allclose((sigma_plus**2 - sigma_minus**2) / (2 * h), 2 * f * sigma**2 + sde.diffusion_squared(t), rtol=1e-5)
    assert torch.allclose((a_plus - a_minus) / (2 * h), f * a, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_vp_from_ddpm_schedule_reproduces_alphas_cumprod(schedule):
    ddpm = DDPMScheduler(beta_schedule=schedule)
    sde = VPSDE.from_ddpm_schedule(beta_schedule=schedule)
    knots = torch.arange(1000, dtype=torch.float64) / 999
    a, sigma = sde.marginal(knots)
    target = ddpm.alphas_cumprod.to(torch.float64)
    assert ((a**2 - target) / target).abs().max() < 1e-3
    # smooth and monotone in between: beta never negative, and continuous across every knot
    fine = torch.linspace(0, 1, 20001, dtype=torch.float64)
    assert torch.all(sde.beta(fine) >= 0)
    assert torch.all(sde.marginal(fine)[0][1:] <= sde.marginal(fine)[0][:-1])
    inner_knots = knots[1:-1]
    left, right = sde.beta(inner_knots - 1e-10), sde.beta(inner_knots + 1e-10)
    assert torch.allclose(left, right, rtol=1e-5)


def test_trained_betas():
    betas = np.linspace(1e-4, 0.02, 50)
    sde = build_sde("vp", beta_schedule=None, trained_betas=betas.tolist(), num_train_timesteps=50)
    a, _ = sde.marginal(torch.arange(50, dtype=torch.float64) / 49)
    assert np.allclose(a.numpy() ** 2, np.cumprod(1 - betas), rtol=1e-6)  # diffusers keeps betas in float32


@pytest.mark.parametrize("sde", [VESDE(0.01, 50.0), VPSDE(0.1, 20.0), SubVPSDE(0.1, 20.0)], ids=repr)
def test_inverses(sde):
    t = TIMES[1:]
    assert torch.allclose(sde.t_from_sigma(sde.sigma(t)), t, atol=1e-9)
    assert torch.allclose(sde.t_from_log_snr(sde.log_snr(t)), t, atol=1e-9)


def test_prior_log_prob_is_gaussian():
    sde = VESDE(0.01, 3.0)
    z = torch.randn(5, 2, 3)
    expected = torch.distributions.Normal(0.0, 3.0).log_prob(z.double()).flatten(1).sum(1)
    assert torch.allclose(sde.prior_log_prob(z), expected)


def test_unknown_sde_type():
    with pytest.raises(ValueError, match="sde_type"):
        build_sde("vpp")


@pytest.mark.parametrize("prediction_type", ["epsilon", "score", "sample", "v_prediction"])
@pytest.mark.parametrize("a, sigma", [(1.0, 3.0), (0.8, 0.6), (0.9, 0.19)])
def test_conversions_recover_noise_and_sample(prediction_type, a, sigma):
    x0, noise = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    x = a * x0 + sigma * noise
    output = model_target(x0, noise, a, sigma, prediction_type)
    epsilon, sample = epsilon_and_sample(output, x, a, sigma, prediction_type)
    assert torch.allclose(epsilon, noise) and torch.allclose(sample, x0)
    assert torch.allclose(model_output_from_epsilon(noise, x, a, sigma, prediction_type), output)


def test_v_prediction_is_diffusers_velocity_on_vp():
    ddpm = DDPMScheduler()
    x0, noise = torch.randn(2, 3), torch.randn(2, 3)
    timesteps = torch.tensor([10, 700])
    alpha_bar = ddpm.alphas_cumprod[timesteps].to(torch.float64)
    a, sigma = alpha_bar.sqrt()[:, None], (1 - alpha_bar).sqrt()[:, None]
    ours = model_target(x0.double(), noise.double(), a, sigma, "v_prediction")
    assert torch.allclose(ours.float(), ddpm.get_velocity(x0, noise, timesteps), atol=1e-6)


@pytest.mark.parametrize("timestep_type", ["discrete", "continuous", "sigma", "log_sigma"])
def test_timestep_round_trip(timestep_type):
    sde = VESDE(0.01, 50.0)
    t = TIMES
    values = timestep_from_t(t, sde, timestep_type, 1000)
    assert torch.allclose(t_from_timestep(values, sde, timestep_type, 1000), t, atol=1e-9)
    if timestep_type == "discrete":
        assert values[-1] == 999
    if timestep_type == "log_sigma":
        assert math.isclose(values[0].item(), math.log(0.01))
