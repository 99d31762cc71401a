"""The variational bounds against closed-form answers (GitHub issue #16).

The "model" is the exact noise prediction of a Gaussian mixture, one time per example. For Gaussian data
``N(mu, s^2 I)`` the exact denoiser is linear, ``x0_hat = mu + k (x_t - a mu)`` with ``k = a s^2 / (a^2 s^2 +
sigma^2)``, so over the forward noise ``E|x_0 - x0_hat|^2 = (1 - k a)^2 |x_0 - mu|^2 + D k^2 sigma^2`` and every
term of both bounds has a closed-form expectation for each ``x_0``, written here from Bayes' rule (DDPM) and the
signal-to-noise ratio (continuous time), not from the module's coefficients. For the mixture, the expected
continuous bound with the exact score is ``h(x_eps / a_eps) + KL(p_1 || prior)``, both computed from the
mixture's closed-form densities.
"""

import math
import re

import pytest
import torch
from scipy.stats import norm

from diffusers_scorekit import PredictorCorrectorScheduler, ProbabilityFlowODEScheduler, ScoreSDEPipeline
from diffusers_scorekit.mixture import GaussianMixture
from diffusers_scorekit.parametrization import t_from_timestep
from diffusers_scorekit.score_function import ScoreFunction
from diffusers_scorekit.sde import VESDE, VPSDE, SubVPSDE, default_sampling_eps
from diffusers_scorekit.variational_bound import (
    continuous_variational_bound,
    ddpm_variational_bound,
    discretized_gaussian_log_likelihood,
    to_bin_centres,
)

# 16 dimensions: an estimate's noise in bits/dim falls like 1/sqrt(D)
DIM = 16
MEAN = torch.linspace(-0.8, 0.8, DIM, dtype=torch.float64)
SCALE = 0.4
GAUSSIAN = GaussianMixture([1.0], MEAN[None], [SCALE])
RING = GaussianMixture.ring()
MODES = GaussianMixture.high_dimensional(dim=DIM)
LN2 = math.log(2)


class PerExampleOracle:
    """The mixture's exact ``eps`` at ``x_t``, one time per example (as the bounds call it)."""

    def __init__(self, mixture, sde, timestep_type="continuous", num_train_timesteps=1000, learned_range_v=None):
        self.mixture, self.sde = mixture, sde
        self.timestep_type, self.num_train_timesteps = timestep_type, num_train_timesteps
        self.learned_range_v = learned_range_v

    def __call__(self, x, timestep):
        t = t_from_timestep(timestep.to(torch.float64), self.sde, self.timestep_type, self.num_train_timesteps)
        a, sigma = (value[:, None] for value in self.sde.marginal(t))
        m = self.mixture
        variances = a**2 * m.stds**2 + sigma**2  # (n, K)
        diff = x.to(torch.float64)[:, None, :] - a[:, :, None] * m.means[None]
        terms = m.weights.log() - 0.5 * diff.pow(2).sum(-1) / variances - 0.5 * m.dim * variances.log()
        score = -(torch.softmax(terms, 1)[..., None] * diff / variances[..., None]).sum(1)
        epsilon = (-sigma * score).to(x.dtype)
        if self.learned_range_v is None:
            return epsilon
        return torch.cat([epsilon, torch.full_like(epsilon, self.learned_range_v)], dim=1)


def oracle(mixture, sde, **kwargs):
    return ScoreFunction(PerExampleOracle(mixture, sde, **kwargs), sde, "epsilon", "continuous")


def ddpm_sde(num_steps):
    # score_sde's VP (linear beta from 0.1 to 20) observed at t = 1/N, 2/N, ..., 1: chains of any length with one
    # continuous limit (at N = 1000 it is close to diffusers' default schedule)
    times = torch.arange(1, num_steps + 1, dtype=torch.float64) / num_steps
    return VPSDE.from_alphas_cumprod(VPSDE().log_alpha_bar(times).exp())


def gaussian_denoising_error(x_0, a, sigma):
    """``E_z |x_0 - x0_hat|^2`` per example for the Gaussian data and the exact denoiser."""
    k = a * SCALE**2 / (a**2 * SCALE**2 + sigma**2)
    return (1 - k * a) ** 2 * (x_0 - MEAN).pow(2).sum(1) + x_0.shape[1] * k**2 * sigma**2


def gaussian_prior_kl(x_0, a, sigma):
    return 0.5 * (x_0.shape[1] * (sigma**2 - 1 - math.log(sigma**2)) + (a * x_0).pow(2).sum(1))


