"""Exact likelihood, encoding and adaptive sampling with the probability-flow ODE (GitHub issue #4).

Every SDE here has the probability-flow ODE

    dx/dt = f(t) x - 0.5 g(t)^2 score(x, t),

a deterministic flow whose marginals are the SDE's. Along it the log-density obeys the instantaneous change of
variables ``d log p_t(x_t) / dt = -div(drift)``, so integrating ``[x, delta_log_p]`` from ``t = eps`` to 1 gives

    log p_eps(x) = prior_log_prob(x_1) + integral_eps^1 div(drift)(x_t, t) dt.

The solves use an adaptive Dormand-Prince 5(4) solver (``ode_solver``) on the input's device; the solver state is
float64 (tolerances of 1e-5 on a log-density of thousands of nats need it) while the network is called in the
input's dtype, as score_sde does with its float64 NumPy state. Everything goes through ``ScoreFunction``, so any
SDE, prediction type and timestep convention works.
"""

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch

from .ode_solver import dormand_prince, rms
from .score_function import ScoreFunction
from .sde import SDE, broadcast_like, default_sampling_eps

DIVERGENCES = ("hutchinson", "exact")
PROBES = ("rademacher", "gaussian")
DATA_TYPES = ("continuous", "8bit")
# adaptive solvers: Dormand-Prince 5(4), ``ode_solver.dormand_prince``
METHODS = ("dopri5",)

# 8-bit data: log2 of the bin count (256) minus log2 of dy/dx (2) for y = 2x - 1; see ``log_likelihood``
EIGHT_BIT_BPD_OFFSET = 8.0 - 1.0


@dataclass
class LikelihoodOutput:
    """Per-sample results of ``log_likelihood`` (float64 tensors of shape ``(batch,)`` unless said otherwise).

    Attributes:
        log_likelihood: ``log p_eps(x)`` in nats, the density in the model's space.
        bits_per_dim: bits per dimension under the chosen data convention (see ``log_likelihood``).
        prior_log_prob: log-density of the prior at the latent.
        delta_log_p: ``integral div(drift) dt = log p_eps(x) - log p_1(x_1)``.
        latent: the state at ``t = 1`` (input's shape and dtype).
        nfe: number of drift evaluations (network forward passes).
    """

    log_likelihood: torch.Tensor
    bits_per_dim: torch.Tensor
    prior_log_prob: torch.Tensor
    delta_log_p: torch.Tensor
    latent: torch.Tensor
    nfe: int


class FlowOutput(NamedTuple):
    """Where a probability-flow solve ended (data or latent, in the input's dtype) and what it cost."""

    x: torch.Tensor
    nfe: int


def _fail(name: str, value, allowed: str):
    raise ValueError(f"{name}={value!r} is not supported; {allowed}.")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        _fail(name, value, f"choose one of {tuple(choices)}")


def _check_batch(name: str, x) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
        description = f"tensor of dtype {x.dtype} and shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x)
        raise ValueError(
            f"{name} must be a floating-point tensor of shape (batch, ...) with at least 2 dimensions, got {description}."
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}): there is nothing to integrate.")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf values.")


def _check_solver(rtol: float, atol: float, method: str) -> None:
    _check_choice("method", method, METHODS)
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not value > 0:
            _fail(name, value, "it must be a positive number")


def _resolve_sampling_eps(sde: SDE, sampling_eps: Optional[float]) -> float:
    if sampling_eps is None:
        return default_sampling_eps(sde)
    if not 0 <= sampling_eps < 1:
        _fail("sampling_eps", sampling_eps, "it must lie in [0, 1)")
    if not sde.sigma(sampling_eps) > 0:
        _fail("sampling_eps", sampling_eps, "sigma(sampling_eps) is 0 for this SDE, where the score is undefined")
    return float(sampling_eps)


def probability_flow_drift(score_fn: ScoreFunction, x: torch.Tensor, t) -> torch.Tensor:
    """``f(t) x - 0.5 g(t)^2 score(x, t)``, the velocity of the probability-flow ODE, in ``x``'s dtype."""
    diffusion_squared = broadcast_like(score_fn.sde.diffusion_squared(t), x)
    return score_fn.sde.drift(x, t) - 0.5 * diffusion_squared * score_fn.score(x, t)


