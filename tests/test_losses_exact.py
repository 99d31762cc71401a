"""Losses and time sampling against values computed independently in the test.

Each test replays the documented random draws from a seeded generator (time, then noise, then projections) and
evaluates the objective by hand from ``sde.marginal`` for stub networks whose output is known; the importance
sampler is checked against the closed-form integral of ``g^2 / sigma^2`` (the log-SNR drop on VE and VP, a
quadrature on sub-VP). SDEs are built inside each test: the sampler cache is keyed on the SDE object.
"""

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from diffusers_scorekit import ScoreFunction, SubVPSDE, VESDE, VPSDE
from diffusers_scorekit.losses import (
    _ImportanceSampler,
    denoising_score_matching_loss,
    sample_time,
    sliced_score_matching_loss,
)

N, DIM = 64, 3


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def uniform(n, seed=0):
    return torch.rand(n, generator=generator(seed), dtype=torch.float64)


def log_snr(sde, t):
    a, sigma = sde.marginal(torch.as_tensor(t, dtype=torch.float64))
    return (a**2 / sigma**2).log()


def column(values):
    return values.reshape(-1, 1)


def half_x(x, timestep, class_labels=None):
    """A stub network whose output is ``x / 2`` (plus the class label, when given)."""
    return 0.5 * x if class_labels is None else 0.5 * x + column(class_labels).to(x)


def data(dtype=torch.float64, seed=7):
    return 0.3 + torch.randn(N, DIM, generator=generator(seed), dtype=dtype)


# --- the importance sampler: density g^2 / sigma^2 on [eps, 1] ---------------------------------------------


@pytest.mark.parametrize("eps", [1e-5, 0.3])
def test_importance_sampler_is_exact_on_ve(eps):
    """On VE ``g^2 / sigma^2 = 2 log(sigma_max / sigma_min)`` is constant: Z = 2 log(r) (1 - eps), the CDF is
    linear and the quantile of ``u`` is ``eps + (1 - eps) u`` (to rounding, also on a 3-point table)."""
    sde = VESDE(0.01, 50.0)
    for num_points in (3, 10_000):
        sampler = _ImportanceSampler(sde, eps, num_points)
        assert sampler.normaliser == pytest.approx(2 * math.log(5000.0) * (1 - eps), rel=1e-12)
        expected_cdf = (sampler.times - eps) / (1 - eps)
        torch.testing.assert_close(sampler.cdf, expected_cdf, rtol=0, atol=1e-12)
        t = sampler.sample((2000,), generator(3), "cpu")
        assert t.dtype == torch.float64
        torch.testing.assert_close(t, eps + (1 - eps) * uniform(2000, 3), rtol=0, atol=1e-12)


def test_importance_sampler_matches_the_log_snr_on_vp():
    """On VP ``g^2 / sigma^2 = -d log SNR / dt``: Z and the CDF are log-SNR drops; quantiles invert it."""
    sde, eps = VPSDE(0.1, 20.0), 1e-3
    sampler = _ImportanceSampler(sde, eps)
    normaliser = (log_snr(sde, eps) - log_snr(sde, 1.0)).item()
    assert sampler.normaliser == pytest.approx(normaliser, rel=1e-4)
    exact_cdf = (log_snr(sde, eps) - log_snr(sde, sampler.times)) / normaliser
    torch.testing.assert_close(sampler.cdf, exact_cdf, rtol=0, atol=1e-4)
    # quantiles: the exact CDF at each drawn time gives back the uniform draw it came from
    t = sampler.sample((2000,), generator(5), "cpu")
    exact_cdf_at_t = (log_snr(sde, eps) - log_snr(sde, t)) / normaliser
    torch.testing.assert_close(exact_cdf_at_t, uniform(2000, 5), rtol=0, atol=1e-4)


def test_importance_sampler_interpolates_its_table_linearly():
    """On a coarse 3-point VP table every draw lies on the piecewise-linear CDF through the table's knots."""
    sde, eps = VPSDE(0.1, 20.0), 1e-3
    sampler = _ImportanceSampler(sde, eps, num_points=3)
    t = sampler.sample((500,), generator(6), "cpu")
    inverse = torch.from_numpy(np.interp(uniform(500, 6).numpy(), sampler.cdf.numpy(), sampler.times.numpy()))
    torch.testing.assert_close(t, inverse, rtol=0, atol=1e-12)


def test_importance_sampler_matches_quadrature_on_subvp():
    sde, eps = SubVPSDE(0.1, 20.0), 1e-3

    def density(s):
        s = torch.tensor(s, dtype=torch.float64)
        return (sde.diffusion_squared(s) / sde.sigma(s) ** 2).item()

    def integral(lo, hi):
        return integrate.quad(density, lo, hi, epsabs=0, epsrel=1e-12, limit=200)[0]

    sampler = _ImportanceSampler(sde, eps)
    normaliser = integral(eps, 1.0)
    assert sampler.normaliser == pytest.approx(normaliser, rel=1e-4)
    for index in (1, 10, 100, 2500, 7000, 9998):
        time = sampler.times[index].item()
        assert sampler.cdf[index].item() == pytest.approx(integral(eps, time) / normaliser, abs=1e-4)


