"""The variational bound on the negative log-likelihood, in discrete time (DDPM) and continuous time (GitHub
issue #16). ``likelihood.log_likelihood`` gives the probability-flow ODE's exact density; these give the number a
DDPM is trained on, and the bound a likelihood-weighted score model is trained on.

**Discrete time** (Ho et al. 2020, Nichol & Dhariwal 2021). A DDPM schedule of ``N`` training steps is a
hierarchical VAE: the forward chain ``x_0 -> x_(1) -> ... -> x_(N)`` (diffusers' timestep ``i`` is Ho's
``x_(i+1)``, ``alphas_cumprod[i]`` its ``alpha_bar``) and a Gaussian reverse step ``p(x_(t-1) | x_(t))`` whose
mean is the forward posterior's mean with the model's ``x_0`` estimate in place of ``x_0``. Then

    -log p(x_0) <= L_T + sum_(t=2..N) L_(t-1) + L_0,
    L_T     = KL(q(x_(N) | x_0) || N(0, I)),
    L_(t-1) = E_q KL(q(x_(t-1) | x_(t), x_0) || p(x_(t-1) | x_(t))),
    L_0     = E_q[-log p(x_0 | x_(1))],

each KL between Gaussians in closed form. The reverse variance is ``"fixed_large"`` (``beta_t``, Ho's choice
that makes the bound tight as ``N`` grows), ``"fixed_small"`` (the posterior's ``beta~_t``) or
``"learned_range"`` (diffusers' and improved-diffusion's: the model outputs twice the channels, the second half
``v`` in [-1, 1] interpolating ``log sigma^2 = frac log beta_t + (1 - frac) log beta~_t``, ``frac = (v + 1) / 2``).
``beta~_1 = 0``, so at ``t = 1`` the ``beta~`` in ``"fixed_small"`` and ``"learned_range"`` is ``beta~_2``
(improved-diffusion's clipped log-variance, which learned-range models are trained with).

**Continuous time** (Song et al. 2021, "Maximum likelihood training of score-based diffusion models"; Kingma et
al. 2021). For any linear SDE on ``[eps, 1]``, with ``x_t = a x + sigma z``,

    -log p(x) <= KL(q(x_1 | x) || prior) + 1/2 int_eps^1 g(t)^2 / sigma(t)^2 E_z |eps_theta(x_t, t) - z|^2 dt
                 + E_q[-log N(x; x_eps / a_eps, (sigma_eps / a_eps)^2 I)],

the likelihood-weighted denoising loss (``g^2 |s_theta - grad log q|^2 = g^2 / sigma^2 |eps_theta - z|^2``) plus
a prior term and a Gaussian decoder at ``eps`` (whose expectation is ``D/2 log(2 pi e sigma_eps^2 / a_eps^2)``).
With the exact score its expectation over the data is ``h(x_eps / a_eps) + KL(p_1 || prior)``: the data's
entropy after smoothing by ``N(0, (sigma_eps / a_eps)^2 I)`` plus the prior mismatch, tight as ``eps -> 0`` up to
the latter. The integral is a Monte Carlo estimate over ``t``, importance-sampled as in likelihood-weighted
training (density ``g^2 / sigma^2``, i.e. ``log SNR`` uniform, where the weighted error is ``|eps_theta - z|^2``
times a constant), stratified in ``t`` (two draws per stratum, which give the standard error) and with the
control variate ``|z|^2 - D`` (see ``continuous_variational_bound``): on the tests' 16-dimensional Gaussian these
cut the noise per example about eightfold against plain draws.

For a low-dimensional toy the per-example noise is large (~0.4 bits/dim at 16 times in 16 dimensions); it falls
like ``1 / sqrt(D)``, so on images a few dozen times per image suffice.

**Data conventions**, both reporting an upper bound on ``-log2 P(k) / D`` for 8-bit data ``k`` in
``{0..255}^D`` (so the two bounds and ``log_likelihood(..., data="8bit")`` are the same quantity):

- discrete bound, ``data="8bit"``: ``x_0 = 2 k / 255 - 1`` (diffusers' and DDPM's scaling, ``to_bin_centres``)
  and ``L_0`` is DDPM's discretised Gaussian: the mass of the bin ``[x_0 - 1/255, x_0 + 1/255]`` (the edge bins
  open to infinity), a probability, so no offset;
- continuous bound, ``data="8bit"``: ``x = dequantize_and_scale(k)`` as for the ODE, the bound is on the density
  of ``x`` and the same ``+7`` bits/dim (``likelihood.EIGHT_BIT_BPD_OFFSET``) turns it into a bound on
  ``-log2 P(k) / D`` in expectation over the dequantisation noise.

With ``data="continuous"`` both are bounds on ``-log p(x)`` of continuous data (the discrete bound's ``L_0`` is
then the Gaussian density ``N(x_0; mean, sigma_1^2)``).
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from .likelihood import (DATA_TYPES, EIGHT_BIT_BPD_OFFSET, _check_batch, _check_choice, _fail, _resolve_sampling_eps,
                         eight_bit_levels)
from .score_function import ScoreFunction
from .sde import SDE, VPSDE, InterpolatedBetaSchedule, broadcast_like

VARIANCE_TYPES = ("fixed_large", "fixed_small", "learned_range")
BOUNDS = ("ddpm", "continuous")
#: half the width of an 8-bit bin in ``2 k / 255 - 1`` units
EIGHT_BIT_HALF_BIN = 1.0 / 255


@dataclass
class VariationalBoundOutput:
    """Per-example results (float64 tensors of shape ``(batch,)``); the three terms add up to ``bits_per_dim``.

    Attributes:
        bits_per_dim: the bound in bits per dimension (see the module docstring for ``data``).
        prior_bpd: ``L_T``, the KL of the forward process's end from the prior.
        diffusion_bpd: the sum of the ``L_(t-1)`` (discrete) or the integral over ``[eps, 1]`` (continuous).
        reconstruction_bpd: ``L_0``, the decoder's negative log-likelihood (with the 8-bit offset for the
            continuous bound on dequantised data).
        standard_error_bpd: standard error of ``bits_per_dim`` over the random times, or ``None`` when every term
            was computed (the remaining randomness, one forward-noise draw per term, is not estimated).
        nfe: network evaluations per example.
    """

    bits_per_dim: torch.Tensor
    prior_bpd: torch.Tensor
    diffusion_bpd: torch.Tensor
    reconstruction_bpd: torch.Tensor
    standard_error_bpd: Optional[torch.Tensor]
    nfe: int


def to_bin_centres(images: torch.Tensor) -> torch.Tensor:
    """8-bit images (uint8, or floats holding the integers 0..255) to ``2 k / 255 - 1`` in [-1, 1] (float32), the
    scaling diffusers trains DDPMs on; use with ``ddpm_variational_bound(..., data="8bit")``."""
    return eight_bit_levels(images) * (2.0 / 255) - 1


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``log P(k)`` per entry (float64) of DDPM's decoder: the ``N(mean, std^2)`` mass of the bin of
    ``x = 2 k / 255 - 1``, ``[x - 1/255, x + 1/255]``, with the bins of ``k = 0`` and ``k = 255`` open outwards."""
    x, mean, std = x.to(torch.float64), mean.to(torch.float64), std.to(torch.float64)
    lower = torch.where(x < -1 + EIGHT_BIT_HALF_BIN, -math.inf, (x - EIGHT_BIT_HALF_BIN - mean) / std)
    upper = torch.where(x > 1 - EIGHT_BIT_HALF_BIN, math.inf, (x + EIGHT_BIT_HALF_BIN - mean) / std)
    # a bin far in the right tail has Phi(upper) - Phi(lower) = 1 - 1 in floating point: mirror it to the left
    mirror = lower > 0
    lower, upper = torch.where(mirror, -upper, lower), torch.where(mirror, -lower, upper)
    log_upper, log_lower = torch.special.log_ndtr(upper), torch.special.log_ndtr(lower)
    return log_upper + torch.log1p(-torch.exp(log_lower - log_upper))


