"""Probability-flow likelihood, encoding and ODE sampling against closed-form answers (GitHub issue #4).

The "model" is a Gaussian mixture's exact score (``diffusers_scorekit.mixture``), so the perturbed density at
every ``t`` is known and the only errors are the solver's and the trace estimator's. The PF-ODE defines the
density of the data perturbed to ``t = eps`` (the start of the flow), so samples are drawn at ``eps``
(``x = a(eps) x_0 + sigma(eps) z``) and compared with ``mixture.log_prob(x, a(eps), sigma(eps))``.
"""

import math

import pytest
import torch

from diffusers_scorekit.likelihood import (
    decode,
    dequantize_and_scale,
    encode,
    log_likelihood,
    ode_sample,
    per_dimension_norm,
)
from diffusers_scorekit.mixture import GaussianMixture, marginal_at_timestep
from diffusers_scorekit.parametrization import PREDICTION_TYPES
from diffusers_scorekit.score_function import ScoreFunction
from diffusers_scorekit.sde import VESDE, VPSDE, SubVPSDE, default_sampling_eps

SDES = {"ve": VESDE(), "vp": VPSDE(), "subvp": SubVPSDE()}
MIXTURES = {
    "ring": GaussianMixture.ring,
    "4d": lambda: GaussianMixture.high_dimensional(dim=4),
    "8d": lambda: GaussianMixture.high_dimensional(dim=8),
}
TOLERANCE_BPD = 0.01


class CountingOracle:
    """The mixture's exact answer as a model ``(x, timestep)``; counts its calls (forward passes)."""

    def __init__(self, mixture, sde, prediction_type, timestep_type):
        self.mixture, self.sde = mixture, sde
        self.prediction_type, self.timestep_type = prediction_type, timestep_type
        self.calls = 0

    def __call__(self, x, timestep):
        self.calls += 1
        a, sigma = marginal_at_timestep(self.sde, timestep, self.timestep_type)
        return self.mixture.model_output(x, a, sigma, self.prediction_type)


def oracle_score_function(mixture, sde, prediction_type="epsilon", timestep_type="continuous"):
    model = CountingOracle(mixture, sde, prediction_type, timestep_type)
    return ScoreFunction(model, sde, prediction_type, timestep_type)


def samples_at(sde, mixture, t, num_samples, seed=0):
    """Mixture samples perturbed to time ``t``, with their marginal coefficients."""
    generator = torch.Generator().manual_seed(seed)
    a, sigma = (value.item() for value in sde.marginal(t))
    x_0 = mixture.sample(num_samples, generator)
    return a * x_0 + sigma * torch.randn(x_0.shape, generator=generator, dtype=torch.float64), a, sigma


def to_bpd(log_density, num_dims):
    return -log_density / (num_dims * math.log(2))


@pytest.mark.parametrize("mixture_name", ["ring", "4d"])
@pytest.mark.parametrize("sde_name", SDES)
def test_exact_divergence_matches_perturbed_mixture(sde_name, mixture_name):
    sde, mixture = SDES[sde_name], MIXTURES[mixture_name]()
    eps = default_sampling_eps(sde)
    x, a, sigma = samples_at(sde, mixture, eps, 16)
    out = log_likelihood(oracle_score_function(mixture, sde), x, divergence="exact")

    exact = mixture.log_prob(x, a, sigma)
    assert (out.bits_per_dim.mean() - to_bpd(exact, mixture.dim).mean()).abs() < TOLERANCE_BPD
    # per sample, the prior stands in for the true p_1 (its own error, up to ~0.01 bpd on VE's tails); with
    # the true p_1 at the latent, what is left is the solver's error
    a_1, sigma_1 = (value.item() for value in sde.marginal(1.0))
    flow_log_density = mixture.log_prob(out.latent, a_1, sigma_1) + out.delta_log_p
    assert (to_bpd(flow_log_density, mixture.dim) - to_bpd(exact, mixture.dim)).abs().max() < TOLERANCE_BPD / 2
    assert torch.allclose(out.log_likelihood, out.prior_log_prob + out.delta_log_p)


def hutchinson_mean_error(sde, mixture, num_samples, num_probes):
    """Mean Hutchinson bits/dim minus the exact mean, over samples at eps."""
    x, a, sigma = samples_at(sde, mixture, default_sampling_eps(sde), num_samples)
    generator = torch.Generator().manual_seed(1)
    out = log_likelihood(oracle_score_function(mixture, sde), x, num_probes=num_probes, generator=generator)
    return (out.bits_per_dim.mean() - to_bpd(mixture.log_prob(x, a, sigma), mixture.dim).mean()).abs()


