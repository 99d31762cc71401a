"""The forward SDEs of score-based generative modelling.

Every SDE here is linear in ``x`` and runs on ``t`` in ``[0, 1]``; its marginal given the data ``x_0`` is

    x_t = a(t) * x_0 + sigma(t) * z,    z ~ N(0, I),

and its drift is ``f(x, t) = f(t) * x`` with diffusion ``g(t)``. Samplers, likelihood and losses are written
against this interface (``marginal``, ``drift``, ``diffusion``, ``prior_sampling``, ``prior_log_prob``), never
against a particular SDE.

Time arithmetic runs in float64: ``sigma_max / sigma_min`` spans five orders of magnitude and
``1 - alpha_bar`` near ``t = 0`` loses every digit in float32. Functions accept a Python number, a NumPy array
or a tensor for ``t`` and return float64 tensors on ``t``'s device (CPU for numbers); callers cast to the data
dtype at the last moment.
"""

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

TimeLike = Union[float, Sequence[float], np.ndarray, torch.Tensor]


def as_time(t: TimeLike) -> torch.Tensor:
    """``t`` as a float64 tensor (on ``t``'s device when it is a tensor)."""
    if isinstance(t, torch.Tensor):
        return t.to(torch.float64)
    return torch.as_tensor(np.asarray(t, dtype=np.float64))


def _bisect_increasing(fn, target: torch.Tensor, iterations: int = 64) -> torch.Tensor:
    """Solve ``fn(t) = target`` for ``t`` in [0, 1] where ``fn`` increases; clamps outside the range.

    Plain bisection: 64 halvings of [0, 1] reach float64 resolution, and it needs no derivative and no
    host synchronisation.
    """
    lo = torch.zeros_like(target)
    hi = torch.ones_like(target)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        below = fn(mid) < target
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


class SDE:
    """Base class of a linear forward SDE ``dx = f(t) x dt + g(t) dw`` on ``t`` in [0, 1]."""

    #: standard deviation of the prior N(0, prior_std^2 I) at t = 1
    prior_std: float = 1.0

    def marginal(self, t: TimeLike) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(a(t), sigma(t))`` such that ``x_t = a x_0 + sigma z``."""
        raise NotImplementedError

    def drift_coefficient(self, t: TimeLike) -> torch.Tensor:
        """``f(t)`` in the drift ``f(x, t) = f(t) x``."""
        raise NotImplementedError

    def diffusion_squared(self, t: TimeLike) -> torch.Tensor:
        """``g(t)^2``."""
        raise NotImplementedError

    def drift(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """``f(x, t)``."""
        return broadcast_like(self.drift_coefficient(t), x) * x

    def diffusion(self, t: TimeLike) -> torch.Tensor:
        """``g(t)``."""
        return self.diffusion_squared(t).sqrt()

    def sigma(self, t: TimeLike) -> torch.Tensor:
        return self.marginal(t)[1]

    def log_snr(self, t: TimeLike) -> torch.Tensor:
        """``log(a / sigma)``, which decreases with ``t``."""
        a, sigma = self.marginal(t)
        return a.log() - sigma.log()

    def t_from_sigma(self, sigma: TimeLike) -> torch.Tensor:
        """Inverse of ``sigma(t)`` (which increases with ``t``)."""
        return _bisect_increasing(self.sigma, as_time(sigma))

    def t_from_log_snr(self, log_snr: TimeLike) -> torch.Tensor:
        """Inverse of ``log_snr(t)``."""
        return _bisect_increasing(lambda t: -self.log_snr(t), -as_time(log_snr))

    def prior_sampling(self, shape, generator: Optional[torch.Generator] = None, device=None, dtype=None):
        """A draw from the prior ``N(0, prior_std^2 I)``; ``generator`` may be a list, one per sample."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(shape, generator=generator, device=device, dtype=dtype) * self.prior_std

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density of the prior at ``z``, summed over all but the batch dimension (float64)."""
        z = z.to(torch.float64).flatten(1)
        dim = z.shape[1]
        variance = self.prior_std**2
        return -0.5 * dim * math.log(2 * math.pi * variance) - z.pow(2).sum(1) / (2 * variance)


def broadcast_like(coefficient: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample (or scalar) float64 coefficient reshaped and cast to multiply ``x``."""
    coefficient = coefficient.to(device=x.device, dtype=x.dtype)
    if coefficient.ndim == 0:
        return coefficient
    return coefficient.reshape(-1, *([1] * (x.ndim - 1)))