def gaussian_ddpm_bound(x_0, sde, variance_type):
    """The expected DDPM bound for each ``x_0``: the reverse step's mean is the posterior's with ``x0_hat``."""
    num_steps, dim = sde.schedule.num_knots, x_0.shape[1]
    alpha_bar = [sde.marginal(i / (num_steps - 1))[0].item() ** 2 for i in range(num_steps)]
    total = gaussian_prior_kl(x_0, alpha_bar[-1] ** 0.5, (1 - alpha_bar[-1]) ** 0.5)
    posterior_variances, terms = [], []
    for i in range(num_steps):
        previous = alpha_bar[i - 1] if i else 1.0
        alpha = alpha_bar[i] / previous
        beta = 1 - alpha
        # q(x_prev | x_i, x_0) from N(sqrt(previous) x_0, 1 - previous) and N(x_i; sqrt(alpha) x_prev, beta)
        variance = 1 / (1 / (1 - previous) + alpha / beta) if i else 0.0
        x0_coefficient = variance * previous**0.5 / (1 - previous) if i else 1.0
        posterior_variances.append(variance)
        error = x0_coefficient**2 * gaussian_denoising_error(x_0, alpha_bar[i] ** 0.5, (1 - alpha_bar[i]) ** 0.5)
        terms.append((beta, variance, error))
    for i, (beta, variance, error) in enumerate(terms):
        model_variance = beta if variance_type == "fixed_large" else posterior_variances[max(i, 1)]
        if i == 0:
            total = total + 0.5 * dim * math.log(2 * math.pi * model_variance) + error / (2 * model_variance)
        else:
            total = total + 0.5 * dim * (variance / model_variance - 1 + math.log(model_variance / variance)) + error / (2 * model_variance)
    return total


def gaussian_continuous_bound(x_0, sde, eps):
    """The expected continuous bound for each ``x_0``: 1/2 int -dSNR E|x_0 - x0_hat|^2 in closed form in SNR."""
    dim = x_0.shape[1]
    a_eps, sigma_eps = (v.item() for v in sde.marginal(eps))
    a_1, sigma_1 = (v.item() for v in sde.marginal(1.0))
    w_eps, w_1 = 1 + SCALE**2 * (a_eps / sigma_eps) ** 2, 1 + SCALE**2 * (a_1 / sigma_1) ** 2
    # int dSNR / (1 + SNR s^2)^2 and int SNR s^4 dSNR / (1 + SNR s^2)^2, from SNR(1) to SNR(eps)
    diffusion = 0.5 * ((x_0 - MEAN).pow(2).sum(1) / SCALE**2 * (1 / w_1 - 1 / w_eps)
                       + dim * (math.log(w_eps / w_1) + 1 / w_eps - 1 / w_1))
    prior_std = sde.prior_std
    prior = 0.5 * (dim * ((sigma_1 / prior_std) ** 2 - 1 - 2 * math.log(sigma_1 / prior_std))
                   + (a_1 * x_0).pow(2).sum(1) / prior_std**2)
    decoder = 0.5 * dim * (math.log(2 * math.pi * (sigma_eps / a_eps) ** 2) + 1)
    return prior + diffusion + decoder


def gaussian_samples(num, seed=0):
    return GAUSSIAN.sample(num, torch.Generator().manual_seed(seed))


def assert_mean_matches(estimates_bpd, exact_bpd, tolerance_bpd):
    """The mean over examples of estimate - exact is 0 within 4 standard errors, and those are < tolerance."""
    difference = estimates_bpd - exact_bpd
    standard_error = difference.std() / math.sqrt(len(difference))
    assert standard_error < tolerance_bpd / 4
    assert difference.mean().abs() < 4 * standard_error, (difference.mean().item(), standard_error.item())


@pytest.mark.parametrize("variance_type", ["fixed_large", "fixed_small"])
def test_ddpm_bound_matches_the_gaussian_closed_form(variance_type):
    # one forward-noise draw per term makes each estimate noisy (~0.2 bits/dim): the mean over 4096 examples
    # has a standard error of 0.003
    sde, x_0 = ddpm_sde(10), gaussian_samples(4096)
    out = ddpm_variational_bound(oracle(GAUSSIAN, sde), x_0, variance_type=variance_type, batch_size=4096,
                                 generator=torch.Generator().manual_seed(1))
    exact = gaussian_ddpm_bound(x_0, sde, variance_type) / (DIM * LN2)
    assert_mean_matches(out.bits_per_dim, exact, 0.02)
    assert out.nfe == 10 and out.standard_error_bpd is None
    assert torch.allclose(out.prior_bpd, gaussian_prior_kl(x_0, *sde.marginal(1.0)) / (DIM * LN2), rtol=1e-12)
    assert torch.allclose(out.prior_bpd + out.diffusion_bpd + out.reconstruction_bpd, out.bits_per_dim)