def test_hutchinson_mean_matches_perturbed_mixture():
    # unbiased but noisy (std ~0.3 bpd per sample and probe on the 8-D mixture): the mean over 4096 samples x
    # 2 probes has a standard error of ~0.0035 bpd. The noise is the same on every SDE (the flows are
    # reparametrisations of one another), so the fast check runs VP and the slow one the rest.
    assert hutchinson_mean_error(SDES["vp"], MIXTURES["8d"](), 4096, num_probes=2) < TOLERANCE_BPD


@pytest.mark.slow
@pytest.mark.parametrize("mixture_name", ["ring", "8d"])
@pytest.mark.parametrize("sde_name", SDES)
def test_hutchinson_mean_matches_perturbed_mixture_everywhere(sde_name, mixture_name):
    # the ring's off-diagonal score Jacobian makes Rademacher probes noisier (std ~0.7 bpd): 65536 samples
    assert hutchinson_mean_error(SDES[sde_name], MIXTURES[mixture_name](), 65536, num_probes=1) < TOLERANCE_BPD


@pytest.mark.parametrize("sde_name, divergence", [("ve", "exact"), ("vp", "exact"), ("subvp", "exact"), ("vp", "hutchinson")])
def test_single_gaussian_is_analytic(sde_name, divergence):
    # data N(mu, s^2 I) stays Gaussian, N(a mu, std_t^2 I) with std_t^2 = a^2 s^2 + sigma^2, and the flow is
    # the affine map x_1 = a_1 mu + (std_1 / std_eps) (x - a_eps mu), so delta_log_p = D log(std_1 / std_eps);
    # its Jacobian is a multiple of I, where a Rademacher probe is exact
    sde, dim, scale = SDES[sde_name], 3, 0.3
    mean = torch.linspace(-1.0, 1.0, dim, dtype=torch.float64)
    gaussian = GaussianMixture([1.0], mean[None], [scale])
    eps = default_sampling_eps(sde)
    x, a_eps, sigma_eps = samples_at(sde, gaussian, eps, 32)
    out = log_likelihood(oracle_score_function(gaussian, sde), x, divergence=divergence, rtol=1e-6, atol=1e-6)

    a_1, sigma_1 = (value.item() for value in sde.marginal(1.0))
    std_eps, std_1 = math.hypot(a_eps * scale, sigma_eps), math.hypot(a_1 * scale, sigma_1)
    latent = a_1 * mean + (std_1 / std_eps) * (x - a_eps * mean)
    delta_log_p = dim * math.log(std_1 / std_eps)
    assert torch.allclose(out.latent, latent, rtol=1e-5, atol=1e-5 * std_1)
    assert torch.allclose(out.delta_log_p, torch.full_like(out.delta_log_p, delta_log_p), atol=1e-4)
    assert torch.allclose(out.delta_log_p, gaussian.log_prob(x, a_eps, sigma_eps) - gaussian.log_prob(latent, a_1, sigma_1), atol=1e-4)
    assert torch.allclose(out.log_likelihood, sde.prior_log_prob(latent) + delta_log_p, atol=1e-4)
    # the prior is not exactly p_1 (VE: N(0, sigma_max^2) against N(mu, s^2 + sigma_max^2)), so only on average
    assert (out.bits_per_dim - to_bpd(gaussian.log_prob(x, a_eps, sigma_eps), dim)).mean().abs() < TOLERANCE_BPD


@pytest.mark.parametrize("sde_name", SDES)
def test_decode_inverts_encode(sde_name):
    sde, mixture = SDES[sde_name], MIXTURES["ring"]()
    score_fn = oracle_score_function(mixture, sde)
    x, _, _ = samples_at(sde, mixture, default_sampling_eps(sde), 16)
    latent, _ = encode(score_fn, x, rtol=1e-7, atol=1e-7)
    reconstruction, _ = decode(score_fn, latent, rtol=1e-7, atol=1e-7)
    assert (reconstruction - x).abs().max() < 1e-4
    assert latent.std() > 0.5 * sde.prior_std  # it did travel to the prior's scale