class VESDE(SDE):
    """Variance-exploding SDE (SMLD / NCSN): ``a = 1``, ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``.

    ``g(t)^2 = d sigma^2 / dt = 2 sigma(t)^2 log(sigma_max / sigma_min)`` and ``f = 0``.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not (0 < sigma_min < sigma_max and math.isfinite(sigma_max)):
            raise ValueError(
                f"VESDE needs finite 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}."
            )
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.log_sigma_ratio = math.log(self.sigma_max / self.sigma_min)
        self.prior_std = self.sigma_max

    def marginal(self, t):
        t = as_time(t)
        sigma = self.sigma_min * torch.exp(t * self.log_sigma_ratio)
        return torch.ones_like(sigma), sigma

    def drift_coefficient(self, t):
        return torch.zeros_like(as_time(t))

    def diffusion_squared(self, t):
        return self.dsigma2_dt(t)

    def dsigma2_dt(self, t: TimeLike) -> torch.Tensor:
        """``d sigma^2 / dt``, the VE diffusion squared."""
        return 2 * self.sigma(t) ** 2 * self.log_sigma_ratio

    def t_from_sigma(self, sigma):
        return torch.log(as_time(sigma) / self.sigma_min) / self.log_sigma_ratio

    def __repr__(self):
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class LinearBetaSchedule:
    """Continuous linear ``beta(t) = beta_min + t (beta_max - beta_min)`` (score_sde's VP)."""

    def __init__(self, beta_min: float, beta_max: float):
        if not (0 <= beta_min < beta_max and math.isfinite(beta_max)):
            raise ValueError(f"need finite 0 <= beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}.")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """``-integral_0^t beta``."""
        return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def __repr__(self):
        return f"beta_min={self.beta_min}, beta_max={self.beta_max}"


class InterpolatedBetaSchedule:
    """A discrete DDPM schedule made continuous.

    Training step ``i`` of ``N`` sits at ``t_i = i / (N - 1)`` (so the model's discrete timestep is
    ``t (N - 1)``) and ``log alpha_bar(t_i)`` is exactly ``log alphas_cumprod[i]``. Between the knots,
    ``log alpha_bar`` is a monotone cubic Hermite (Fritsch-Carlson) interpolant: it is C^1, so ``beta(t) =
    -d log alpha_bar / dt`` is continuous and never negative.
    """

    def __init__(self, alphas_cumprod: Union[np.ndarray, torch.Tensor, Sequence[float]]):
        log_alpha_bar = np.log(np.asarray(alphas_cumprod, dtype=np.float64))
        if log_alpha_bar.ndim != 1 or len(log_alpha_bar) < 2:
            raise ValueError("alphas_cumprod must be a 1-D schedule with at least 2 entries.")
        if not np.all(np.isfinite(log_alpha_bar)) or np.any(np.diff(log_alpha_bar) > 0):
            raise ValueError("alphas_cumprod must be positive, finite and non-increasing.")
        self.num_knots = len(log_alpha_bar)
        self.spacing = 1.0 / (self.num_knots - 1)
        secants = np.diff(log_alpha_bar) / self.spacing
        slopes = np.empty_like(log_alpha_bar)
        slopes[0], slopes[-1] = secants[0], secants[-1]
        left, right = secants[:-1], secants[1:]
        same_sign = left * right > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            harmonic = 2.0 / (1.0 / left + 1.0 / right)
        slopes[1:-1] = np.where(same_sign, harmonic, 0.0)
        self._values = torch.from_numpy(log_alpha_bar)
        self._slopes = torch.from_numpy(slopes)

    def _segment(self, t: torch.Tensor):
        values, slopes = self._values.to(t.device), self._slopes.to(t.device)
        index = torch.clamp(torch.floor(t / self.spacing), 0, self.num_knots - 2).long()
        s = t / self.spacing - index
        return s, values[index], values[index + 1], slopes[index] * self.spacing, slopes[index + 1] * self.spacing

    def log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        s, y0, y1, m0, m1 = self._segment(t)
        s2, s3 = s * s, s * s * s
        return (2 * s3 - 3 * s2 + 1) * y0 + (s3 - 2 * s2 + s) * m0 + (3 * s2 - 2 * s3) * y1 + (s3 - s2) * m1

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        s, y0, y1, m0, m1 = self._segment(t)
        s2 = s * s
        derivative = (6 * s2 - 6 * s) * (y0 - y1) + (3 * s2 - 4 * s + 1) * m0 + (3 * s2 - 2 * s) * m1
        return -derivative / self.spacing

    def __repr__(self):
        return f"discrete schedule with {self.num_knots} steps"


def ddpm_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """``alphas_cumprod`` of a diffusers DDPM schedule, computed by diffusers itself so the two never drift."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule=beta_schedule,
        trained_betas=trained_betas,
    )
    return scheduler.alphas_cumprod.to(torch.float64)


class _BetaSDE(SDE):
    """Shared parts of VP and sub-VP: ``f(t) = -beta(t) / 2`` and ``a(t) = exp(log_alpha_bar(t) / 2)``."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.schedule = LinearBetaSchedule(beta_min, beta_max)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod):
        """The SDE whose marginals reproduce a discrete schedule at its training timesteps."""
        sde = cls.__new__(cls)
        sde.schedule = InterpolatedBetaSchedule(alphas_cumprod)
        return sde

    @classmethod
    def from_ddpm_schedule(cls, **ddpm_schedule_kwargs):
        """From diffusers' DDPM schedule keys (``num_train_timesteps``, ``beta_start``, ``beta_end``,
        ``beta_schedule``, ``trained_betas``)."""
        return cls.from_alphas_cumprod(ddpm_alphas_cumprod(**ddpm_schedule_kwargs))

    def beta(self, t: TimeLike) -> torch.Tensor:
        return self.schedule.beta(as_time(t))

    def log_alpha_bar(self, t: TimeLike) -> torch.Tensor:
        return self.schedule.log_alpha_bar(as_time(t))

    def drift_coefficient(self, t):
        return -0.5 * self.beta(t)

    def __repr__(self):
        return f"{type(self).__name__}({self.schedule})"


class VPSDE(_BetaSDE):
    """Variance-preserving SDE (DDPM): ``sigma^2 = 1 - alpha_bar``, ``g^2 = beta``; prior N(0, I)."""

    def marginal(self, t):
        log_alpha_bar = self.log_alpha_bar(t)
        return torch.exp(0.5 * log_alpha_bar), torch.sqrt(-torch.expm1(log_alpha_bar))

    def diffusion_squared(self, t):
        return self.beta(t)


class SubVPSDE(_BetaSDE):
    """Sub-VP SDE (Song et al. 2021): ``sigma = 1 - alpha_bar``, ``g^2 = beta (1 - alpha_bar^2)``; prior N(0, I)."""

    def marginal(self, t):
        log_alpha_bar = self.log_alpha_bar(t)
        return torch.exp(0.5 * log_alpha_bar), -torch.expm1(log_alpha_bar)

    def diffusion_squared(self, t):
        return -self.beta(t) * torch.expm1(2 * self.log_alpha_bar(t))


SDE_TYPES = ("ve", "vp", "subvp")


def default_sampling_eps(sde: SDE) -> float:
    """Where sampling, training and the likelihood flow stop short of ``t = 0`` (score_sde's choices): 1e-5 on
    VE, 1e-3 on a continuous VP / sub-VP (where ``sigma(0) = 0`` and the score blows up), and 0 on a discrete DDPM
    schedule made continuous (its first training step already has ``sigma > 0``)."""
    if isinstance(sde, VESDE):
        return 1e-5
    if isinstance(getattr(sde, "schedule", None), InterpolatedBetaSchedule):
        return 0.0
    return 1e-3


def build_sde(
    sde_type: str,
    sigma_min: float = 0.01,
    sigma_max: float = 50.0,
    beta_min: float = 0.1,
    beta_max: float = 20.0,
    beta_schedule: Optional[str] = None,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    trained_betas: Optional[Sequence[float]] = None,
) -> SDE:
    """The SDE a scheduler, pipeline or loss config describes.

    For ``"vp"`` and ``"subvp"``, ``beta_schedule=None`` (and no ``trained_betas``) means the continuous linear
    ``beta(t)`` from ``beta_min`` to ``beta_max``; a DDPM ``beta_schedule`` name or ``trained_betas`` means that
    discrete schedule made continuous (see ``InterpolatedBetaSchedule``).
    """
    if sde_type == "ve":
        return VESDE(sigma_min, sigma_max)
    if sde_type in ("vp", "subvp"):
        cls = VPSDE if sde_type == "vp" else SubVPSDE
        if beta_schedule is None and trained_betas is None:
            return cls(beta_min, beta_max)
        return cls.from_ddpm_schedule(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule or "linear",
            trained_betas=trained_betas,
        )
    raise ValueError(f"sde_type={sde_type!r} is not supported; choose one of {SDE_TYPES}.")
