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
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

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

# diffusers schedulers whose configs we translate: ScoreSdeVe (VE) and the DDPM family (``beta_schedule``)
_DIFFUSERS_COMPATIBLES = [
    "DDPMScheduler",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "PNDMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
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
# keys only diffusers' DDPM-family configs have (an in-memory config names no class)
_DDPM_FAMILY_KEYS = ("steps_offset", "timestep_spacing", "solver_order", "clip_sample", "variance_type")
# fields of every scorekit config, by the type their value must have
_REAL_FIELDS = (
    "sigma_min", "sigma_max", "beta_min", "beta_max", "beta_start", "beta_end", "sampling_eps", "snr", "step_lr",
    "edm_rho", "noise_scale",
)
_INT_FIELDS = ("num_train_timesteps", "num_corrector_steps", "num_annealed_steps")
_STR_FIELDS = ("sde_type", "beta_schedule", "prediction_type", "timestep_type", "time_spacing", "predictor",
               "corrector", "solver")
_BOOL_FIELDS = ("denoise_final",)
# more levels than any sampler needs; the count is checked before anything is allocated
MAX_INFERENCE_STEPS = 100_000
MAX_TIMESTEPS_ENTRIES = 1_000_000


def _fail(field: str, value, allowed: str):
    raise ValueError(f"{field}={value!r} is invalid: {allowed}.")


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_types(config: dict) -> None:
    """Values of the wrong type (a config.json edited by hand: ``"sigma_max": "50"``) raise ``TypeError``."""
    for field in _REAL_FIELDS:
        value = config.get(field)
        if value is not None and not (_is_real(value) and math.isfinite(value)):
            kind = "a finite number" if _is_real(value) else f"a number, not {type(value).__name__}"
            raise (ValueError if _is_real(value) else TypeError)(f"{field}={value!r} is invalid: it must be {kind}.")
    for field in _INT_FIELDS:
        if field in config and not _is_int(config[field]):
            raise TypeError(f"{field}={config[field]!r} is invalid: it must be an integer.")
    for field in _STR_FIELDS:
        if config.get(field) is not None and not isinstance(config[field], str):
            raise TypeError(f"{field}={config[field]!r} is invalid: it must be a string.")
    for field in _BOOL_FIELDS:
        if field in config and not isinstance(config[field], (bool, np.bool_)):
            raise TypeError(f"{field}={config[field]!r} is invalid: it must be true or false.")
    betas = config.get("trained_betas")
    if betas is not None:
        values = betas.tolist() if hasattr(betas, "tolist") else betas
        if not (isinstance(values, (list, tuple)) and all(_is_real(b) and 0 < b < 1 for b in values)):
            raise TypeError(f"trained_betas={betas!r} is invalid: it must be a list of numbers in (0, 1).")


def validate_config(config: dict, supported_sde_types: Tuple[str, ...]) -> None:
    """Raise a ``ValueError`` (``TypeError`` for a value of the wrong type) naming the first bad field of a
    scheduler config and what it allows."""
    _check_types(config)
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
    if "num_train_timesteps" in config and not config["num_train_timesteps"] >= 2:
        _fail("num_train_timesteps", config["num_train_timesteps"], "it must be an integer >= 2")
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
    if "noise_scale" in config and config["noise_scale"] < 0:
        _fail("noise_scale", config["noise_scale"], "it must be >= 0")
    for field in ("num_corrector_steps", "num_annealed_steps"):
        if field in config and not config[field] >= 1:
            _fail(field, config[field], "it must be an integer >= 1")


def _source_class(config: Mapping) -> Optional[str]:
    """The scheduler class a config comes from: its ``_class_name`` (saved and ``from_config`` configs), else
    told by its keys (a scheduler's in-memory ``config``); ``None`` for a hand-written partial dict."""
    name = config.get("_class_name")
    if isinstance(name, str):
        return name
    if "correct_steps" in config:
        return "ScoreSdeVeScheduler"
    if any(key in config for key in _DDPM_FAMILY_KEYS):
        return "DDPMScheduler"  # stands for the whole family: every member is read through the same fields
    if "denoise_final" in config:
        return "ScoreSchedulerMixin"
    return None


def _translate_ddpm_family(full: Mapping, source: str, owned_keys: set) -> dict:
    """A DDPM-family config (diffusers' own field names, every field present) as scorekit fields.

    What describes the model translates: the discrete schedule, ``prediction_type``, discrete timesteps.
    Spacings translate: ``timestep_spacing`` (linspace / leading / trailing, all uniform in the training
    timestep) -> ``"uniform"``, ``use_karras_sigmas`` -> ``"edm"`` (rho 7), ``use_lu_lambdas`` -> ``"log_snr"``.
    What only describes diffusers' own sampler (``clip_sample``, ``solver_order``, ``steps_offset``, ...) is
    dropped. What scorekit cannot reproduce raises, naming the field.
    """

    def refuse(field, why):
        raise ValueError(f"{field}={full.get(field)!r} in the {source} config is not supported: {why}.")

    if full.get("rescale_betas_zero_snr"):
        refuse("rescale_betas_zero_snr", "zero terminal SNR puts sigma / a = inf at t = 1, where no SDE can start")
    for field in ("use_exponential_sigmas", "use_beta_sigmas"):
        if full.get(field):
            refuse(field, "scorekit spaces levels uniformly in t, in log-SNR or by Karras' rho (use_karras_sigmas)")
    for field in ("use_flow_sigmas", "use_dynamic_shifting"):
        if full.get(field):
            refuse(field, "flow-matching models are not score models")
    if full.get("thresholding"):
        refuse("thresholding", "dynamic thresholding is not a step of a score SDE sampler; set it to False")
    if full.get("variance_type") in ("learned", "learned_range"):
        refuse("variance_type", "a model with learned variance outputs twice the sample's channels")
    if "timestep_type" in owned_keys and full.get("timestep_type", "discrete") != "discrete":
        refuse("timestep_type", "only discrete training timesteps translate")
    for field in ("sigma_min", "sigma_max"):
        if full.get(field) is not None:
            refuse(field, "on a VP schedule the sigma range is the beta schedule's; leave it None")
    prediction_type = full.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        refuse("prediction_type", f"choose one of {PREDICTION_TYPES}")
    spacing = full.get("timestep_spacing", "leading")
    if spacing not in ("linspace", "leading", "trailing"):
        refuse("timestep_spacing", "choose linspace, leading or trailing")
    translated = {
        "beta_schedule": full.get("beta_schedule", "linear"),
        "beta_start": full.get("beta_start", 0.0001),
        "beta_end": full.get("beta_end", 0.02),
        "trained_betas": full.get("trained_betas"),
        "num_train_timesteps": full.get("num_train_timesteps", 1000),
        "prediction_type": prediction_type,
    }
    if full.get("use_karras_sigmas"):
        translated.update(time_spacing="edm", edm_rho=7.0)
    elif full.get("use_lu_lambdas"):
        translated["time_spacing"] = "log_snr"
    return translated


def _translate_score_sde_ve(full: Mapping) -> dict:
    return {
        "sigma_min": full["sigma_min"],
        "sigma_max": full["sigma_max"],
        "sampling_eps": full["sampling_eps"],
        "snr": full["snr"],
        "num_corrector_steps": full["correct_steps"],
        "num_train_timesteps": full["num_train_timesteps"],
    }


# what a diffusers config implies without saying: overridden by scorekit fields it carries from a round trip
_IMPLIED = {
    "ScoreSdeVeScheduler": {
        "sde_type": "ve",
        "prediction_type": "score",
        "timestep_type": "sigma",
        "predictor": "reverse_diffusion",
        "corrector": "langevin",
    },
    # sampling_eps stays the class default None: 0 (the first training step) on a discrete schedule
    "DDPMScheduler": {"sde_type": "vp", "timestep_type": "discrete", "time_spacing": "uniform"},
}
_FAMILY_SDE_TYPES = {"ScoreSdeVeScheduler": ("ve",), "DDPMScheduler": ("vp", "subvp")}


def translate_config(config: dict, target_cls) -> dict:
    """A config of any compatible scheduler, rewritten in ``target_cls``'s field names.

    diffusers' ``from_config`` keeps only the keys a class's ``__init__`` names and drops the ones a saved
    config marks as defaults, so a DDPM or ScoreSdeVe config would otherwise arrive half-empty. Here a diffusers
    config is read with its own class (defaults filled in) and mapped: DDPM family -> VP SDE with that discrete
    schedule (see ``_translate_ddpm_family``); ``ScoreSdeVeScheduler`` -> VE SDE with its sigma range, score
    output, sigma timesteps, reverse-diffusion predictor and Langevin corrector. A diffusers config that went
    through a scorekit scheduler keeps scorekit's fields (diffusers stores them for compatible classes): they
    come back, except where the diffusers class owns the field. Private keys (``_diffusers_version``, ...) stay.
    """
    config = {k: v for k, v in dict(config).items() if k != "_use_default_values"}
    source = _source_class(config)
    named = config.get("_class_name")
    if isinstance(named, str) and named not in _DIFFUSERS_COMPATIBLES + SCOREKIT_SCHEDULERS:
        raise ValueError(
            f"_class_name={named!r}: scorekit schedulers take configs of {SCOREKIT_SCHEDULERS} and of diffusers' "
            f"{_DIFFUSERS_COMPATIBLES}."
        )
    family = None
    if source == "ScoreSdeVeScheduler":
        family = "ScoreSdeVeScheduler"
    elif source in _DIFFUSERS_COMPATIBLES or (source is None and {"beta_schedule", "trained_betas"} & set(config)):
        family = "DDPMScheduler"
    if family is not None:
        diffusers_library = importlib.import_module("diffusers")
        full = dict(config)
        if named in _DIFFUSERS_COMPATIBLES:  # a saved config leaves out its defaults: let its class fill them in
            full.update(getattr(diffusers_library, named).from_config(config).config)
        owned_keys = (
            ConfigMixin._get_init_keys(getattr(diffusers_library, named))
            if named in _DIFFUSERS_COMPATIBLES
            else _diffusers_init_keys(family)
        )
        if family == "ScoreSdeVeScheduler":
            owned = _translate_score_sde_ve(full)
        else:
            owned = _translate_ddpm_family(full, named or "DDPM-family", owned_keys)
        # scorekit fields a round trip left in the config (diffusers keeps them for compatible classes), and the
        # private keys (``_diffusers_version``, ...)
        carried = {k: v for k, v in config.items() if k not in owned_keys}
        if carried.get("sde_type", _IMPLIED[family]["sde_type"]) not in _FAMILY_SDE_TYPES[family]:
            del carried["sde_type"]  # a field left over cannot change what the diffusers schedule describes
        config = {**_IMPLIED[family], **carried, **owned}
    else:  # a scorekit config: only the VE-only classes have no sde_type
        config.setdefault("sde_type", "ve")
    sde_type = config["sde_type"]
    if sde_type not in target_cls._supported_sde_types:
        runs = "PredictorCorrectorScheduler, ProbabilityFlowODEScheduler, " + (
            "VEEulerMaruyamaScheduler, AnnealedLangevinScheduler" if sde_type == "ve" else "VPEulerMaruyamaScheduler"
        )
        raise ValueError(
            f"{target_cls.__name__} runs sde_type in {target_cls._supported_sde_types}, but the config "
            f"(from {config.get('_class_name') or 'an in-memory config'}) "
            f"describes sde_type={sde_type!r}; use one of {runs}, which run it."
        )
    accepted = set(list(inspect.signature(target_cls.__init__).parameters)[1:])  # after self
    translated = {k: v for k, v in config.items() if k in accepted or k.startswith("_")}
    translated["_class_name"] = target_cls.__name__
    return translated


def _diffusers_init_keys(family: str) -> set:
    """Every field name of the diffusers schedulers of ``family`` (ScoreSdeVe, or the DDPM family)."""
    diffusers_library = importlib.import_module("diffusers")
    if family == "ScoreSdeVeScheduler":
        names = [family]
    else:
        names = [name for name in _DIFFUSERS_COMPATIBLES if name != "ScoreSdeVeScheduler"]
    keys = set()
    for name in names:
        keys |= ConfigMixin._get_init_keys(getattr(diffusers_library, name))
    return keys


def run_plain_loop(scheduler, model: Callable, sample: torch.Tensor, generator=None) -> torch.Tensor:
    """The plain diffusers loop over ``scheduler``'s current grid, from ``sample`` (already scaled by
    ``init_noise_sigma``); ``model(x, t)`` returns the model output. Any diffusers scheduler runs in it:
    ``generator`` goes to ``step`` where ``step`` takes one (Heun's and UniPC's do not)."""
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        sample = scheduler.step(model(scheduler.scale_model_input(sample, t), t), t, sample, **step_kwargs).prev_sample
    return sample


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
        self._begin_index: Optional[int] = None
        self._kept: Dict[str, torch.Tensor] = {}
        self._output_sums: Optional[torch.Tensor] = None

    # --- configuration -------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Like diffusers' ``from_config``, and also from a DDPM-family or ``ScoreSdeVeScheduler`` config
        (see ``translate_config``)."""
        if isinstance(config, Mapping):
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
            self.config.time_spacing,
            self.config.edm_rho,
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

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        timesteps: Optional[Sequence[float]] = None,
        sigmas: Optional[Sequence[float]] = None,
    ):
        """Build the grid of noise levels and the model calls it takes.

        Give one of: ``num_inference_steps`` (that many levels, spaced per ``time_spacing``); ``timesteps``
        (the levels' values in the model's own ``timestep_type`` convention, decreasing); or ``sigmas`` (the
        levels' noise ``sigma / a``, decreasing: diffusers' and EDM's sigma, which is ``sigma`` itself on VE).
        The last two are what diffusers' ``retrieve_timesteps`` passes. How many model calls
        (``len(self.timesteps)``) a grid takes depends on the scheduler and is documented in each class;
        ``timesteps`` holds the value each call must be given (per ``timestep_type``).
        """
        given = [name for name, value in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                           ("sigmas", sigmas)) if value is not None]
        if len(given) != 1:
            raise ValueError(
                f"set_timesteps takes exactly one of num_inference_steps, timesteps or sigmas; got {given}."
            )
        if num_inference_steps is not None:
            self._check_num_levels("num_inference_steps", num_inference_steps)
            times = as_time(self._level_times(int(num_inference_steps)))
        else:
            times = self._custom_times(given[0], timesteps if timesteps is not None else sigmas, sigmas is not None)
        num_levels = len(times)
        a, sigma = self.sde.marginal(times)
        timestep_values = timestep_from_t(
            times, self.sde, self.config.timestep_type, self.config.num_train_timesteps
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
        stages = self._make_stages(num_levels)
        if not stages:
            _fail(given[0], num_levels, "with denoise_final=False this scheduler needs 2 levels to take a step")
        self._stages = stages
        self._plans = [self._plan(stage) for stage in stages]
        self.timesteps = torch.tensor(
            [self._levels[stage.level].timestep for stage in stages], dtype=torch.float32, device=device
        )
        self.num_inference_steps = num_levels
        self._step_index = None  # the next step begins a loop (and clears the kept tensors)
        self._begin_index = None
        # one float64 sum of each model output, read only by raise_if_nonfinite: an accelerator never waits
        self._output_sums = None

    def _check_num_levels(self, field: str, num_levels):
        """An integer count of levels whose grid fits in memory, checked before anything is allocated."""
        if not (_is_int(num_levels) and num_levels >= 1):
            _fail(field, num_levels, "it must be an integer >= 1")
        if num_levels > MAX_INFERENCE_STEPS or num_levels * self.order > MAX_TIMESTEPS_ENTRIES:
            _fail(
                field,
                num_levels,
                f"at most {MAX_INFERENCE_STEPS} levels and {MAX_TIMESTEPS_ENTRIES} model calls "
                f"({self.order} per level here)",
            )

    def _custom_times(self, field: str, values, as_sigmas: bool) -> torch.Tensor:
        """The times of a custom grid given as ``sigma / a`` (``as_sigmas``) or as timesteps (model convention);
        ``field`` names it in errors."""
        if isinstance(values, (torch.Tensor, np.ndarray)):
            values = values.tolist()
        if not (isinstance(values, (list, tuple)) and all(_is_real(v) for v in values)):
            raise TypeError(f"{field}={values!r} is invalid: it must be a list of numbers.")
        self._check_num_levels(f"len({field})", len(values))
        values = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(values)) or np.any(np.diff(values) >= 0):
            _fail(field, values.tolist(), "it must be finite and strictly decreasing")
        config = self.config
        if as_sigmas:
            low, high = (self.sde.marginal(t) for t in (0.0, 1.0))
            low, high = float(low[1] / low[0]), float(high[1] / high[0])
            convert = lambda v: self.sde.t_from_log_snr(-np.log(v))  # noqa: E731
        else:
            low, high = timestep_from_t(as_time([0.0, 1.0]), self.sde, config.timestep_type,
                                        config.num_train_timesteps).tolist()
            convert = lambda v: t_from_timestep(v, self.sde, config.timestep_type,  # noqa: E731
                                                config.num_train_timesteps)
        tolerance = 1e-6 * max(abs(low), abs(high))
        in_range = values[0] <= high + tolerance and values[-1] >= low - tolerance
        if not in_range or (as_sigmas and values[-1] <= 0):
            _fail(field, values.tolist(), f"its values must lie in [{low:.6g}, {high:.6g}] (t from 0 to 1)"
                  + (" and be positive: the final step to sigma = 0 is denoise_final's" if as_sigmas else ""))
        times = convert(values).clamp(0.0, 1.0)
        if self.sde.sigma(times[-1:]).item() <= 0:
            _fail(field, values.tolist(), "its last level has sigma = 0, where the score is undefined")
        return times

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

    def _stand_in(self, name: str) -> str:
        """The tensor of the current stage to use for kept tensor ``name`` when no earlier stage provided it (a
        loop begun at this entry). Every scheduler that keeps tensors (``_keeps``) stands in for each of them."""
        raise NotImplementedError(f"{type(self).__name__} keeps {name!r} but has no stand-in for it.")

    @property
    def step_index(self) -> Optional[int]:
        """Index into ``timesteps`` of the next ``step`` call: before the first call, the begin index
        (``set_begin_index``, else 0), which the first call may still move (see ``step``)."""
        if self._step_index is None:
            return self._begin_index or 0
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        """The entry ``set_begin_index`` named, or ``None`` (the first ``step`` call tells)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start at entry ``begin_index`` of ``timesteps`` (img2img-style partial sampling). Pipelines call it;
        a loop over a slice of ``timesteps`` does not need to (see ``step``)."""
        if self._stages is None:
            raise ValueError("set_begin_index was called before set_timesteps.")
        # len(timesteps) begins an empty loop: img2img pipelines then report that strength left no step
        if not (_is_int(begin_index) and 0 <= begin_index <= len(self._stages)):
            _fail("begin_index", begin_index, f"it must be an integer in [0, {len(self._stages)}]")
        self._begin_index = int(begin_index)
        self._step_index = None

    @property
    def sigmas(self) -> Optional[torch.Tensor]:
        """The grid's levels as ``sigma / a`` (diffusers' and EDM's sigma), float64, one per level in the order
        they are visited: what ``set_timesteps(sigmas=...)`` takes back. None until ``set_timesteps``."""
        if self._levels is None:
            return None
        return torch.tensor([level.noise_ratio for level in self._levels], dtype=torch.float64)

    def level_of(self, step_index: int) -> Level:
        """The noise level of entry ``step_index`` of ``timesteps`` (for reports and guidance)."""
        return self._levels[self._stages[step_index].level]

    # --- the step ------------------------------------------------------------------------------------------

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity: scorekit models see ``x_t`` as it is (the DDPM and NCSN convention)."""
        return sample

    def _noise(self, like: torch.Tensor, generator) -> torch.Tensor:
        return randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)

    def _entry_of(self, timestep) -> Optional[int]:
        """The entry of ``timesteps`` that ``timestep`` is, without reading a device tensor: an element of
        ``self.timesteps`` (what iterating over it, or over a slice of it, gives) is a view whose storage
        offset is its index; ``None`` for anything else."""
        if isinstance(timestep, torch.Tensor) and timestep.numel() == 1 and timestep._base is self.timesteps:
            return timestep.storage_offset()  # set_timesteps makes timesteps its own storage, from offset 0
        return None

    @staticmethod
    def _value_of(timestep) -> Optional[float]:
        """``timestep`` as a number if that needs no device sync (a number, a CPU tensor), else ``None``."""
        if isinstance(timestep, torch.Tensor):
            if timestep.device.type != "cpu" or timestep.numel() == 0:
                return None
            timestep = timestep.flatten()[0].item()
        return float(timestep) if isinstance(timestep, (int, float, np.number)) else None

    def _matches(self, value: float, index: int) -> bool:
        # compared in float32, the precision of ``timesteps``
        return math.isclose(value, float(np.float32(self.level_of(index).timestep)), rel_tol=1e-4, abs_tol=1e-6)

    def _first_index(self, timestep) -> int:
        """Where a loop begins: ``set_begin_index``'s entry if it was called, else the entry the first
        timestep is (diffusers' ``index_for_timestep``). Entries of one level share a value (correctors, Heun's
        two calls): a value names the first of its entries that starts a level, as the slice
        ``timesteps[k * order:]`` of img2img pipelines does. A compiled loop cannot look: it begins at 0."""
        if self._begin_index is not None:
            return self._begin_index
        if torch.compiler.is_compiling():
            return 0
        entry = self._entry_of(timestep)
        if entry is not None:
            return entry
        value = self._value_of(timestep)
        if value is None:  # a copy of an entry on a device: one sync, once per loop
            value = float(torch.as_tensor(timestep).flatten()[0].item())
        matches = [i for i in range(len(self._stages)) if self._matches(value, i)]
        if not matches:
            raise ValueError(
                f"step was called with timestep={value:.6g}, which is no entry of scheduler.timesteps "
                f"(from {self.timesteps[0].item():.6g} down to {self.timesteps[-1].item():.6g}); call step with "
                "the entries of timesteps, in order."
            )
        level_starts = [i for i in matches if i % self.order == 0]
        return (level_starts or matches)[0]

    def _check_inputs(self, model_output, timestep, sample, index):
        if not isinstance(sample, torch.Tensor) or not sample.is_floating_point():
            raise TypeError(
                f"sample must be a floating-point tensor, got {getattr(sample, 'dtype', type(sample).__name__)}."
            )
        if not isinstance(model_output, torch.Tensor) or not model_output.is_floating_point():
            raise TypeError(
                "model_output must be a floating-point tensor, got "
                f"{getattr(model_output, 'dtype', type(model_output).__name__)}."
            )
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)} but sample has shape {tuple(sample.shape)}; "
                "the model must return one value per sample entry."
            )
        if model_output.device != sample.device:
            raise ValueError(
                f"model_output is on {model_output.device} but sample is on {sample.device}; put both on one device."
            )
        if not torch.compiler.is_compiling():
            # a compiled loop passes the right entries by construction, and reading one would break the graph
            entry = self._entry_of(timestep)
            value = self._value_of(timestep) if entry is None else None
            if (entry is not None and entry != index) or (value is not None and not self._matches(value, index)):
                called = f"entry {entry}" if entry is not None else f"timestep={value}"
                raise ValueError(
                    f"step was called with {called} but the next entry is {index} (timestep "
                    f"{float(np.float32(self.level_of(index).timestep))}) of scheduler.timesteps; call step once "
                    "per entry of timesteps, in order (set_timesteps starts a new loop)."
                )

    def _record_output_sum(self, model_output: torch.Tensor, sample: Optional[torch.Tensor], index: int):
        """Sum ``model_output`` (and, at the first step of a loop, the ``sample`` entering it) in float64 (finite
        exactly when every entry is, since float32 values cannot overflow it) into this step's slot; on the CPU
        check it at once, elsewhere leave it for ``raise_if_nonfinite`` so the step never waits for the device.
        The sums read detached tensors: a step stays differentiable (gradient guidance through a step)."""
        if self._output_sums is None or self._output_sums.device != model_output.device:
            # MPS has no float64: there a float32 sum may overflow and flag an enormous but finite output
            dtype = torch.float32 if model_output.device.type == "mps" else torch.float64
            self._output_sums = torch.zeros(len(self._stages), dtype=dtype, device=model_output.device)
        output_sum = self._output_sums[index]
        dims = tuple(range(model_output.ndim))
        torch.sum(model_output.detach(), dim=dims, dtype=output_sum.dtype, out=output_sum)
        if sample is not None:
            output_sum.add_(torch.sum(sample.detach(), dim=dims, dtype=output_sum.dtype))
        if model_output.device.type == "cpu" and not torch.compiler.is_compiling():
            if not torch.isfinite(output_sum):
                self._raise_nonfinite(index, sample)

    def _raise_nonfinite(self, index: int, sample: Optional[torch.Tensor] = None):
        level = self.level_of(index)
        where = (
            f"step {index} of {len(self._stages)} "
            f"(t={level.t:.6g}, sigma={level.sigma:.6g}, timestep={level.timestep:.6g})"
        )
        if sample is not None and not torch.isfinite(sample).all():
            raise ValueError(f"the sample passed to {where} contains NaN or Inf.")
        what = "model output (or the sample entering the loop)" if index == self._begin_index else "model output"
        raise ValueError(f"{what} at {where} contains NaN or Inf.")

    def raise_if_nonfinite(self):
        """Raise the non-finite-output error for the first bad step on an accelerator (one device sync)."""
        if self._output_sums is not None and self._step_index is not None:
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
        **ddim_arguments,
    ) -> Union[ScoreSchedulerOutput, Tuple]:
        """Advance ``sample`` by one entry of ``timesteps`` using ``model_output`` (the model evaluated there).

        The first call of a loop finds its entry from ``timestep`` (like diffusers' ``index_for_timestep``),
        unless ``set_begin_index`` named it: a loop over ``timesteps[k:]`` needs no more. Later calls must
        follow the entries in order. Beginning mid-grid, a multistep or Heun entry that needs the previous
        entry's tensors takes a first-order step instead (documented per class). ``step`` is differentiable
        in ``model_output`` and ``sample``.

        Args:
            model_output (`torch.Tensor`): the model's output at ``sample`` and ``timestep``, in the config's
                ``prediction_type``.
            timestep (`float` or `torch.Tensor`): the current entry of ``timesteps``; an element of
                ``timesteps`` is recognised without reading it, so on an accelerator nothing synchronises.
            sample (`torch.Tensor`): the current sample ``x_t`` (floating point, on ``model_output``'s device).
            generator (`torch.Generator`, *optional*): for the noise this step adds.
            return_dict (`bool`): return a ``ScoreSchedulerOutput`` rather than a tuple.

        DDIM's ``eta`` and ``use_clipped_model_output`` (which ``DDIMPipeline`` passes) raise a ``TypeError``:
        ``DDIMPipeline`` turns any scheduler into a ``DDIMScheduler``; use ``DDPMPipeline`` (any scorekit scheduler;
        ``ProbabilityFlowODEScheduler(solver="euler")`` is DDIM with eta = 0) or ``ScoreSDEPipeline``.
        """
        if ddim_arguments:
            raise TypeError(
                f"{type(self).__name__}.step got {sorted(ddim_arguments)}: those are DDIMScheduler's arguments "
                "(DDIMPipeline passes them, and rebuilds any scheduler as a DDIMScheduler). Run a scorekit "
                "scheduler in DDPMPipeline or ScoreSDEPipeline; ProbabilityFlowODEScheduler(solver='euler') is "
                "DDIM with eta=0."
            )
        if self._stages is None:
            raise ValueError(f"{type(self).__name__}.step was called before set_timesteps(num_inference_steps).")
        begins = self._step_index is None
        index = self._first_index(timestep) if begins else self._step_index
        if index >= len(self._stages):
            raise ValueError(
                f"all {len(self._stages)} entries of timesteps have been stepped; call set_timesteps again."
            )
        self._check_inputs(model_output, timestep, sample, index)
        if begins:
            self._begin_index, self._step_index, self._kept = index, index, {}
        self._record_output_sum(model_output, sample if begins else None, index)
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
                if name not in tensors:  # a loop begun at this entry: no earlier entry kept it
                    tensors[name] = tensors[self._stand_in(name)]
            prev_sample = plan.prev_sample(tensors)
        self._kept = {name: tensors[source] for name, source in plan.keeps.items()}
        self._step_index += 1
        prev_sample, sample_0 = prev_sample.to(sample_dtype), sample_0.to(sample_dtype)
        if not return_dict:
            return (prev_sample, sample_0)
        return ScoreSchedulerOutput(prev_sample=prev_sample, pred_original_sample=sample_0)

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
        for name, tensor in (("original_samples", original_samples), ("noise", noise)):
            if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
                kind = getattr(tensor, "dtype", type(tensor).__name__)
                raise TypeError(f"{name} must be a floating-point tensor, got {kind}.")
        if not torch.is_tensor(timesteps):
            timesteps = torch.as_tensor(timesteps)
        t = t_from_timestep(
            timesteps.to(original_samples.device),
            self.sde,
            self.config.timestep_type,
            self.config.num_train_timesteps,
        )
        a, sigma = self.sde.marginal(t)
        return broadcast_like(a, original_samples) * original_samples + broadcast_like(sigma, noise) * noise
