"""Fixed-step solvers of the probability-flow ODE (Song et al. 2021; Karras et al. 2022)."""

import math
from typing import List, Optional, Sequence

import numpy as np
from diffusers.configuration_utils import register_to_config

from .linear_combination import LinearCombination
from .scheduling_utils import ScoreSchedulerMixin, Stage, _fail
from .sde_updates import probability_flow_data_step, probability_flow_euler, probability_flow_heun_correction

SOLVERS = ("euler", "heun", "dpm_solver_2m")


class ProbabilityFlowODEScheduler(ScoreSchedulerMixin):
    """Deterministic sampling along the probability-flow ODE of the VE, VP or sub-VP SDE.

    Steps are taken in ``y = x / a`` against ``s = sigma / a``, where the ODE of every linear SDE reads
    ``dy/ds = eps(x, t)``: `"euler"` there is DDIM (eta = 0) on VP, `"heun"` is Karras et al.'s second-order
    sampler, and `"dpm_solver_2m"` is Lu et al.'s second-order multistep DPM-Solver++ (2M), which reuses the previous
    step's ``x_0`` estimate instead of a second call. ``set_timesteps(n)`` makes ``n`` levels from ``t = 1`` to
    ``sampling_eps``; NFE = ``n`` with Euler and DPM-Solver++ 2M, and ``2 (n - 1) + 1`` with Heun (two calls per
    step; the last step to clean data is one call); one fewer without ``denoise_final``. Heun's ``order`` is 2:
    ``timesteps[2 k]`` begins the step from level ``k``; a loop begun at a correction entry (``timesteps[2 k - 1]``)
    keeps the Euler step that led there (first order), and DPM-Solver++ 2M begun mid-grid takes a first-order
    (DDIM) step first. The noise it draws is only the initial ``x``, so the map from prior noise to
    sample is deterministic.

    Args:
        sde_type (`str`, defaults to `"vp"`): `"ve"`, `"vp"` or `"subvp"`.
        sigma_min (`float`, defaults to 0.01): VE: ``sigma(0)``.
        sigma_max (`float`, defaults to 50.0): VE: ``sigma(1)`` and the prior's std.
        beta_min (`float`, defaults to 0.1): VP/sub-VP: ``beta(0)`` of the continuous linear schedule.
        beta_max (`float`, defaults to 20.0): VP/sub-VP: ``beta(1)`` of the continuous linear schedule.
        beta_schedule (`str`, *optional*): VP/sub-VP: a diffusers DDPM schedule name instead of the continuous
            schedule.
        beta_start (`float`, defaults to 0.0001): first beta of the DDPM schedule.
        beta_end (`float`, defaults to 0.02): last beta of the DDPM schedule.
        trained_betas (`list` of `float`, *optional*): explicit DDPM betas.
        num_train_timesteps (`int`, defaults to 1000): ``N`` of the DDPM schedule and of ``"discrete"`` timesteps.
        prediction_type (`str`, defaults to `"epsilon"`): `"epsilon"`, `"score"`, `"sample"` or `"v_prediction"`.
        timestep_type (`str`, defaults to `"discrete"`): `"discrete"`, `"continuous"`, `"sigma"` or `"log_sigma"`.
        sampling_eps (`float`, *optional*): last time of the grid (defaults: 1e-5 VE, 1e-3 continuous VP/sub-VP,
            0 on a DDPM schedule).
        solver (`str`, defaults to `"dpm_solver_2m"`): `"euler"` (first order), `"heun"` (second order, two calls
            per step) or `"dpm_solver_2m"` (second order, one call per step; the most accurate per call on the
            exact-score benchmark).
        time_spacing (`str`, defaults to `"log_snr"`): `"uniform"` in ``t``, `"log_snr"` (uniform in log-SNR) or
            `"edm"` (rho-spacing in ``sigma / a``, most steps at low noise).
        edm_rho (`float`, defaults to 7.0): ``rho`` of the `"edm"` spacing.
        denoise_final (`bool`, defaults to `True`): end with the Euler step to ``sigma = 0`` (Tweedie's
            denoising) from the last level.
        fitted_sigmas (`list` of `list` of `float`, *optional*): grids fitted to a model (``calibrate_sigmas``),
            each a decreasing list of ``sigma / a``, at most one per length; ``set_timesteps(n)`` runs the one with
            ``n`` levels, when there is one, instead of ``time_spacing``'s. Add one with
            ``register_fitted_sigmas``; it is saved with the config, so it travels with the pipeline.
    """

    @register_to_config
    def __init__(
        self,
        sde_type: str = "vp",
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        beta_schedule: Optional[str] = None,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        trained_betas: Optional[Sequence[float]] = None,
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        timestep_type: str = "discrete",
        sampling_eps: Optional[float] = None,
        solver: str = "dpm_solver_2m",
        time_spacing: str = "log_snr",
        edm_rho: float = 7.0,
        denoise_final: bool = True,
        fitted_sigmas: Optional[Sequence[Sequence[float]]] = None,
    ):
        if solver not in SOLVERS:
            _fail("solver", solver, f"choose one of {SOLVERS}")
        self.order = 2 if solver == "heun" else 1
        self._setup()
        if fitted_sigmas is not None:
            if not isinstance(fitted_sigmas, (list, tuple)):
                raise TypeError(f"fitted_sigmas={fitted_sigmas!r} is invalid: it must be a list of grids (lists of numbers).")
            lengths = [len(grid) if isinstance(grid, (list, tuple)) else None for grid in fitted_sigmas]
            if len(set(lengths)) < len(lengths):
                _fail("fitted_sigmas", fitted_sigmas, "it may hold at most one grid per number of levels")
            for grid in fitted_sigmas:
                self._custom_times("fitted_sigmas", grid, as_sigmas=True)

    def register_fitted_sigmas(self, sigmas: Sequence[float]) -> None:
        """Keep ``sigmas`` (a grid from ``calibrate_sigmas``) in the config: ``set_timesteps(len(sigmas))`` runs it
        from now on, here and wherever the config is saved to (``save_pretrained``, ``push_to_hub``). It replaces
        a kept grid of the same length."""
        sigmas = [float(value) for value in (sigmas.tolist() if hasattr(sigmas, "tolist") else sigmas)]
        self._custom_times("sigmas", sigmas, as_sigmas=True)
        kept = [list(grid) for grid in self.config.fitted_sigmas or () if len(grid) != len(sigmas)]
        self.register_to_config(fitted_sigmas=sorted([*kept, sigmas], key=len))

    def _level_times(self, num_levels: int) -> np.ndarray:
        for grid in self.config.fitted_sigmas or ():
            if len(grid) == num_levels:
                return self._custom_times("fitted_sigmas", grid, as_sigmas=True).numpy()
        return super()._level_times(num_levels)

    def _make_stages(self, num_levels: int) -> List[Stage]:
        stages = []
        for level in range(num_levels - 1):
            if self.config.solver == "heun":
                stages += [Stage("heun_predict", level), Stage("heun_correct", level + 1)]
            else:
                stages.append(Stage(self.config.solver, level))
        if self.config.denoise_final:
            stages.append(Stage("denoise", num_levels - 1))
        return stages

    def _keeps(self, stage):
        if stage.kind == "dpm_solver_2m":
            return {"previous_sample_0": "sample_0"}
        if stage.kind == "heun_predict":
            return {"start_sample_0": "sample_0"}
        return {}

    def _stand_in(self, name):
        # with no previous x_0 (the first step taken) DPM-Solver++ 2M is its first-order step: the
        # extrapolation from x_0 to itself is x_0; a loop begun at a Heun correction keeps the Euler step
        # that led there (the correction with x_0_start = x_0)
        return "sample_0"

    def _euler(self, x, epsilon, level_index):
        hi, lo = self._levels[level_index], self._levels[level_index + 1]
        return probability_flow_euler(x, epsilon, hi.a, hi.noise_ratio, lo.a, lo.noise_ratio)

    def _log_snr_step(self, level_index):
        """``h``: the step from level ``level_index`` to the next, in log-SNR."""
        return math.log(self._levels[level_index].noise_ratio / self._levels[level_index + 1].noise_ratio)

    def _dpm_solver_2m(self, x, sample_0, level_index):
        hi, lo = self._levels[level_index], self._levels[level_index + 1]
        estimate = sample_0
        if level_index > 0:
            half_inverse_ratio = 0.5 * self._log_snr_step(level_index) / self._log_snr_step(level_index - 1)
            # x_0 extrapolated linearly in log-SNR to the middle of the step from the previous step's x_0
            previous_sample_0 = LinearCombination.symbol("previous_sample_0")
            estimate = (1 + half_inverse_ratio) * sample_0 - half_inverse_ratio * previous_sample_0
        return probability_flow_data_step(x, estimate, hi.sigma, hi.noise_ratio, lo.a, lo.sigma, lo.noise_ratio)

    def _update(self, stage, x, epsilon, sample_0, noise):
        if stage.kind == "denoise":
            return sample_0
        if stage.kind == "euler":
            return self._euler(x, epsilon, stage.level)
        if stage.kind == "dpm_solver_2m":
            return self._dpm_solver_2m(x, sample_0, stage.level)
        if stage.kind == "heun_predict":
            return self._euler(x, epsilon, stage.level)
        # heun_correct: the step from the previous level redone with the average of both slopes
        start, level = self._levels[stage.level - 1], self._levels[stage.level]
        start_sample_0 = LinearCombination.symbol("start_sample_0")
        return probability_flow_heun_correction(
            x, sample_0, start_sample_0, level.a, level.noise_ratio, start.noise_ratio
        )