def test_ddpm_bound_approaches_the_exact_likelihood_as_steps_grow():
    # fixed_large with the exact posterior mean: the expected gap to the exact NLL falls like 1/N (closed form);
    # the posterior's variance (fixed_small) keeps a gap on continuous data, whose reverse steps have variance
    # ~beta_t, not beta~_t
    x_0 = gaussian_samples(2048)
    exact_nll = -GAUSSIAN.log_prob(x_0)

    def gap(num_steps, variance_type):
        return (gaussian_ddpm_bound(x_0, ddpm_sde(num_steps), variance_type) - exact_nll).mean().item() / (DIM * LN2)

    large = [gap(n, "fixed_large") for n in (10, 100, 1000)]
    assert large[0] > 6 * large[1] and large[1] > 6 * large[2] > 0 and large[2] < 0.003
    assert gap(1000, "fixed_small") > 0.5
    # on the ring, nothing Gaussian: the estimated bound sits above the exact NLL, less so with more steps
    ring = RING.sample(1024, torch.Generator().manual_seed(2))
    gaps = []
    for num_steps in (10, 50):
        out = ddpm_variational_bound(oracle(RING, ddpm_sde(num_steps)), ring, generator=torch.Generator().manual_seed(3))
        difference = out.bits_per_dim + RING.log_prob(ring) / (2 * LN2)
        gaps.append((difference.mean() - 4 * difference.std() / math.sqrt(len(ring))).item())
        gaps.append((difference.mean() + 4 * difference.std() / math.sqrt(len(ring))).item())
    assert 0 < gaps[2] < gaps[3] < gaps[0]


def test_random_subset_of_timesteps_is_unbiased_with_its_standard_error():
    sde, x_0 = ddpm_sde(100), gaussian_samples(2048)
    out = ddpm_variational_bound(oracle(GAUSSIAN, sde), x_0, num_time_samples=8, generator=torch.Generator().manual_seed(4))
    exact = gaussian_ddpm_bound(x_0, sde, "fixed_large") / (DIM * LN2)
    difference = out.bits_per_dim - exact
    # the reported standard errors match the spread of the estimates about their (closed-form) expectation
    ratio = difference.pow(2).mean().sqrt() / out.standard_error_bpd.pow(2).mean().sqrt()
    assert 0.85 < ratio < 1.15
    assert difference.mean().abs() < 4 * out.standard_error_bpd.pow(2).mean().sqrt() / math.sqrt(len(x_0))
    assert out.nfe == 9


@pytest.mark.parametrize("v, variance_type", [(1.0, "fixed_large"), (-1.0, "fixed_small")])
def test_learned_range_interpolates_the_fixed_variances(v, variance_type):
    sde, x_0 = ddpm_sde(50), gaussian_samples(8)
    learned = ScoreFunction(PerExampleOracle(GAUSSIAN, sde, learned_range_v=v), sde, "epsilon", "continuous")
    out = ddpm_variational_bound(learned, x_0, variance_type="learned_range", generator=torch.Generator().manual_seed(5))
    fixed = ddpm_variational_bound(oracle(GAUSSIAN, sde), x_0, variance_type=variance_type,
                                   generator=torch.Generator().manual_seed(5))
    assert torch.allclose(out.bits_per_dim, fixed.bits_per_dim, rtol=1e-12)
    middle = ScoreFunction(PerExampleOracle(GAUSSIAN, sde, learned_range_v=0.0), sde, "epsilon", "continuous")
    between = ddpm_variational_bound(middle, x_0, variance_type="learned_range", generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(between.bits_per_dim, fixed.bits_per_dim)


def test_discretized_gaussian_decoder_is_a_distribution_over_the_levels():
    centres = torch.arange(256, dtype=torch.float64) * 2 / 255 - 1  # float64 bins tile the line exactly
    mean, std = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.05, dtype=torch.float64)
    log_mass = discretized_gaussian_log_likelihood(centres, mean, std)
    assert abs(torch.logsumexp(log_mass, 0).item()) < 1e-12
    for k in (0, 100, 166, 255):
        lower = -math.inf if k == 0 else (centres[k].item() - 1 / 255 - 0.3) / 0.05
        upper = math.inf if k == 255 else (centres[k].item() + 1 / 255 - 0.3) / 0.05
        mass = norm.cdf(upper) - norm.cdf(lower) if lower < 0 else norm.sf(lower) - norm.sf(upper)
        assert log_mass[k].item() == pytest.approx(math.log(mass), rel=1e-9)
    # far in either tail the mass is still resolved (no log(0))
    tails = discretized_gaussian_log_likelihood(centres[[10, 250]], torch.tensor(0.0), torch.tensor(0.01))
    assert torch.isfinite(tails).all() and (tails < -1000).all()


