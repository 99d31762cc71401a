"""Training objectives: denoising score matching (continuous and discrete time) and sliced score matching.

Every loss is written in terms of ``ScoreFunction``, so it trains a network of any output convention on any SDE.
With ``x_t = a x_0 + sigma z`` the denoising score-matching target is ``grad log p(x_t | x_0) = -z / sigma``, and

    lambda(t) |s_theta(x_t, t) + z / sigma|^2 = (lambda(t) / sigma^2) |eps_theta(x_t, t) - z|^2,

so the weighting ``lambda(t)`` becomes a weight on the noise-prediction error:

- ``"sigma2"``: ``lambda = sigma^2`` (Song & Ermon; score_sde's default): plain noise-prediction MSE.
- ``"likelihood"``: ``lambda = g(t)^2``, which makes the loss an upper bound on the negative log-likelihood
  (Song et al. 2021, "Maximum likelihood training of score-based diffusion models"); with
  ``importance_sampling=True`` time is drawn with density proportional to ``g^2 / sigma^2`` instead, which
  estimates the same objective with far less variance.
- ``"native"``: MSE between the network output and its own target (diffusers' ``train_unconditional`` loss for
  epsilon, v or sample prediction).

Errors are averaged over data dimensions, then over the batch.
"""

import functools
from typing import Optional

import torch

from .parametrization import model_target
from .score_function import ScoreFunction
from .sde import broadcast_like, default_sampling_eps

TIME_SAMPLINGS = ("continuous", "discrete")
WEIGHTINGS = ("sigma2", "likelihood", "native")


class _ImportanceSampler:
    """Draws ``t`` in [eps, 1] with density ``g(t)^2 / sigma(t)^2 / Z`` by inverting its tabulated CDF."""

    def __init__(self, sde, sampling_eps: float, num_points: int = 10_000):
        times = torch.linspace(sampling_eps, 1.0, num_points, dtype=torch.float64)
        density = sde.diffusion_squared(times) / sde.sigma(times) ** 2
        increments = 0.5 * (density[1:] + density[:-1]) * (times[1:] - times[:-1])
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), increments.cumsum(0)])
        self.normaliser = cdf[-1].item()
        self.times, self.cdf = times, cdf / cdf[-1]

    def sample(self, shape, generator, device) -> torch.Tensor:
        u = torch.rand(shape, generator=generator, dtype=torch.float64)
        index = torch.searchsorted(self.cdf, u).clamp(1, len(self.cdf) - 1)
        lo, hi = self.cdf[index - 1], self.cdf[index]
        fraction = (u - lo) / (hi - lo).clamp_min(1e-300)
        t = self.times[index - 1] + fraction * (self.times[index] - self.times[index - 1])
        return t.to(device)


@functools.lru_cache(maxsize=16)
def _importance_sampler(sde, sampling_eps):
    return _ImportanceSampler(sde, sampling_eps)


def sample_time(score_fn: ScoreFunction, batch_size: int, *, time_sampling="continuous", sampling_eps=None,
                importance_sampling=False, generator=None, device=None) -> torch.Tensor:
    """Training times (float64): ``U(eps, 1)``, the discrete training steps ``i / (N - 1)``, or importance-sampled."""
    if time_sampling not in TIME_SAMPLINGS:
        raise ValueError(f"time_sampling={time_sampling!r} is not supported; choose one of {TIME_SAMPLINGS}.")
    eps = default_sampling_eps(score_fn.sde) if sampling_eps is None else sampling_eps
    if importance_sampling:
        if time_sampling != "continuous":
            raise ValueError("importance_sampling needs time_sampling='continuous'.")
        return _importance_sampler(score_fn.sde, eps).sample((batch_size,), generator, device)
    if time_sampling == "discrete":
        # SMLD's noise levels on VE, DDPM's training steps on a VP built from a DDPM schedule
        steps = score_fn.num_train_timesteps
        index = torch.randint(0, steps, (batch_size,), generator=generator)
        return (index.to(torch.float64) / (steps - 1)).to(device)
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    return (eps + (1 - eps) * u).to(device)


