"""The update rules of the samplers, each a few lines, written against marginal coefficients.

Notation: a step goes from a noisier level ``hi`` (time ``t_hi``, coefficients ``a_hi``, ``sigma_hi``) to a
cleaner level ``lo``. Between two levels every linear SDE has the Gaussian transition

    x_hi = A x_lo + sqrt(B) z,    A = a_hi / a_lo,    B = sigma_hi^2 - A^2 sigma_lo^2,

which is what the discretised ("reverse diffusion", "ancestral") rules use. Coefficients are Python floats;
``x``, ``score``, ``noise``, ... are tensors or, as the schedulers call them once per stage, ``LinearCombination``
symbols (see ``linear_combination``): nothing here but linear arithmetic on them.
"""

import torch


def transition(a_hi: float, sigma_hi: float, a_lo: float, sigma_lo: float):
    """``(A, B)`` of the forward transition from level ``lo`` to level ``hi``."""
    forward_scale = a_hi / a_lo
    return forward_scale, sigma_hi**2 - forward_scale**2 * sigma_lo**2


def euler_maruyama(x, score, drift_coefficient, diffusion_squared, dt, noise):
    """Reverse-time SDE ``dx = [f x - g^2 score] dt + g dw`` with ``dt < 0`` (Song et al. 2021, eq. 6)."""
    x_mean = x + (drift_coefficient * x - diffusion_squared * score) * dt
    return x_mean + (diffusion_squared * -dt) ** 0.5 * noise


def reverse_diffusion(x, score, forward_scale, forward_variance, noise):
    """score_sde's reverse-diffusion predictor: the discretised forward step ``f = (A - 1) x, G^2 = B``
    run backwards, ``x - f + G^2 score``. On VE it is exactly diffusers' ``ScoreSdeVeScheduler.step_pred``."""
    x_mean = (2 - forward_scale) * x + forward_variance * score
    return x_mean + forward_variance**0.5 * noise


def ancestral(x, sample_0, forward_scale, forward_variance, a_lo, sigma_lo, sigma_hi, noise):
    """Sample the Gaussian posterior ``q(x_lo | x_hi, x_0)`` at the predicted ``x_0`` (DDPM's step on VP,
    score_sde's ancestral sampling on VE)."""
    sigma_hi_squared = sigma_hi**2
    x_mean = (forward_scale * sigma_lo**2 / sigma_hi_squared) * x + (a_lo * forward_variance / sigma_hi_squared) * sample_0
    return x_mean + sigma_lo * (forward_variance / sigma_hi_squared) ** 0.5 * noise


def langevin(x, score, step_size, noise):
    """One Langevin MCMC step ``x + step score + sqrt(2 step) z``: the update of NCSN's reference code
    (its paper writes the same step as ``alpha/2`` and ``sqrt(alpha)``)."""
    return x + step_size * score + (2 * step_size) ** 0.5 * noise


def snr_step_size(score, noise, snr, alpha):
    """score_sde's Langevin corrector step ``2 alpha (snr |z| / |score|)^2``, norms averaged over the batch.

    The batch average is what score_sde and diffusers do, and it matters: a per-sample step would depend on
    the current ``x`` through ``|score(x)|``, and Langevin with a state-dependent step no longer leaves the
    target invariant (on a 2-D mixture it inflates the modes' variance many times over). For a step that is
    independent of the batch use the annealed rule ``2 alpha (snr sigma)^2``.
    """
    score_norm = score.flatten(1).norm(dim=1).mean()
    noise_norm = noise.flatten(1).norm(dim=1).mean()
    return 2 * alpha * (snr * noise_norm / score_norm.clamp_min(torch.finfo(score.dtype).tiny)) ** 2


def probability_flow_euler(x, epsilon, a_hi, noise_ratio_hi, a_lo, noise_ratio_lo):
    """One Euler step of the probability-flow ODE in ``y = x / a`` and ``s = sigma / a``.

    For every linear SDE the probability-flow ODE ``dx/dt = f x - g^2 score / 2`` becomes ``dy/ds = eps`` in
    these variables (Karras et al. 2022), so Euler there integrates the linear part exactly: it is DDIM on VP.
    """
    return a_lo * (x / a_hi + (noise_ratio_lo - noise_ratio_hi) * epsilon)


def probability_flow_heun_correction(x, sample_0, start_sample_0, a, noise_ratio, start_noise_ratio):
    """Heun's correction of the Euler step above that went from ``s_start`` to ``s`` and gave ``x``:
    ``x + a (s - s_start) (eps - eps_start) / 2``. Along that Euler step the ``x_0`` estimate is constant, so
    ``eps_start = (x - a x_0_start) / sigma`` and the correction reads ``x + a (s - s_start) / (2 s)
    (x_0_start - x_0)``: with ``x_0_start = x_0`` (no start known) it keeps the Euler step."""
    return x + (a * (noise_ratio - start_noise_ratio) / (2 * noise_ratio)) * (start_sample_0 - sample_0)


def probability_flow_data_step(x, sample_0, sigma_hi, noise_ratio_hi, a_lo, sigma_lo, noise_ratio_lo):
    """The same ODE step written for an ``x_0`` estimate held fixed over the step (DPM-Solver++, Lu et al. 2022):
    ``x_lo = (sigma_lo / sigma_hi) x + a_lo (1 - s_lo / s_hi) x_0``. With the model's own ``x_0`` it is the Euler
    step above; with an ``x_0`` extrapolated from the previous step it is second order (DPM-Solver++ 2M)."""
    return (sigma_lo / sigma_hi) * x + a_lo * (1 - noise_ratio_lo / noise_ratio_hi) * sample_0