def per_dimension_norm(num_dims: int) -> Callable:
    """The adaptive solver's error norm on ``[x, delta_log_p]``: the larger of the RMS over the entries of
    ``x`` and the RMS over samples of ``delta_log_p / num_dims``.

    Bits/dim divide the log-density by the number of dimensions, so an error of ``num_dims * tol`` nats in
    ``delta_log_p`` costs bits/dim what an error of ``tol`` in one entry of ``x`` costs; the largest RMS of each
    component (torchdiffeq's default) would hold ``delta_log_p`` to ``tol`` nats, ``num_dims`` times tighter than
    bits/dim need, and take more steps for it.
    """

    def norm(state):
        x, delta_log_p = state
        return torch.maximum(rms(x), rms(delta_log_p) / num_dims)

    return norm


def _solve(dynamics: Callable, state, t_start: float, t_end: float, rtol, atol, norm=rms):
    """The state at ``t_end`` and the number of right-hand-side calls."""
    with torch.no_grad():
        end_state, nfe, _, _ = dormand_prince(dynamics, state, t_start, t_end, rtol=rtol, atol=atol, norm=norm)
    return end_state, nfe


def _flow(score_fn: ScoreFunction, x: torch.Tensor, name: str, towards_prior: bool, rtol, atol, method,
          sampling_eps) -> FlowOutput:
    """Carry ``x`` along the probability-flow ODE between ``sampling_eps`` and 1, in either direction."""
    _check_batch(name, x)
    _check_solver(rtol, atol, method)
    eps = _resolve_sampling_eps(score_fn.sde, sampling_eps)
    t_start, t_end = (eps, 1.0) if towards_prior else (1.0, eps)
    model_dtype = x.dtype

    def dynamics(t, state):
        return probability_flow_drift(score_fn, state.to(model_dtype), t).to(state.dtype)

    end, nfe = _solve(dynamics, x.to(torch.float64), t_start, t_end, rtol, atol)
    return FlowOutput(end.to(model_dtype), nfe)


def encode(
    score_fn: ScoreFunction,
    x: torch.Tensor,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    sampling_eps: Optional[float] = None,
) -> FlowOutput:
    """Data ``x`` (taken as a sample at ``t = sampling_eps``) to its latent at ``t = 1``; ``decode`` inverts it."""
    return _flow(score_fn, x, "x", True, rtol, atol, method, sampling_eps)


def decode(
    score_fn: ScoreFunction,
    latent: torch.Tensor,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    sampling_eps: Optional[float] = None,
) -> FlowOutput:
    """A latent at ``t = 1`` to data at ``t = sampling_eps`` (no denoising step, so ``decode(encode(x)) ~ x``)."""
    return _flow(score_fn, latent, "latent", False, rtol, atol, method, sampling_eps)


def ode_sample(
    score_fn: ScoreFunction,
    shape_or_latent: Union[Sequence[int], torch.Tensor],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    sampling_eps: Optional[float] = None,
    denoise_final: bool = True,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float32,
) -> FlowOutput:
    """Adaptive probability-flow sampling from ``t = 1`` to ``sampling_eps``.

    Args:
        shape_or_latent: a shape ``(batch, ...)`` to draw the latent from the prior (with ``generator``,
            ``device``, ``dtype``), or the latent itself.
        denoise_final: end with Tweedie's denoising step ``x_0 = (x + sigma^2 score) / a`` at ``sampling_eps``
            (one more network call), which removes the noise left at ``sigma(sampling_eps)``.
    """
    if isinstance(shape_or_latent, torch.Tensor):
        latent = shape_or_latent
    else:
        shape = tuple(shape_or_latent)
        if len(shape) < 2 or not all(isinstance(size, int) and size > 0 for size in shape):
            _fail("shape_or_latent", shape_or_latent, "give a latent tensor or a shape (batch, ...) of positive ints")
        latent = score_fn.sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)
    samples, nfe = decode(score_fn, latent, rtol=rtol, atol=atol, method=method, sampling_eps=sampling_eps)
    if not denoise_final:
        return FlowOutput(samples, nfe)
    eps = _resolve_sampling_eps(score_fn.sde, sampling_eps)
    with torch.no_grad():
        _, denoised = score_fn.epsilon_and_sample(samples, eps)  # (x - sigma eps) / a = (x + sigma^2 score) / a
    return FlowOutput(denoised, nfe + 1)