# --- sample_time ---------------------------------------------------------------------------------------------


def score_fn(sde, model=half_x, prediction_type="epsilon", num_train_timesteps=1000):
    return ScoreFunction(model, sde, prediction_type, "continuous", num_train_timesteps)


def test_sample_time_defaults_to_uniform_from_the_sdes_eps():
    """Defaults: continuous time, ``U(1e-5, 1)`` on VE, drawn as float64 from the generator."""
    t = sample_time(score_fn(VESDE(0.01, 50.0)), N, generator=generator(1))
    torch.testing.assert_close(t, 1e-5 + (1 - 1e-5) * uniform(N, 1), rtol=0, atol=0)


def test_sample_time_uniform_with_given_eps():
    t = sample_time(score_fn(VPSDE(0.1, 20.0)), N, sampling_eps=0.2, generator=generator(2))
    torch.testing.assert_close(t, 0.2 + 0.8 * uniform(N, 2), rtol=0, atol=1e-15)


def test_sample_time_discrete_steps():
    t = sample_time(score_fn(VPSDE(0.1, 20.0), num_train_timesteps=10), N, time_sampling="discrete",
                    generator=generator(3))
    expected = torch.randint(0, 10, (N,), generator=generator(3)).to(torch.float64) / 9
    torch.testing.assert_close(t, expected, rtol=0, atol=0)


def test_sample_time_importance_sampling_on_ve():
    t = sample_time(score_fn(VESDE(0.01, 50.0)), N, sampling_eps=0.25, importance_sampling=True,
                    generator=generator(4))
    torch.testing.assert_close(t, 0.25 + 0.75 * uniform(N, 4), rtol=0, atol=1e-12)


# --- denoising score matching with a stub network ------------------------------------------------------------


def replay_time_and_noise(x0, eps, seed):
    """The draws the loss makes from ``generator(seed)``: ``U(eps, 1)`` times, then the noise."""
    g = generator(seed)
    t = eps + (1 - eps) * torch.rand(len(x0), generator=g, dtype=torch.float64)
    return t, torch.randn(x0.shape, generator=g, dtype=x0.dtype)


def perturb(sde, x0, t, noise):
    a, sigma = sde.marginal(t)
    return column(a) * x0 + column(sigma) * noise


def test_dsm_sigma2_draws_time_and_noise():
    sde, x0 = VPSDE(0.1, 20.0), data()
    loss = denoising_score_matching_loss(score_fn(sde), x0, sampling_eps=0.5, generator=generator(6))
    t, noise = replay_time_and_noise(x0, 0.5, 6)
    expected = (0.5 * perturb(sde, x0, t, noise) - noise).pow(2).mean()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_dsm_likelihood_weighting_without_importance_sampling():
    sde, x0 = SubVPSDE(0.1, 20.0), data()
    loss = denoising_score_matching_loss(score_fn(sde), x0, weighting="likelihood", sampling_eps=0.1,
                                         generator=generator(8))
    t, noise = replay_time_and_noise(x0, 0.1, 8)
    weight = sde.diffusion_squared(t) / sde.sigma(t) ** 2
    expected = (weight * (0.5 * perturb(sde, x0, t, noise) - noise).pow(2).mean(1)).mean()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("sampling_eps", [None, 0.3])