def denoising_score_matching_loss(
    score_fn: ScoreFunction,
    x0: torch.Tensor,
    *,
    time_sampling: str = "continuous",
    weighting: str = "sigma2",
    importance_sampling: bool = False,
    sampling_eps: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    class_labels: Optional[torch.Tensor] = None,
    t: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Denoising score matching for ``score_fn``'s network on data ``x0`` (see the module docstring).

    ``t`` and ``noise`` may be given (e.g. to evaluate the loss at fixed times); otherwise they are drawn with
    ``generator`` (on the CPU, then moved, so a seed gives the same draws on any device).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} is not supported; choose one of {WEIGHTINGS}.")
    if importance_sampling and weighting != "likelihood":
        raise ValueError("importance_sampling draws time for the likelihood weighting: use weighting='likelihood'.")
    if t is None:
        t = sample_time(score_fn, x0.shape[0], time_sampling=time_sampling, sampling_eps=sampling_eps,
                        importance_sampling=importance_sampling, generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    a, sigma = score_fn.sde.marginal(t)
    a, sigma = broadcast_like(a, x0), broadcast_like(sigma, x0)
    x_t = a * x0 + sigma * noise
    model_kwargs = {} if class_labels is None else {"class_labels": class_labels}
    model_output = score_fn.model_output(x_t, t, **model_kwargs)

    if weighting == "native":
        target = model_target(x0, noise, a, sigma, score_fn.prediction_type)
        return (model_output.float() - target.float()).pow(2).flatten(1).mean(1).mean()
    epsilon, _ = score_fn.epsilon_and_sample(x_t, t, model_output=model_output)
    per_sample = (epsilon.float() - noise.float()).pow(2).flatten(1).mean(1)
    if weighting == "likelihood":
        if importance_sampling:
            eps = default_sampling_eps(score_fn.sde) if sampling_eps is None else sampling_eps
            # E_q[err] * Z estimates the integral of g^2/sigma^2 err over [eps, 1]; divide by the interval
            # length so it matches the uniform-time estimate of the same objective
            per_sample = per_sample * (_importance_sampler(score_fn.sde, eps).normaliser / (1 - eps))
        else:
            per_sample = per_sample * (score_fn.sde.diffusion_squared(t) / score_fn.sde.sigma(t) ** 2).to(per_sample)
    return per_sample.mean()


def sliced_score_matching_loss(
    score_fn: ScoreFunction,
    x0: torch.Tensor,
    *,
    num_projections: int = 1,
    variance_reduced: bool = True,
    sampling_eps: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    t: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sliced score matching (Song et al. 2019) of the perturbed data at random times, weighted by ``sigma^2``.

    ``E_v[v^T grad_x(v^T s) + (v^T s)^2 / 2]``, or with ``variance_reduced`` the exact second term
    ``|s|^2 / 2``; its minimum is at the true score, where it equals ``-E|grad log p_t|^2 / 2``. Needs a
    double-backward through the network: meant for low-dimensional data.
    """
    if not (isinstance(num_projections, int) and num_projections >= 1):
        raise ValueError(f"num_projections={num_projections!r} is invalid: it must be an integer >= 1.")
    if t is None:
        t = sample_time(score_fn, x0.shape[0], sampling_eps=sampling_eps, generator=generator, device=x0.device)
    a, sigma = score_fn.sde.marginal(t)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_t = (broadcast_like(a, x0) * x0 + broadcast_like(sigma, x0) * noise).detach().requires_grad_(True)
    score = score_fn.score(x_t, t)
    total = 0.0
    for _ in range(num_projections):
        v = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        projection = (v * score).flatten(1).sum(1)
        gradient = torch.autograd.grad(projection.sum(), x_t, create_graph=True)[0]
        divergence_term = (v * gradient).flatten(1).sum(1)
        norm_term = 0.5 * score.pow(2).flatten(1).sum(1) if variance_reduced else 0.5 * projection**2
        total = total + divergence_term + norm_term
    per_sample = total / num_projections * sigma.to(x0.dtype).reshape(-1) ** 2
    return per_sample.mean()