SDES = {"ve": VESDE(), "vp": VPSDE(), "subvp": SubVPSDE()}


@pytest.mark.parametrize("sde_name", SDES)
def test_continuous_bound_matches_the_gaussian_closed_form(sde_name):
    # ~0.4 bits/dim of noise per example at 16 times (0.6 on sub-VP), ~0.01 over 2048 examples
    sde, x_0 = SDES[sde_name], gaussian_samples(2048)
    out = continuous_variational_bound(oracle(GAUSSIAN, sde), x_0, num_time_samples=16, batch_size=8192,
                                       generator=torch.Generator().manual_seed(6))
    exact = gaussian_continuous_bound(x_0, sde, default_sampling_eps(sde)) / (DIM * LN2)
    difference = out.bits_per_dim - exact
    reported = out.standard_error_bpd.pow(2).mean().sqrt()
    assert 0.85 < difference.pow(2).mean().sqrt() / reported < 1.15
    assert difference.mean().abs() < 4 * reported / math.sqrt(len(x_0)) < 0.06
    # with the exact score the expected bound is the entropy of x_eps / a_eps plus KL(p_1 || prior)
    a_eps, sigma_eps = (v.item() for v in sde.marginal(default_sampling_eps(sde)))
    a_1, sigma_1 = (v.item() for v in sde.marginal(1.0))
    smoothed_entropy = 0.5 * DIM * math.log(2 * math.pi * math.e * (SCALE**2 + (sigma_eps / a_eps) ** 2))
    variance_1, prior_variance = a_1**2 * SCALE**2 + sigma_1**2, sde.prior_std**2
    prior_mismatch = 0.5 * (DIM * (variance_1 / prior_variance - 1 - math.log(variance_1 / prior_variance))
                            + a_1**2 * MEAN.pow(2).sum().item() / prior_variance)
    expected = (smoothed_entropy + prior_mismatch) / (DIM * LN2)
    entropy = 0.5 * DIM * math.log(2 * math.pi * math.e * SCALE**2) / (DIM * LN2)
    assert expected > entropy  # the bound's expectation exceeds the exact NLL's (by 1e-5 on VE, 0.01 on VP)
    assert exact.mean().item() == pytest.approx(expected, abs=4 * exact.std().item() / math.sqrt(len(x_0)))


def test_importance_sampling_estimates_the_same_bound_with_less_noise():
    sde, x_0 = SDES["vp"], gaussian_samples(1024)
    plain = continuous_variational_bound(oracle(GAUSSIAN, sde), x_0, num_time_samples=16, importance_sampling=False,
                                         generator=torch.Generator().manual_seed(7))
    exact = gaussian_continuous_bound(x_0, sde, default_sampling_eps(sde)) / (DIM * LN2)
    reported = plain.standard_error_bpd.pow(2).mean().sqrt()
    assert (plain.bits_per_dim - exact).mean().abs() < 4 * reported / math.sqrt(len(x_0))
    weighted = continuous_variational_bound(oracle(GAUSSIAN, sde), x_0, num_time_samples=16,
                                            generator=torch.Generator().manual_seed(7))
    assert weighted.standard_error_bpd.pow(2).mean().sqrt() < reported / 3


@pytest.mark.parametrize("sde_name", SDES)
def test_continuous_bound_exceeds_the_mixtures_likelihood_by_the_theoretical_gap(sde_name):
    # E[bound] = h(x_eps / a_eps) + KL(p_1 || prior) >= h(x) = E[-log p(x)], all from the mixture's densities
    sde = SDES[sde_name]
    eps = default_sampling_eps(sde)
    generator = torch.Generator().manual_seed(8)
    x_0 = MODES.sample(2048, generator)
    out = continuous_variational_bound(oracle(MODES, sde), x_0, num_time_samples=16, batch_size=8192,
                                       generator=generator)
    a_eps, sigma_eps = (v.item() for v in sde.marginal(eps))
    smoothing = sigma_eps / a_eps
    smoothed = x_0 + smoothing * torch.randn(x_0.shape, generator=generator, dtype=torch.float64)
    a_1, sigma_1 = (v.item() for v in sde.marginal(1.0))
    x_1 = a_1 * MODES.sample(len(x_0), generator) + sigma_1 * torch.randn(x_0.shape, generator=generator, dtype=torch.float64)
    # per example: bound - exact NLL against its expectation (the same x_0 in the smoothing term: less noise)
    smoothing_gap = MODES.log_prob(x_0) - MODES.log_prob(smoothed, 1.0, smoothing)
    prior_gap = (MODES.log_prob(x_1, a_1, sigma_1) - sde.prior_log_prob(x_1)).mean()
    gap = out.bits_per_dim + MODES.log_prob(x_0) / (DIM * LN2)
    expected = (smoothing_gap + prior_gap) / (DIM * LN2)
    assert_mean_matches(gap, expected, 0.06)


