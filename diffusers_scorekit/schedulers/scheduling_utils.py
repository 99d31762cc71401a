"""What every scorekit scheduler shares: config checks and translation, the time grid, the step loop.

A scheduler is a list of *levels* (times ``t`` from 1 down to ``sampling_eps``, each with its marginal
coefficients) and a list of *stages*, one per model evaluation: ``timesteps[i]`` is the value the model is
called with at stage ``i``, so ``len(timesteps)`` is the number of function evaluations (NFE). A subclass
says which stages it runs (``_make_stages``) and what each does (``_update``); everything else lives here.
"""

import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..parametrization import (
    PREDICTION_TYPES,
    TIMESTEP_TYPES,
    epsilon_and_sample,
    score_from_epsilon,
    t_from_timestep,
    timestep_from_t,
)
from ..sde import SDE, SDE_TYPES, as_time, broadcast_like, build_sde, default_sampling_eps
from .linear_combination import LinearCombination
from .sde_updates import ancestral, euler_maruyama, langevin, reverse_diffusion, snr_step_size, transition


@dataclass
class ScoreSchedulerOutput(BaseOutput):
    """Output of a scorekit scheduler's ``step``.

    Args:
        prev_sample (`torch.Tensor`): the sample to feed the model at the next entry of ``timesteps``
            (after the last entry: the final sample).
        pred_original_sample (`torch.Tensor`): the model's estimate of the clean sample ``x_0`` at this stage
            (Tweedie's posterior mean), useful for previews and guidance.
    """

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


class Level(NamedTuple):
    """One noise level of the grid, with every coefficient a step needs, as Python floats (float64)."""

    t: float
    a: float
    sigma: float
    drift_coefficient: float
    diffusion_squared: float
    timestep: float

    @property
    def noise_ratio(self) -> float:
        """``sigma / a``: EDM's sigma, the time variable of the probability-flow ODE."""
        return self.sigma / self.a


class Stage(NamedTuple):
    """One model evaluation: what the scheduler does with it (``kind``) at which level."""

    kind: str
    level: int


class StepPlan(NamedTuple):
    """What ``step`` computes at one stage, worked out in ``set_timesteps`` (see ``linear_combination``).

    ``prev_sample`` maps the stage's tensors (``sample``, ``model_output``, ``sample_0``, ``noise`` and any kept
    from earlier stages) to the next sample; ``keeps`` names the tensors later stages read, as
    ``{name later stages use: name at this stage}``.
    """

    prev_sample: Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
    pred_original_sample: LinearCombination
    keeps: Mapping[str, str]