def test_ode_sample_draws_the_mixture_and_counts_network_calls():
    sde, mixture = SDES["vp"], MIXTURES["ring"]()
    score_fn = oracle_score_function(mixture, sde)
    samples, nfe = ode_sample(score_fn, (1000, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    report = mixture.report(samples)
    assert report["tv"] < 0.05 and report["mean_error"] < 0.2 and report["variance_error"] < 0.2
    assert nfe == score_fn.model.calls  # the prior draw is free, the Tweedie step is one call


def test_nfe_counts_forward_passes():
    sde, mixture = SDES["ve"], MIXTURES["ring"]()
    score_fn = oracle_score_function(mixture, sde)
    x, _, _ = samples_at(sde, mixture, default_sampling_eps(sde), 8)
    out = log_likelihood(score_fn, x, num_probes=3, generator=torch.Generator().manual_seed(0))
    assert out.nfe == score_fn.model.calls > 10


def test_prediction_and_timestep_types_agree():
    sde, mixture = SDES["vp"], MIXTURES["ring"]()
    x, _, _ = samples_at(sde, mixture, default_sampling_eps(sde), 8)
    conventions = [(prediction_type, "continuous") for prediction_type in PREDICTION_TYPES] + [("epsilon", "discrete")]
    results = [
        log_likelihood(oracle_score_function(mixture, sde, *convention), x, divergence="exact")
        for convention in conventions
    ]
    for result in results[1:]:
        assert torch.allclose(result.log_likelihood, results[0].log_likelihood, atol=1e-3)


def test_error_norm_weighs_the_log_density_per_dimension():
    # RMS of x's entries against RMS of delta_log_p / D: here sqrt(mean([9, 16, 0, 0])) = 2.5 against 12 / 4 = 3
    norm = per_dimension_norm(4)
    x_error = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    assert norm((x_error, torch.tensor([12.0, -12.0], dtype=torch.float64))).item() == pytest.approx(3.0)
    assert norm((x_error, torch.tensor([4.0, 4.0], dtype=torch.float64))).item() == pytest.approx(2.5)


def test_eight_bit_convention():
    # uniform on [-1, 1]^D is uniform over the 256 levels: exactly 8 bits per dimension
    from diffusers_scorekit.likelihood import bits_per_dim

    dim = 3072
    assert bits_per_dim(torch.tensor([-dim * math.log(2)], dtype=torch.float64), dim, "8bit").item() == pytest.approx(8.0)
    assert bits_per_dim(torch.tensor([-dim * math.log(2)], dtype=torch.float64), dim).item() == pytest.approx(1.0)

    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    scaled = dequantize_and_scale(levels, torch.Generator().manual_seed(0))
    assert scaled.dtype == torch.float32 and -1 <= scaled.min() and scaled.max() < 1
    assert torch.equal(torch.floor((scaled + 1) / 2 * 256).to(torch.uint8), levels)


def test_bad_arguments_raise_value_error():
    sde, mixture = SDES["vp"], MIXTURES["ring"]()
    score_fn = oracle_score_function(mixture, sde)
    x, _, _ = samples_at(sde, mixture, default_sampling_eps(sde), 4)
    bad_calls = {
        "divergence=.*hutchinson.*exact": lambda: log_likelihood(score_fn, x, divergence="trace"),
        "probe=.*rademacher.*gaussian": lambda: log_likelihood(score_fn, x, probe="sphere"),
        "num_probes=0": lambda: log_likelihood(score_fn, x, num_probes=0),
        "data=.*continuous.*8bit": lambda: log_likelihood(score_fn, x, data="16bit"),
        "data=\"8bit\"": lambda: log_likelihood(score_fn, 3 * x, data="8bit"),
        "rtol=": lambda: log_likelihood(score_fn, x, rtol=0.0),
        "x must be .* shape \\(batch, ...\\)": lambda: log_likelihood(score_fn, x[0]),
        "x must be a floating-point": lambda: log_likelihood(score_fn, x.to(torch.int64)),
        "sampling_eps=0.*sigma": lambda: log_likelihood(score_fn, x, sampling_eps=0.0),
        "sampling_eps=1.5.*\\[0, 1\\)": lambda: encode(score_fn, x, sampling_eps=1.5),
        "latent must be": lambda: decode(score_fn, torch.zeros(2)),
        "shape_or_latent=.*shape \\(batch, ...\\)": lambda: ode_sample(score_fn, (2,)),
        "images=.*\\[0, 255\\]": lambda: dequantize_and_scale(torch.tensor([0.0, 256.0])),
        "method=.*dopri5": lambda: log_likelihood(score_fn, x, method="rk4"),
    }
    for message, call in bad_calls.items():
        with pytest.raises(ValueError, match=message):
            call()