def _draw_probes(x: torch.Tensor, num_probes: int, probe: str, generator) -> torch.Tensor:
    """``num_probes`` Hutchinson probes shaped like ``x``: zero mean, identity covariance."""
    shape = (num_probes, *x.shape)
    if probe == "rademacher":
        signs = torch.randint(0, 2, shape, generator=generator, device=x.device)
        return (2 * signs - 1).to(x.dtype)
    return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)


def hutchinson_divergence(probes: torch.Tensor) -> Callable:
    """``div(drift)`` estimated as the mean over probes ``v`` of ``v^T (d drift / dx) v``.

    The probes stay fixed for the whole solve: the integrand is then a smooth function of ``t`` that the
    adaptive solver can integrate, and the result an unbiased estimate of the exact integral.
    """

    def divergence(drift: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        estimates = []
        for index, probe in enumerate(probes):
            (vjp,) = torch.autograd.grad(drift, x, probe, retain_graph=index < len(probes) - 1)
            estimates.append((vjp * probe).flatten(1).sum(1))
        return torch.stack(estimates).mean(0)

    return divergence


def exact_divergence(drift: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``div(drift)`` as the trace of the full Jacobian, one backward pass per dimension (low-dimensional data).

    Summing a drift component over the batch is safe because sample ``i``'s drift depends on ``x_i`` alone.
    """
    flat_drift = drift.flatten(1)
    num_dims = flat_drift.shape[1]
    trace = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for dim in range(num_dims):
        (gradient,) = torch.autograd.grad(flat_drift[:, dim].sum(), x, retain_graph=dim < num_dims - 1)
        trace = trace + gradient.flatten(1)[:, dim]
    return trace


def _augmented_dynamics(score_fn: ScoreFunction, divergence: Callable, model_dtype: torch.dtype) -> Callable:
    """Right-hand side of ``[x, delta_log_p]``: the drift and its divergence."""

    def dynamics(t, state):
        x, _ = state
        with torch.enable_grad():
            x_in = x.detach().to(model_dtype).requires_grad_(True)
            drift = probability_flow_drift(score_fn, x_in, t)
            divergence_estimate = divergence(drift, x_in)
        return drift.detach().to(x.dtype), divergence_estimate.detach().to(x.dtype)

    return dynamics


def bits_per_dim(log_likelihood: torch.Tensor, num_dims: int, data: str = "continuous") -> torch.Tensor:
    """Bits per dimension of a log-density (nats) in the model's space; see ``log_likelihood`` for ``data``."""
    _check_choice("data", data, DATA_TYPES)
    bpd = -log_likelihood / (num_dims * math.log(2))
    return bpd + EIGHT_BIT_BPD_OFFSET if data == "8bit" else bpd


def log_likelihood(
    score_fn: ScoreFunction,
    x: torch.Tensor,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    divergence: str = "hutchinson",
    num_probes: int = 1,
    probe: str = "rademacher",
    sampling_eps: Optional[float] = None,
    data: str = "continuous",
    generator: Optional[torch.Generator] = None,
) -> LikelihoodOutput:
    """``log p_eps(x)`` per sample by integrating the probability-flow ODE and its divergence from eps to 1.

    Args:
        score_fn: the model with its SDE and conventions.
        x: a batch ``(batch, ...)`` in the model's space; it is fed to the network in its own dtype.
        rtol, atol: tolerances of the adaptive solver (on the float64 state ``[x, delta_log_p / D]`` with ``D``
            the dimensions per sample: the log-density's error is held to what bits/dim need, see
            ``per_dimension_norm``).
        method: the adaptive solver, one of ``METHODS``: ``"dopri5"``, Dormand-Prince 5(4) with scipy's step-size
            rules (``ode_solver.dormand_prince``).
        divergence: ``"hutchinson"`` (stochastic trace estimate, one vector-Jacobian product per probe and
            evaluation; unbiased) or ``"exact"`` (full Jacobian trace, one backward pass per dimension).
        num_probes: Hutchinson probes averaged at every evaluation (drawn once, fixed for the solve).
        probe: ``"rademacher"`` (lower variance) or ``"gaussian"``.
        sampling_eps: start time of the flow (default ``default_sampling_eps``): the density reported is that of
            the data perturbed to ``t = sampling_eps``.
        data: how bits/dim are reported.

            - ``"continuous"``: ``x`` is continuous data; ``bpd = -log p(x) / (D log 2)``.
            - ``"8bit"``: ``x = dequantize_and_scale(k)`` for 8-bit data ``k`` in ``{0..255}^D``, i.e.
              ``x_01 = (k + u) / 256`` with ``u ~ U[0, 1)^D`` and ``y = 2 x_01 - 1`` in [-1, 1]. The density of
              ``x_01`` is ``p_y(y) 2^D`` (``dy/dx_01 = 2`` per dimension) and, by Jensen on the bins of width
              1/256, ``log P(k) >= E_u[log p_y(y)] + D log 2 - D log 256``. So the reported
              ``bpd = -log P(k) / (D log 2) = -log p_y(y) / (D log 2) + 7``, an upper bound in expectation
              over ``u`` (score_sde's convention for data centred on [-1, 1]).

        generator: draws the Hutchinson probes.

    Returns:
        ``LikelihoodOutput``; ``log_likelihood`` is always ``log p_eps`` in the model's space (nats, float64).
    """
    _check_batch("x", x)
    _check_solver(rtol, atol, method)
    _check_choice("divergence", divergence, DIVERGENCES)
    _check_choice("probe", probe, PROBES)
    _check_choice("data", data, DATA_TYPES)
    if not isinstance(num_probes, int) or num_probes < 1:
        _fail("num_probes", num_probes, "it must be a positive int")
    if data == "8bit" and not -1 <= x.min().item() <= x.max().item() <= 1:
        _fail("x", f"values in [{x.min().item()}, {x.max().item()}]", 'data="8bit" needs dequantize_and_scale\'s [-1, 1] range')
    eps = _resolve_sampling_eps(score_fn.sde, sampling_eps)

    if divergence == "hutchinson":
        divergence_fn = hutchinson_divergence(_draw_probes(x, num_probes, probe, generator))
    else:
        divergence_fn = exact_divergence
    dynamics = _augmented_dynamics(score_fn, divergence_fn, x.dtype)
    start = (x.to(torch.float64), torch.zeros(x.shape[0], dtype=torch.float64, device=x.device))
    norm = per_dimension_norm(x[0].numel())
    (latent, delta_log_p), nfe = _solve(dynamics, start, eps, 1.0, rtol, atol, norm)

    prior_log_prob = score_fn.sde.prior_log_prob(latent)
    total = prior_log_prob + delta_log_p
    return LikelihoodOutput(
        log_likelihood=total,
        bits_per_dim=bits_per_dim(total, x[0].numel(), data),
        prior_log_prob=prior_log_prob,
        delta_log_p=delta_log_p,
        latent=latent.to(x.dtype),
        nfe=nfe,
    )


def eight_bit_levels(images: torch.Tensor) -> torch.Tensor:
    """8-bit images (uint8, or floats holding the integers 0..255) as float32 levels ``k``, checked."""
    images = torch.as_tensor(images)
    if images.dtype.is_complex or images.dtype == torch.bool:
        _fail("images.dtype", images.dtype, "give uint8 or real-valued integers in [0, 255]")
    levels = images.to(torch.float32)
    if levels.numel() and (levels.min() < 0 or levels.max() > 255 or not torch.equal(levels, levels.round())):
        _fail("images", f"values in [{levels.min().item()}, {levels.max().item()}]", "give integers in [0, 255]")
    return levels


def dequantize_and_scale(images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """8-bit images (uint8, or floats holding the integers 0..255) to ``2 (k + u) / 256 - 1`` in [-1, 1]
    (float32), with uniform dequantisation noise ``u ~ U[0, 1)``; use with ``log_likelihood(..., data="8bit")``."""
    levels = eight_bit_levels(images)
    noise = torch.rand(levels.shape, generator=generator, device=levels.device, dtype=torch.float32)
    return 2 * (levels + noise) / 256 - 1