def prior_kl(sde: SDE, x: torch.Tensor) -> torch.Tensor:
    """``KL(q(x_1 | x) || prior)`` per example (nats, float64): ``q = N(a_1 x, sigma_1^2 I)``, the prior
    ``N(0, prior_std^2 I)``."""
    a, sigma = (value.item() for value in sde.marginal(1.0))
    variance_ratio = sigma**2 / sde.prior_std**2
    x = x.to(torch.float64).flatten(1)
    dim = x.shape[1]
    return 0.5 * (dim * (variance_ratio - 1 - math.log(variance_ratio)) + (a * x).pow(2).sum(1) / sde.prior_std**2)


def _denoising_errors(score_fn: ScoreFunction, x: torch.Tensor, times: torch.Tensor, batch_size: int,
                      generator: Optional[torch.Generator], split_output: bool):
    """For every example ``x[b]`` and each of its times ``times[b, k]``: draw ``z``, form ``x_t = a x + sigma z`` and
    return ``eps_theta(x_t, t) - z`` (float64, shape ``(batch, K, ...)``), ``|z|^2`` (shape ``(batch, K)``) and,
    with ``split_output``, the second half of the model's channels (its variance output ``v``), else ``None``.

    The ``batch * K`` network inputs are evaluated ``batch_size`` at a time; the noise is drawn on the CPU in that
    order, so a seed gives the same result on any device.
    """
    num_examples, num_times = times.shape
    flat_times = times.reshape(-1)
    errors, noise_norms, variance_outputs = [], [], []
    for start in range(0, len(flat_times), batch_size):
        t = flat_times[start : start + batch_size]
        x_0 = x[torch.arange(start, start + len(t), device=x.device) // num_times].to(torch.float64)
        noise = torch.randn(x_0.shape, generator=generator, dtype=torch.float64).to(x.device)
        a, sigma = score_fn.sde.marginal(t)
        x_t = (broadcast_like(a, x_0) * x_0 + broadcast_like(sigma, x_0) * noise).to(x.dtype)
        with torch.no_grad():
            output = score_fn.model_output(x_t, t)
        if split_output:
            if output.shape[1] != 2 * x.shape[1]:
                _fail("variance_type", "learned_range", f"the model outputs {output.shape[1]} channels for "
                      f"{x.shape[1]}; a learned-range model outputs twice the input's channels (eps, then v)")
            output, variance_output = output.chunk(2, dim=1)
            variance_outputs.append(variance_output.to(torch.float64))
        epsilon, _ = score_fn.epsilon_and_sample(x_t, t, model_output=output)
        errors.append(epsilon.to(torch.float64) - noise)
        noise_norms.append(noise.flatten(1).pow(2).sum(1))
    shape = (num_examples, num_times, *x.shape[1:])
    variance_output = torch.cat(variance_outputs).reshape(shape) if split_output else None
    return torch.cat(errors).reshape(shape), torch.cat(noise_norms).reshape(times.shape), variance_output


def _check_common(x, data, num_time_samples, batch_size):
    _check_batch("x", x)
    _check_choice("data", data, DATA_TYPES)
    if num_time_samples is not None and not (isinstance(num_time_samples, int) and num_time_samples >= 2):
        _fail("num_time_samples", num_time_samples, "it must be an int >= 2 (two draws give a standard error)")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        _fail("batch_size", batch_size, "it must be a positive int")


def is_ddpm_schedule(sde: SDE) -> bool:
    """Whether ``sde`` is a VP SDE built from a discrete DDPM schedule, which the discrete bound needs."""
    return isinstance(sde, VPSDE) and isinstance(getattr(sde, "schedule", None), InterpolatedBetaSchedule)


def _output(prior, diffusion, reconstruction, standard_error, num_dims, nfe) -> VariationalBoundOutput:
    to_bpd = 1.0 / (num_dims * math.log(2))
    return VariationalBoundOutput(
        bits_per_dim=(prior + diffusion + reconstruction) * to_bpd,
        prior_bpd=prior * to_bpd,
        diffusion_bpd=diffusion * to_bpd,
        reconstruction_bpd=reconstruction * to_bpd,
        standard_error_bpd=None if standard_error is None else standard_error * to_bpd,
        nfe=nfe,
    )


def ddpm_variational_bound(
    score_fn: ScoreFunction,
    x: torch.Tensor,
    *,
    variance_type: str = "fixed_large",
    data: str = "continuous",
    num_time_samples: Optional[int] = None,
    batch_size: int = 256,
    generator: Optional[torch.Generator] = None,
) -> VariationalBoundOutput:
    """DDPM's bound ``L_T + sum L_(t-1) + L_0`` per example (see the module docstring).

    Args:
        score_fn: a model on a VP SDE built from a DDPM schedule (``VPSDE.from_ddpm_schedule`` or a scheduler
            with a ``beta_schedule``), whose ``N`` training steps are the chain's steps.
        x: a batch in the model's space; with ``data="8bit"`` on the grid ``2 k / 255 - 1`` (``to_bin_centres``).
        variance_type: ``"fixed_large"``, ``"fixed_small"`` or ``"learned_range"`` (see the module docstring).
        data: ``"continuous"`` (Gaussian decoder density) or ``"8bit"`` (discretised Gaussian decoder).
        num_time_samples: ``None`` computes all ``N - 1`` terms ``L_(t-1)``; an int ``K >= 2`` draws ``K`` of them
            per example uniformly (with replacement) and reports ``(N - 1)`` times their mean, an unbiased
            estimate of the sum, with its standard error. ``L_0`` and ``L_T`` are always computed.
        batch_size: network inputs per model call (examples times timesteps are flattened into one batch).
        generator: draws the timesteps and the forward noise (on the CPU).
    """
    _check_common(x, data, num_time_samples, batch_size)
    _check_choice("variance_type", variance_type, VARIANCE_TYPES)
    sde = score_fn.sde
    if not is_ddpm_schedule(sde):
        _fail("score_fn.sde", sde, "the discrete bound needs a VP SDE built from a DDPM schedule "
              "(VPSDE.from_ddpm_schedule, or a scheduler config with beta_schedule); use continuous_variational_bound")
    if data == "8bit":
        levels = (x.to(torch.float64) + 1) * 255 / 2
        if not ((levels - levels.round()).abs().max() < 1e-3 and -1e-3 < levels.min() and levels.max() < 255 + 1e-3):
            _fail("x", "values off the 8-bit grid", 'data="8bit" needs to_bin_centres(images) = 2 k / 255 - 1')

    # the chain's coefficients at the N knots t_i = i / (N - 1), where the SDE's marginals are the schedule's
    num_steps = sde.schedule.num_knots
    knots = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    a, sigma = sde.marginal(knots)
    alpha_bar = a**2
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    beta = 1 - alpha_bar / alpha_bar_prev
    posterior_variance = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)
    log_posterior_variance = torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log()
    # the posterior mean's coefficient of x_0, times x_0 - x0_hat = (sigma / a) (eps_theta - z), is the mean error
    mean_error_scale = alpha_bar_prev.sqrt() * beta / (1 - alpha_bar) * sigma / a

    num_examples = x.shape[0]
    if num_time_samples is None:
        steps = torch.arange(1, num_steps).expand(num_examples, -1)
    else:
        steps = torch.randint(1, num_steps, (num_examples, num_time_samples), generator=generator)
    # column 0 is step 0, the decoder's
    steps = torch.cat([torch.zeros(num_examples, 1, dtype=torch.long), steps], dim=1)
    errors, _, variance_output = _denoising_errors(
        score_fn, x, knots[steps].to(x.device), batch_size, generator, split_output=variance_type == "learned_range"
    )
    steps = steps.to(x.device)

    def per_entry(coefficient):
        return coefficient.to(x.device)[steps].reshape(*steps.shape, *([1] * (x.ndim - 1)))

    if variance_type == "fixed_large":
        log_variance = per_entry(beta.log())
    elif variance_type == "fixed_small":
        log_variance = per_entry(log_posterior_variance)
    else:
        fraction = (variance_output + 1) / 2
        log_variance = fraction * per_entry(beta.log()) + (1 - fraction) * per_entry(log_posterior_variance)
    mean_error = per_entry(mean_error_scale) * errors

    variance_log_ratio = log_variance - per_entry(log_posterior_variance)
    kl = 0.5 * (variance_log_ratio + torch.exp(-variance_log_ratio) - 1 + mean_error.pow(2) * torch.exp(-log_variance))
    kl = kl[:, 1:].flatten(2).sum(2)
    if num_time_samples is None:
        diffusion, standard_error = kl.sum(1), None
    else:
        diffusion = (num_steps - 1) * kl.mean(1)
        standard_error = (num_steps - 1) * kl.std(1) / math.sqrt(num_time_samples)

    # the decoder's mean is x0_hat (step 0's posterior mean is x_0 itself): x_0 - mean_error
    decoder_error, decoder_log_variance = mean_error[:, 0], log_variance[:, 0].expand_as(mean_error[:, 0])
    if data == "8bit":
        x_0 = x.to(torch.float64)
        log_probability = discretized_gaussian_log_likelihood(x_0, x_0 - decoder_error, (0.5 * decoder_log_variance).exp())
        reconstruction = -log_probability.flatten(1).sum(1)
    else:
        nll = 0.5 * (math.log(2 * math.pi) + decoder_log_variance + decoder_error.pow(2) * torch.exp(-decoder_log_variance))
        reconstruction = nll.flatten(1).sum(1)
    return _output(prior_kl(sde, x), diffusion, reconstruction, standard_error, x[0].numel(), steps.shape[1])