def test_ddpm_bound_on_eight_bit_images_through_the_pipeline():
    from test_pipeline import quiet, tiny_unet
    from diffusers import DDPMScheduler

    scheduler = PredictorCorrectorScheduler.from_config(DDPMScheduler(num_train_timesteps=50).config)
    pipe = quiet(ScoreSDEPipeline(unet=tiny_unet(), scheduler=scheduler))
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    full = pipe.variational_bound(images, generator=torch.Generator().manual_seed(0))
    assert full.nfe == 50 and full.standard_error_bpd is None and torch.isfinite(full.bits_per_dim).all()
    # the discretised decoder scores the bin centres 2k/255 - 1 directly
    direct = ddpm_variational_bound(pipe.score_function(), to_bin_centres(images), data="8bit",
                                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(direct.bits_per_dim, full.bits_per_dim)
    subset = pipe.variational_bound(images, num_time_samples=4, generator=torch.Generator().manual_seed(0))
    assert subset.nfe == 5 and torch.isfinite(subset.standard_error_bpd).all()
    ve = quiet(ScoreSDEPipeline(unet=tiny_unet(), scheduler=ProbabilityFlowODEScheduler(
        sde_type="ve", prediction_type="epsilon", timestep_type="continuous")))
    continuous = ve.variational_bound(images, num_time_samples=4, generator=torch.Generator().manual_seed(0))
    assert continuous.nfe == 4
    # dequantised 8-bit data: the ODE's +7 bits/dim sits in the reconstruction term
    sigma_eps = ve.scheduler.sde.sigma(ve.scheduler.sampling_eps).item()
    dim_entropy = 0.5 * (math.log(2 * math.pi * sigma_eps**2) + 1) / LN2
    assert torch.allclose(continuous.reconstruction_bpd, torch.full((2,), dim_entropy + 7.0, dtype=torch.float64))


def test_bad_arguments_are_named():
    sde, x_0 = ddpm_sde(10), gaussian_samples(2)
    score_fn = oracle(GAUSSIAN, sde)
    with pytest.raises(ValueError, match="variance_type"):
        ddpm_variational_bound(score_fn, x_0, variance_type="learned")
    with pytest.raises(ValueError, match="num_time_samples"):
        ddpm_variational_bound(score_fn, x_0, num_time_samples=1)
    with pytest.raises(ValueError, match="8-bit grid"):
        ddpm_variational_bound(score_fn, x_0, data="8bit")
    with pytest.raises(ValueError, match="learned_range"):
        ddpm_variational_bound(score_fn, x_0, variance_type="learned_range")
    with pytest.raises(ValueError, match="even"):
        continuous_variational_bound(score_fn, x_0, num_time_samples=5)
    with pytest.raises(ValueError, match="score_fn.sde"):
        ddpm_variational_bound(oracle(GAUSSIAN, VPSDE()), x_0)
    with pytest.raises(ValueError, match="data"):
        continuous_variational_bound(score_fn, x_0, data="16bit")
    with pytest.raises(ValueError, match="images"):
        to_bin_centres(torch.tensor([0.5]))


def test_cli_likelihood_elbo(tmp_path, capsys):
    from diffusers_scorekit import cli

    cli.main(["train", "--dataset", "two_moons", "--num_toy_samples", "500", "--hidden_dim", "16", "--num_layers", "1",
              "--train_batch_size", "32", "--max_train_steps", "4", "--checkpointing_steps", "4",
              "--num_inference_steps", "2", "--num_eval_samples", "16", "--eval_likelihood_samples", "0",
              "--output_dir", str(tmp_path)])
    capsys.readouterr()
    cli.main(["likelihood", str(tmp_path), "--method", "elbo", "--num_examples", "8", "--num_time_samples", "4"])
    line = capsys.readouterr().out
    assert re.search(r"bits/dim: -?\d+\.\d{3} ± \d\.\d{3} \(continuous, in data units, 8 examples, continuous-time bound, "
                     r"4 times per example\)", line), line