class SnrLangevinStep(NamedTuple):
    """score_sde's Langevin corrector, whose step size depends on the batch's score norm: the one update that is
    not a fixed linear combination, so it is evaluated on tensors (see ``snr_step_size``)."""

    score: LinearCombination
    snr: float
    alpha: float

    @property
    def inputs(self) -> Tuple[str, ...]:
        return self.score.inputs + ("noise",)

    def __call__(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        score, noise = self.score(tensors), tensors["noise"]
        return langevin(tensors["sample"], score, snr_step_size(score, noise, self.snr, self.alpha), noise)


TIME_SPACINGS = ("uniform", "log_snr", "edm")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")

# diffusers schedulers whose configs we translate (the DDPM family shares ``beta_schedule``)
_DIFFUSERS_COMPATIBLES = [
    "DDPMScheduler",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "PNDMScheduler",
    "ScoreSdeVeScheduler",
]
SCOREKIT_SCHEDULERS = [
    "AnnealedLangevinScheduler",
    "VEEulerMaruyamaScheduler",
    "VPEulerMaruyamaScheduler",
    "PredictorCorrectorScheduler",
    "ProbabilityFlowODEScheduler",
]
# scorekit schedulers that have no ``sde_type`` field because they only run VE
_VE_ONLY_SCHEDULERS = ("AnnealedLangevinScheduler", "VEEulerMaruyamaScheduler")


def _fail(field: str, value, allowed: str):
    raise ValueError(f"{field}={value!r} is invalid: {allowed}.")


def validate_config(config: dict, supported_sde_types: Tuple[str, ...]) -> None:
    """Raise a ``ValueError`` naming the first bad field of a scheduler config and what it allows."""
    sde_type = config.get("sde_type", "ve")
    if sde_type not in supported_sde_types:
        _fail("sde_type", sde_type, f"choose one of {supported_sde_types}")
    sigma_min, sigma_max = config.get("sigma_min"), config.get("sigma_max")
    if sigma_min is not None and not sigma_min > 0:
        _fail("sigma_min", sigma_min, "it must be positive")
    if sigma_min is not None and sigma_max is not None and not sigma_max > sigma_min:
        _fail("sigma_max", sigma_max, f"it must be greater than sigma_min={sigma_min}")
    beta_min, beta_max = config.get("beta_min"), config.get("beta_max")
    if beta_min is not None and not beta_min >= 0:
        _fail("beta_min", beta_min, "it must be >= 0")
    if beta_min is not None and beta_max is not None and not beta_max > beta_min:
        _fail("beta_max", beta_max, f"it must be greater than beta_min={beta_min}")
    beta_schedule = config.get("beta_schedule")
    if beta_schedule is not None and beta_schedule not in BETA_SCHEDULES:
        _fail("beta_schedule", beta_schedule, f"choose None (continuous linear beta) or one of {BETA_SCHEDULES}")
    num_train_timesteps = config.get("num_train_timesteps", 2)
    if not (isinstance(num_train_timesteps, int) and num_train_timesteps >= 2):
        _fail("num_train_timesteps", num_train_timesteps, "it must be an integer >= 2")
    if config.get("prediction_type", "score") not in PREDICTION_TYPES:
        _fail("prediction_type", config["prediction_type"], f"choose one of {PREDICTION_TYPES}")
    if config.get("timestep_type", "sigma") not in TIMESTEP_TYPES:
        _fail("timestep_type", config["timestep_type"], f"choose one of {TIMESTEP_TYPES}")
    sampling_eps = config.get("sampling_eps")
    if sampling_eps is not None and not 0 <= sampling_eps < 1:
        _fail("sampling_eps", sampling_eps, "it must lie in [0, 1)")
    continuous_beta = sde_type in ("vp", "subvp") and beta_schedule is None and config.get("trained_betas") is None
    if continuous_beta and sampling_eps == 0:
        _fail("sampling_eps", sampling_eps, "a continuous VP/sub-VP SDE has sigma(0) = 0, so it must be > 0")
    if config.get("time_spacing", "uniform") not in TIME_SPACINGS:
        _fail("time_spacing", config["time_spacing"], f"choose one of {TIME_SPACINGS}")
    for field in ("snr", "step_lr", "edm_rho"):
        if field in config and not config[field] > 0:
            _fail(field, config[field], "it must be positive")
    for field in ("num_corrector_steps", "num_annealed_steps"):
        if field in config and not (isinstance(config[field], int) and config[field] >= 1):
            _fail(field, config[field], "it must be an integer >= 1")


def translate_config(config: dict, target_cls) -> dict:
    """A config of any compatible scheduler, rewritten in ``target_cls``'s field names.

    diffusers' ``from_config`` keeps only the keys a class's ``__init__`` names and drops the ones a saved
    config marks as defaults, so a DDPM or ScoreSdeVe config would otherwise arrive half-empty. Here a diffusers
    config is read with its own class (defaults filled in) and mapped: DDPM family -> VP SDE with that discrete
    schedule, discrete timesteps, its ``prediction_type``; ``ScoreSdeVeScheduler`` -> VE SDE with its sigma
    range, score output, sigma timesteps, reverse-diffusion predictor and Langevin corrector.
    """
    config = {k: v for k, v in dict(config).items() if k != "_use_default_values"}
    source = config.get("_class_name")
    diffusers_library = importlib.import_module("diffusers")
    # an in-memory config has no ``_class_name``: every scorekit config has ``timestep_type`` and
    # ``correct_steps`` is ScoreSdeVe's own key
    is_scorekit = source in SCOREKIT_SCHEDULERS or (source is None and "timestep_type" in config)
    if is_scorekit:
        if source in _VE_ONLY_SCHEDULERS or (source is None and "sde_type" not in config):
            config.setdefault("sde_type", "ve")
    elif source == "ScoreSdeVeScheduler" or (source is None and "correct_steps" in config):
        full = diffusers_library.ScoreSdeVeScheduler.from_config(config).config
        config = {
            "sde_type": "ve",
            "sigma_min": full.sigma_min,
            "sigma_max": full.sigma_max,
            "sampling_eps": full.sampling_eps,
            "snr": full.snr,
            "num_corrector_steps": full.correct_steps,
            "num_train_timesteps": full.num_train_timesteps,
            "prediction_type": "score",
            "timestep_type": "sigma",
            "predictor": "reverse_diffusion",
            "corrector": "langevin",
        }
    elif "beta_schedule" in config or "trained_betas" in config:
        if isinstance(source, str) and hasattr(diffusers_library, source):
            config = dict(getattr(diffusers_library, source).from_config(config).config)
        config = {
            "sde_type": "vp",
            "beta_schedule": config.get("beta_schedule", "linear"),
            "beta_start": config.get("beta_start", 0.0001),
            "beta_end": config.get("beta_end", 0.02),
            "trained_betas": config.get("trained_betas"),
            "num_train_timesteps": config.get("num_train_timesteps", 1000),
            "prediction_type": config.get("prediction_type", "epsilon"),
            "timestep_type": "discrete",
            "sampling_eps": 0.0,
        }
    sde_type = config.get("sde_type", "ve")
    if sde_type not in target_cls._supported_sde_types:
        raise ValueError(
            f"{target_cls.__name__} runs sde_type in {target_cls._supported_sde_types}, but the config "
            f"(from {source or 'a dict'}) describes sde_type={sde_type!r}; use PredictorCorrectorScheduler or "
            "ProbabilityFlowODEScheduler, which run every SDE."
        )
    accepted = set(inspect.signature(target_cls.__init__).parameters) - {"self"}
    translated = {k: v for k, v in config.items() if k in accepted}
    translated["_class_name"] = target_cls.__name__
    return translated


def level_times(sde: SDE, num_levels: int, t_start: float, t_end: float, spacing: str, rho: float) -> np.ndarray:
    """``num_levels`` times from ``t_start`` down to ``t_end`` (float64).

    ``"uniform"`` is uniform in ``t``; ``"log_snr"`` uniform in ``log(a / sigma)``; ``"edm"`` is Karras et al.'s
    rho-spacing in ``sigma / a``, which puts most steps at low noise where the ODE curves most.
    """
    if num_levels == 1:
        return np.array([t_start])
    if spacing == "uniform":
        return np.linspace(t_start, t_end, num_levels)
    log_snr_start, log_snr_end = sde.log_snr([t_start, t_end]).tolist()
    if spacing == "log_snr":
        log_snr = np.linspace(log_snr_start, log_snr_end, num_levels)
    else:
        ramp = np.linspace(0.0, 1.0, num_levels)
        ratio_start, ratio_end = math.exp(-log_snr_start / rho), math.exp(-log_snr_end / rho)
        log_snr = -rho * np.log(ratio_start + ramp * (ratio_end - ratio_start))
    times = sde.t_from_log_snr(log_snr).numpy()
    times[0], times[-1] = t_start, t_end  # exact endpoints despite the numerical inverse
    return times


class ScoreSchedulerMixin(SchedulerMixin, ConfigMixin):
    """Base of the scorekit schedulers (see the module docstring)."""

    _compatibles = _DIFFUSERS_COMPATIBLES + SCOREKIT_SCHEDULERS
    _supported_sde_types: Tuple[str, ...] = SDE_TYPES
    order = 1

    def _setup(self):
        """Check the config and build the SDE; every subclass calls it at the end of ``__init__``."""
        config = dict(self.config)
        validate_config(config, self._supported_sde_types)
        self.sde = build_sde(
            self.sde_type,
            **{
                k: config[k]
                for k in (
                    "sigma_min",
                    "sigma_max",
                    "beta_min",
                    "beta_max",
                    "beta_schedule",
                    "num_train_timesteps",
                    "beta_start",
                    "beta_end",
                    "trained_betas",
                )
                if k in config
            },
        )
        self.init_noise_sigma = self.sde.prior_std
        self.num_inference_steps = None
        self.timesteps = None
        self._levels: Optional[List[Level]] = None
        self._stages: Optional[List[Stage]] = None
        self._plans: Optional[List[StepPlan]] = None
        self._step_index: Optional[int] = None
        self._kept: Dict[str, torch.Tensor] = {}
        self._output_sums: Optional[torch.Tensor] = None

    # --- configuration -------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Like diffusers' ``from_config``, and also from a DDPM-family or ``ScoreSdeVeScheduler`` config
        (see ``translate_config``)."""
        if isinstance(config, (dict,)) or hasattr(config, "items"):
            config = translate_config(config, cls)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def _get_compatibles(cls):
        diffusers_compatibles = super()._get_compatibles()
        scorekit = importlib.import_module("diffusers_scorekit.schedulers")
        return diffusers_compatibles + [getattr(scorekit, name) for name in SCOREKIT_SCHEDULERS]

    @property
    def sde_type(self) -> str:
        return self.config.get("sde_type", "ve")

    @property
    def sampling_eps(self) -> float:
        """The last time of the grid: the config's ``sampling_eps``, or ``sde.default_sampling_eps``."""
        if self.config.get("sampling_eps") is not None:
            return float(self.config.sampling_eps)
        return default_sampling_eps(self.sde)

    def __len__(self):
        return self.config.num_train_timesteps

    # --- the grid ------------------------------------------------------------------------------------------

    def _level_times(self, num_levels: int) -> np.ndarray:
        return level_times(
            self.sde,
            num_levels,
            1.0,
            self.sampling_eps,
            self.config.get("time_spacing", "uniform"),
            self.config.get("edm_rho", 7.0),
        )

    def _make_stages(self, num_levels: int) -> List[Stage]:
        """Predictor-corrector stages (see ``_reverse_sde_stages``); ALD and the ODE override this."""
        corrector_steps = 0 if self.corrector == "none" else self.config.num_corrector_steps
        return self._reverse_sde_stages(num_levels, corrector_steps, predict=self.predictor != "none")

    @property
    def predictor(self) -> str:
        return self.config.get("predictor", "euler_maruyama")

    @property
    def corrector(self) -> str:
        return self.config.get("corrector", "none")

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None):
        """Build the grid of ``num_inference_steps`` noise levels and the model calls it takes.

        How many model calls (``len(self.timesteps)``) that is depends on the scheduler and is documented
        in each class. ``timesteps`` holds the value each call must be given (per ``timestep_type``).
        """
        if not (isinstance(num_inference_steps, (int, np.integer)) and num_inference_steps >= 1):
            _fail("num_inference_steps", num_inference_steps, "it must be an integer >= 1")
        num_inference_steps = int(num_inference_steps)
        times = as_time(self._level_times(num_inference_steps))
        a, sigma = self.sde.marginal(times)
        timestep_values = timestep_from_t(
            times, self.sde, self.config.timestep_type, self.config.get("num_train_timesteps", 1000)
        )
        columns = zip(
            times.tolist(),
            a.tolist(),
            sigma.tolist(),
            self.sde.drift_coefficient(times).tolist(),
            self.sde.diffusion_squared(times).tolist(),
            timestep_values.tolist(),
        )
        self._levels = [Level(*column) for column in columns]
        stages = self._make_stages(num_inference_steps)
        if not stages:
            _fail(
                "num_inference_steps",
                num_inference_steps,
                "with denoise_final=False this scheduler needs at least 2 levels to take a step",
            )
        self._stages = stages
        self._plans = [self._plan(stage) for stage in stages]
        self.timesteps = torch.tensor(
            [self._levels[stage.level].timestep for stage in stages], dtype=torch.float32, device=device
        )
        self.num_inference_steps = num_inference_steps
        self._step_index = 0
        self._kept = {}
        # one float64 sum of each model output, read only by raise_if_nonfinite: an accelerator never waits
        self._output_sums = None

    def _plan(self, stage: Stage) -> StepPlan:
        """Run the stage's update rule on symbols: its coefficients, once, in float64."""
        level = self._levels[stage.level]
        sample, model_output = LinearCombination.symbol("sample"), LinearCombination.symbol("model_output")
        epsilon, sample_0 = epsilon_and_sample(model_output, sample, level.a, level.sigma, self.config.prediction_type)
        prev_sample = self._update(stage, sample, epsilon, sample_0, LinearCombination.symbol("noise"))
        return StepPlan(prev_sample, sample_0, self._keeps(stage))

    def _keeps(self, stage: Stage) -> Mapping[str, str]:
        """Tensors of this stage that later stages read (multistep solvers override this)."""
        return {}

    def _stand_in(self, name: str) -> Optional[str]:
        """The tensor of the current stage to use for kept tensor ``name`` when no earlier stage provided it
        (after ``set_begin_index``); ``None`` if there is none."""
        return None

    @property
    def step_index(self) -> Optional[int]:
        """Index into ``timesteps`` of the next ``step`` call."""
        return self._step_index

    def set_begin_index(self, begin_index: int = 0):
        """Start at entry ``begin_index`` of ``timesteps`` (img2img-style partial sampling)."""
        if self._stages is None:
            raise ValueError("set_begin_index was called before set_timesteps.")
        if not 0 <= begin_index < len(self._stages):
            _fail("begin_index", begin_index, f"it must lie in [0, {len(self._stages)})")
        self._step_index = begin_index
        self._kept = {}

    def level_of(self, step_index: int) -> Level:
        """The noise level of entry ``step_index`` of ``timesteps`` (for reports and guidance)."""
        return self._levels[self._stages[step_index].level]

    # --- the step ------------------------------------------------------------------------------------------

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity: scorekit models see ``x_t`` as it is (the DDPM and NCSN convention)."""
        return sample

    def _noise(self, like: torch.Tensor, generator) -> torch.Tensor:
        return randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)

    def _check_inputs(self, model_output, timestep, sample, index):
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)} but sample has shape {tuple(sample.shape)}; "
                "the model must return one value per sample entry."
            )
        if torch.compiler.is_compiling():
            # a compiled loop passes the right entries by construction, and reading one would break the graph
            timestep = None
        elif isinstance(timestep, torch.Tensor) and timestep.device.type == "cpu" and timestep.numel() > 0:
            timestep = timestep.flatten()[0].item()
        if isinstance(timestep, (int, float, np.number)):
            # compared in float32, the precision of ``timesteps``
            expected = float(np.float32(self.level_of(index).timestep))
            if not math.isclose(float(timestep), expected, rel_tol=1e-4, abs_tol=1e-6):
                raise ValueError(
                    f"step was called with timestep={timestep} but entry {index} of scheduler.timesteps is "
                    f"{expected}; call step once per entry of timesteps, in order."
                )
        self._record_output_sum(model_output, index)

    def _record_output_sum(self, model_output: torch.Tensor, index: int):
        """Sum ``model_output`` in float64 (finite exactly when every entry is, since float32 values cannot
        overflow it) into this step's slot; on the CPU check it at once, elsewhere leave it for
        ``raise_if_nonfinite`` so the step never waits for the device."""
        if self._output_sums is None or self._output_sums.device != model_output.device:
            # MPS has no float64: there a float32 sum may overflow and flag an enormous but finite output
            dtype = torch.float32 if model_output.device.type == "mps" else torch.float64
            self._output_sums = torch.zeros(len(self._stages), dtype=dtype, device=model_output.device)
        output_sum = self._output_sums[index]
        torch.sum(model_output, dim=tuple(range(model_output.ndim)), dtype=output_sum.dtype, out=output_sum)
        if model_output.device.type == "cpu" and not torch.compiler.is_compiling():
            if not torch.isfinite(output_sum):
                self._raise_nonfinite(index)

    def _raise_nonfinite(self, index: int):
        level = self.level_of(index)
        raise ValueError(
            f"model output at step {index} of {len(self._stages)} (t={level.t:.6g}, sigma={level.sigma:.6g}, "
            f"timestep={level.timestep:.6g}) contains NaN or Inf."
        )

    def raise_if_nonfinite(self):
        """Raise the non-finite-output error for the first bad step on an accelerator (one device sync)."""
        if self._output_sums is not None:
            nonfinite = ~torch.isfinite(self._output_sums[: self._step_index].cpu())
            if nonfinite.any():
                self._raise_nonfinite(int(nonfinite.nonzero()[0, 0]))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ) -> Union[ScoreSchedulerOutput, Tuple]:
        """Advance ``sample`` by one entry of ``timesteps`` using ``model_output`` (the model evaluated there).

        Args:
            model_output (`torch.Tensor`): the model's output at ``sample`` and ``timestep``, in the config's
                ``prediction_type``.
            timestep (`float` or `torch.Tensor`): the current entry of ``timesteps``; the scheduler keeps its
                own position, so on an accelerator it is not read (reading it would synchronise).
            sample (`torch.Tensor`): the current sample ``x_t``.
            generator (`torch.Generator`, *optional*): for the noise this step adds.
            return_dict (`bool`): return a ``ScoreSchedulerOutput`` rather than a tuple.
        """
        if self._stages is None:
            raise ValueError(f"{type(self).__name__}.step was called before set_timesteps(num_inference_steps).")
        index = self._step_index
        if index >= len(self._stages):
            raise ValueError(
                f"all {len(self._stages)} entries of timesteps have been stepped; call set_timesteps again."
            )
        self._check_inputs(model_output, timestep, sample, index)
        plan = self._plans[index]
        sample_dtype = sample.dtype
        # low-precision samples accumulate rounding over hundreds of steps: update in float32
        x = sample.float() if sample_dtype in (torch.float16, torch.bfloat16) else sample
        tensors = {"sample": x, "model_output": model_output.to(x.dtype), **self._kept}
        sample_0 = tensors["sample_0"] = plan.pred_original_sample(tensors)
        if plan.prev_sample is plan.pred_original_sample:  # the denoising step
            prev_sample = sample_0
        else:
            needed = plan.prev_sample.inputs
            if "noise" in needed:
                tensors["noise"] = self._noise(x, generator)
            for name in needed:
                if name not in tensors:
                    self._stand_in_for(name, tensors, index)
            prev_sample = plan.prev_sample(tensors)
        self._kept = {name: tensors[source] for name, source in plan.keeps.items()}
        self._step_index += 1
        prev_sample, sample_0 = prev_sample.to(sample_dtype), sample_0.to(sample_dtype)
        if not return_dict:
            return (prev_sample, sample_0)
        return ScoreSchedulerOutput(prev_sample=prev_sample, pred_original_sample=sample_0)

    def _stand_in_for(self, name: str, tensors: Dict[str, torch.Tensor], index: int):
        source = self._stand_in(name)
        if source is None:
            raise ValueError(
                f"entry {index} of timesteps needs {name!r} from the previous entry, which was not stepped; "
                "begin (set_begin_index) at an entry that starts a step."
            )
        tensors[name] = tensors[source]

    def _update(self, stage: Stage, x, epsilon, sample_0, noise):
        """The update rule of ``stage``, on ``LinearCombination`` symbols (predictor-corrector; ALD and the ODE
        override this)."""
        if stage.kind == "denoise":
            return sample_0
        if stage.kind == "predict":
            return self._predict(self.predictor, stage.level, x, epsilon, sample_0, noise)
        return self._correct(stage.level, x, epsilon, noise)

    def _correct(self, level_index: int, x, epsilon, noise):
        """A Langevin corrector step at level ``level_index`` with score_sde's signal-to-noise rule."""
        level = self._levels[level_index]
        score = score_from_epsilon(epsilon, level.sigma)
        # score_sde scales VP steps by the one-training-step alpha = 1 - beta / N; exp(2 f / N) is that for
        # every SDE (1 on VE, where f = 0)
        alpha = math.exp(2 * level.drift_coefficient / self.config.num_train_timesteps)
        if self.corrector == "langevin":
            return SnrLangevinStep(score, self.config.snr, alpha)
        return langevin(x, score, 2 * alpha * (self.config.snr * level.sigma) ** 2, noise)

    def _predict(self, predictor: str, level_index: int, x, epsilon, sample_0, noise):
        """A reverse-SDE predictor step from level ``level_index`` to the next one."""
        hi, lo = self._levels[level_index], self._levels[level_index + 1]
        score = score_from_epsilon(epsilon, hi.sigma)
        if predictor == "euler_maruyama":
            return euler_maruyama(x, score, hi.drift_coefficient, hi.diffusion_squared, lo.t - hi.t, noise)
        forward_scale, forward_variance = transition(hi.a, hi.sigma, lo.a, lo.sigma)
        if predictor == "reverse_diffusion":
            return reverse_diffusion(x, score, forward_scale, forward_variance, noise)
        return ancestral(x, sample_0, forward_scale, forward_variance, lo.a, lo.sigma, hi.sigma, noise)

    def _reverse_sde_stages(self, num_levels: int, corrector_steps_per_level: int, predict: bool) -> List[Stage]:
        """Per level: the corrector calls, then the predictor call to the next level; after the last level,
        the call that denoises (Tweedie) if ``denoise_final``."""
        stages = []
        for level in range(num_levels):
            stages += [Stage("correct", level)] * corrector_steps_per_level
            if predict and level < num_levels - 1:
                stages.append(Stage("predict", level))
        if self.config.denoise_final:
            stages.append(Stage("denoise", num_levels - 1))
        return stages

    # --- training and editing ------------------------------------------------------------------------------

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``a(t) x_0 + sigma(t) noise`` at the times that ``timesteps`` (values per ``timestep_type``) denote."""
        if not torch.is_tensor(timesteps):
            timesteps = torch.as_tensor(timesteps)
        t = t_from_timestep(
            timesteps.to(original_samples.device),
            self.sde,
            self.config.timestep_type,
            self.config.get("num_train_timesteps", 1000),
        )
        a, sigma = self.sde.marginal(t)
        return broadcast_like(a, original_samples) * original_samples + broadcast_like(sigma, noise) * noise