def continuous_variational_bound(
    score_fn: ScoreFunction,
    x: torch.Tensor,
    *,
    num_time_samples: int = 64,
    importance_sampling: bool = True,
    sampling_eps: Optional[float] = None,
    data: str = "continuous",
    batch_size: int = 256,
    generator: Optional[torch.Generator] = None,
) -> VariationalBoundOutput:
    """The continuous-time bound (see the module docstring) per example, for any SDE.

    Args:
        score_fn: the model with its SDE and conventions.
        x: a batch in the model's space; with ``data="8bit"``, ``dequantize_and_scale(images)``.
        num_time_samples: Monte Carlo draws of ``t`` per example, an even number: two in each of
            ``num_time_samples / 2`` equal strata of the proposal's range (stratification removes most of the
            variation of the integrand over ``t``; the pairs estimate the standard error).
        importance_sampling: draw ``t`` with density proportional to ``g^2 / sigma^2`` (``log SNR`` uniform,
            the likelihood-weighted training's proposal, drawn exactly by inverting ``log SNR``); otherwise
            uniform on ``[eps, 1]`` with the weight in the integrand (far noisier on VP and sub-VP).
        sampling_eps: lower end of the integral (default ``default_sampling_eps``), where the decoder sits.
        data: ``"continuous"`` or ``"8bit"`` (adds ``likelihood.EIGHT_BIT_BPD_OFFSET`` bits/dim, as
            ``log_likelihood`` does).
        batch_size: network inputs per model call.
        generator: draws the times and the forward noise (on the CPU).
    """
    _check_common(x, data, num_time_samples, batch_size)
    if num_time_samples % 2:
        _fail("num_time_samples", num_time_samples, "it must be even (two draws per stratum)")
    if data == "8bit" and not -1 <= x.min().item() <= x.max().item() <= 1:
        _fail("x", f"values in [{x.min().item()}, {x.max().item()}]", 'data="8bit" needs dequantize_and_scale\'s [-1, 1] range')
    sde = score_fn.sde
    eps = _resolve_sampling_eps(sde, sampling_eps)
    num_examples, num_dims = x.shape[0], x[0].numel()

    # stratified: two independent draws in each of K / 2 equal strata of [0, 1), which estimates the variance
    num_strata = num_time_samples // 2
    offsets = torch.rand(num_examples, num_strata, 2, generator=generator, dtype=torch.float64)
    uniform = ((torch.arange(num_strata, dtype=torch.float64)[:, None] + offsets) / num_strata).flatten(1)
    if importance_sampling:
        log_snr_end, log_snr_start = sde.log_snr(1.0).item(), sde.log_snr(eps).item()
        times = sde.t_from_log_snr(log_snr_start + uniform * (log_snr_end - log_snr_start))
        # int_eps^1 g^2 / sigma^2 dt = log SNR(eps) - log SNR(1), SNR = (a / sigma)^2
        weight = torch.full_like(times, 2 * (log_snr_start - log_snr_end))
    else:
        times = eps + (1 - eps) * uniform
        weight = (1 - eps) * sde.diffusion_squared(times) / sde.sigma(times) ** 2
    errors, noise_norms, _ = _denoising_errors(score_fn, x, times.to(x.device), batch_size, generator, split_output=False)
    # control variate: E|z|^2 = D, so subtracting c (|z|^2 - D) keeps the estimate unbiased for any c(t). Where
    # the data is resolved eps_theta -> 0 and |eps_theta - z|^2 -> |z|^2, whose chi-square noise (variance 2D)
    # would dominate; c = (a^2 / (a^2 + sigma^2))^2, the coefficient of |z|^2 for unit-variance Gaussian data,
    # removes it there and leaves the noisy end alone
    a, sigma = sde.marginal(times)
    control = (a**2 / (a**2 + sigma**2)) ** 2 * (noise_norms.cpu() - num_dims)
    terms = 0.5 * weight.to(x.device) * (errors.flatten(2).pow(2).sum(2) - control.to(x.device))
    pairs = terms.reshape(num_examples, num_strata, 2)
    diffusion = pairs.mean((1, 2))
    # each stratum's mean has variance (y_1 - y_2)^2 / 4 (unbiased), the mean of the strata 1 / num_strata^2 of
    # their sum
    standard_error = (pairs[..., 0] - pairs[..., 1]).pow(2).sum(1).sqrt() / (2 * num_strata)

    a_eps, sigma_eps = (value.item() for value in sde.marginal(eps))
    decoder_entropy = 0.5 * num_dims * (math.log(2 * math.pi * sigma_eps**2 / a_eps**2) + 1)
    offset = EIGHT_BIT_BPD_OFFSET * num_dims * math.log(2) if data == "8bit" else 0.0
    reconstruction = torch.full_like(diffusion, decoder_entropy + offset)
    return _output(prior_kl(sde, x), diffusion, reconstruction, standard_error, num_dims, num_time_samples)