def test_dsm_importance_sampling_on_ve(sampling_eps):
    """On VE the importance-sampled times are uniform and the weight Z / (1 - eps) is 2 log(sigma_max / sigma_min)."""
    sde, x0 = VESDE(0.01, 50.0), data()
    loss = denoising_score_matching_loss(score_fn(sde), x0, weighting="likelihood", importance_sampling=True,
                                         sampling_eps=sampling_eps, generator=generator(9))
    t, noise = replay_time_and_noise(x0, 1e-5 if sampling_eps is None else sampling_eps, 9)
    expected = 2 * math.log(5000.0) * (0.5 * perturb(sde, x0, t, noise) - noise).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_dsm_importance_weight_on_vp_uses_the_given_eps():
    """At given times the importance-sampled weight is Z / (1 - eps), Z the log-SNR drop over [eps, 1]."""
    sde, x0, eps = VPSDE(0.1, 20.0), data(), 0.3
    t = torch.linspace(0.3, 0.9, N, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=generator(15), dtype=x0.dtype)
    loss = denoising_score_matching_loss(score_fn(sde), x0, weighting="likelihood", importance_sampling=True,
                                         sampling_eps=eps, t=t, noise=noise)
    weight = (log_snr(sde, eps) - log_snr(sde, 1.0)).item() / (1 - eps)
    expected = weight * (0.5 * perturb(sde, x0, t, noise) - noise).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_dsm_passes_class_labels_to_the_network():
    sde, x0 = VPSDE(0.1, 20.0), data()
    t = torch.linspace(0.1, 0.9, N, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=generator(10), dtype=x0.dtype)
    labels = torch.arange(N) % 3
    loss = denoising_score_matching_loss(score_fn(sde), x0, t=t, noise=noise, class_labels=labels)
    epsilon = 0.5 * perturb(sde, x0, t, noise) + column(labels).to(x0)
    assert loss.item() == pytest.approx((epsilon - noise).pow(2).mean().item(), rel=1e-6)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_dsm_native_loss_against_the_written_out_target(prediction_type):
    sde, x0 = VPSDE(0.1, 20.0), data()
    t = torch.linspace(0.1, 0.9, N, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=generator(11), dtype=x0.dtype)
    loss = denoising_score_matching_loss(score_fn(sde, prediction_type=prediction_type), x0, weighting="native",
                                         t=t, noise=noise)
    a, sigma = (column(v) for v in sde.marginal(t))
    # VP: a^2 + sigma^2 = 1, so v = a z - sigma x0
    target = x0 if prediction_type == "sample" else a * noise - sigma * x0
    expected = (0.5 * perturb(sde, x0, t, noise) - target).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# --- sliced score matching of a linear score model -----------------------------------------------------------

MATRIX = torch.tensor([[-1.0, 0.4, 0.0], [0.2, -2.0, 0.3], [0.1, -0.5, -0.7]], dtype=torch.float64)


def linear_score(x, timestep):
    """A score-prediction network ``s(x) = M x``: its divergence along ``v`` is ``v^T M v``."""
    return x @ MATRIX.to(x).T


def expected_sliced(sde, x0, eps, seed, num_projections, variance_reduced):
    g = generator(seed)
    t = eps + (1 - eps) * torch.rand(len(x0), generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    score = linear_score(perturb(sde, x0, t, noise), None)
    total = 0
    for _ in range(num_projections):
        v = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
        projection = (v * score).sum(1)
        norm_term = 0.5 * score.pow(2).sum(1) if variance_reduced else 0.5 * projection**2
        total = total + ((v @ MATRIX.to(v)) * v).sum(1) + norm_term
    return (total / num_projections * sde.sigma(t) ** 2).mean()


def test_sliced_score_matching_defaults_one_variance_reduced_projection():
    sde, x0 = VPSDE(0.1, 20.0), data()
    fn = score_fn(sde, linear_score, "score")
    loss = sliced_score_matching_loss(fn, x0, sampling_eps=0.25, generator=generator(12))
    expected = expected_sliced(sde, x0, 0.25, 12, 1, True)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    explicit = sliced_score_matching_loss(fn, x0, num_projections=1, variance_reduced=True, sampling_eps=0.25,
                                          generator=generator(12))
    assert explicit.item() == pytest.approx(expected.item(), rel=1e-10)


@pytest.mark.parametrize("variance_reduced", [True, False])
def test_sliced_score_matching_several_projections(variance_reduced):
    sde, x0 = VESDE(0.01, 5.0), data()
    loss = sliced_score_matching_loss(score_fn(sde, linear_score, "score"), x0, num_projections=3,
                                      variance_reduced=variance_reduced, generator=generator(13))
    expected = expected_sliced(sde, x0, 1e-5, 13, 3, variance_reduced)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)


def test_sliced_score_matching_keeps_the_data_dtype():
    sde, x0 = VPSDE(0.1, 20.0), data(torch.float32)
    loss = sliced_score_matching_loss(score_fn(sde, linear_score, "score"), x0, generator=generator(14))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected_sliced(sde, x0, 1e-3, 14, 1, True).item(), rel=1e-5)


def test_dsm_importance_weight_on_a_ddpm_schedule_defaults_to_eps_zero():
    """A DDPM schedule made continuous starts at its first training step (``sigma(0) > 0``): without
    ``sampling_eps`` the importance weight integrates from t = 0, as ``default_sampling_eps`` says."""
    sde, x0 = VPSDE.from_ddpm_schedule(num_train_timesteps=50), data()
    t = torch.linspace(0.3, 0.9, N, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=generator(16), dtype=x0.dtype)
    loss = denoising_score_matching_loss(score_fn(sde), x0, weighting="likelihood", importance_sampling=True,
                                         t=t, noise=noise)
    weight = (log_snr(sde, 0.0) - log_snr(sde, 1.0)).item()
    expected = weight * (0.5 * perturb(sde, x0, t, noise) - noise).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