def bound_metric(pipe, examples: torch.Tensor, *, normalization: Optional[Dict[str, List[float]]] = None,
                 seed: int = 0, num_time_samples: Optional[int] = None) -> str:
    """The variational bound's bits/dim of ``examples`` as a model-card line, next to ``likelihood_metric``'s ODE
    figure: uint8 images are 8-bit data, float points are in the model's space and, with the ``normalization``
    they were standardised with, reported in data units (``-log p_data = -log p_model + sum(log std)``)."""
    if len(examples) == 0:
        return "not measured"
    if pipe.unet.config.get("num_class_embeds") is not None:
        return "not measured (class-conditional model)"
    result = pipe.variational_bound(examples, num_time_samples=num_time_samples,
                                    generator=torch.Generator().manual_seed(seed))
    bits, num_dims = result.bits_per_dim, examples[0].numel()
    if normalization is not None:
        bits = bits + torch.tensor(normalization["std"], dtype=torch.float64).log().sum() / (num_dims * math.log(2))
    name = "DDPM bound" if is_ddpm_schedule(pipe.scheduler.sde) else "continuous-time bound"
    if result.standard_error_bpd is None:
        spread, terms = "", f"all {result.nfe - 1} terms"
    else:
        # the mean's standard error: the examples' times are independent
        spread = f" ± {result.standard_error_bpd.pow(2).mean().sqrt().item() / math.sqrt(len(examples)):.3f}"
        terms = f"{result.nfe} times per example"
    kind = "8-bit" if examples.dtype == torch.uint8 else "continuous" + (", in data units" if normalization else "")
    return f"{bits.mean().item():.3f}{spread} ({kind}, {len(examples)} examples, {name}, {terms})"
