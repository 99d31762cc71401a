"""``ScoreSDEPipeline``: sampling, guidance and inpainting with any scorekit scheduler and any score model."""

import contextlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .. import likelihood as flows
from .. import variational_bound as bounds
from ..calibration import StepCalibration, calibrate_sigmas
from ..parametrization import epsilon_and_sample, model_output_from_epsilon
from ..score_function import ScoreFunction
from ..schedulers import PredictorCorrectorScheduler, ProbabilityFlowODEScheduler, ScoreSchedulerMixin

from .diffusers_registration import LIBRARY

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class ScoreSDEPipelineOutput(BaseOutput):
    """Samples of a non-image model: an array or tensor of shape ``(batch, *sample_shape)``."""

    samples: Union[np.ndarray, torch.Tensor]


@dataclass
class AdaptiveSamplingOutput(BaseOutput):
    """Samples from the adaptive probability-flow ODE solve (images or vectors, per ``output_type``) and the
    number of model evaluations it took."""

    samples: Union[List, np.ndarray, torch.Tensor]
    nfe: int


def model_conventions(model) -> Optional[Tuple[str, str]]:
    """``(prediction_type, timestep_type)`` a model declares, or ``None`` when it declares nothing.

    scorekit models carry both in their config. diffusers' ``UNet2DModel`` with Fourier time embedding is the
    NCSN++ layout: it takes ``sigma`` and divides its output by it, so it outputs a score. Any other
    ``UNet2DModel`` says nothing; the scheduler's config decides.
    """
    config = model.config
    if "prediction_type" in config and "timestep_type" in config:
        return config["prediction_type"], config["timestep_type"]
    if isinstance(model, UNet2DModel) and config.get("time_embedding_type") == "fourier":
        return "score", "sigma"
    return None


def convert_diffusers_scheduler(scheduler_config: dict) -> ScoreSchedulerMixin:
    """The scorekit scheduler that samples as a diffusers scheduler did: DDPM -> ancestral predictor (DDPM's own
    step), ScoreSdeVe -> reverse diffusion + Langevin (its own sampler), any other DDPM-family scheduler -> the
    probability-flow ODE."""
    name = scheduler_config.get("_class_name")
    if name == "DDPMScheduler":
        return PredictorCorrectorScheduler.from_config(scheduler_config, predictor="ancestral", corrector="none")
    if name == "ScoreSdeVeScheduler":
        return PredictorCorrectorScheduler.from_config(scheduler_config)
    if "beta_schedule" in scheduler_config or "trained_betas" in scheduler_config:
        return ProbabilityFlowODEScheduler.from_config(scheduler_config)
    raise ValueError(f"cannot convert scheduler {name!r}: it is neither a DDPM-family nor a ScoreSdeVe scheduler.")


class ScoreSDEPipeline(DiffusionPipeline):
    """Sampling from a score-based model with a scorekit scheduler.

    Args:
        unet: a scorekit model (``ScoreMLP``, ``NCSNScoreModel``) or a diffusers ``UNet2DModel`` (epsilon, v,
            sample, or score output in the NCSN++ Fourier layout).
        scheduler: any scorekit scheduler; its ``prediction_type`` and ``timestep_type`` must match what the model
            declares.

    Images live in the model's space, ``data_range`` (``(-1, 1)`` by default, ``(0, 1)`` for NCSN/ScoreSdeVe
    checkpoints) and are mapped to [0, 1] for ``"pil"`` and ``"np"`` output.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler: ScoreSchedulerMixin):
        super().__init__()
        if not isinstance(scheduler, ScoreSchedulerMixin):
            raise ValueError(
                f"scheduler must be a scorekit scheduler, got {type(scheduler).__name__}; convert a diffusers one "
                "with e.g. PredictorCorrectorScheduler.from_config(scheduler.config)."
            )
        self.register_modules(unet=unet, scheduler=scheduler)
        self.data_range: Tuple[float, float] = (-1.0, 1.0)

    # --- shapes and conventions ----------------------------------------------------------------------------

    @property
    def sample_shape(self) -> Tuple[int, ...]:
        shape = self._declared_sample_shape()
        if shape is None:
            raise ValueError(
                f"the model's config ({type(self.unet).__name__}) declares neither data_dim (vector models) nor "
                "in_channels and sample_size (image models), so the pipeline cannot tell the shape of a sample; "
                "register data_dim (or sample_size) in the model's config."
            )
        return shape

    def _declared_sample_shape(self) -> Optional[Tuple[int, ...]]:
        config = self.unet.config
        if "data_dim" in config:
            return (config["data_dim"],)
        if "sample_size" not in config or "in_channels" not in config:
            return None
        size = config["sample_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (config["in_channels"], *size)

    @property
    def is_image_model(self) -> bool:
        shape = self._declared_sample_shape()
        return shape is not None and len(shape) == 3

    def check_conventions(self):
        """Raise if the model's declared output or time convention differs from the scheduler's config."""
        declared = model_conventions(self.unet)
        if declared is None:
            return
        expected = (self.scheduler.config.prediction_type, self.scheduler.config.timestep_type)
        if declared != expected:
            raise ValueError(
                f"the model outputs prediction_type={declared[0]!r} conditioned on timestep_type={declared[1]!r}, but "
                f"the scheduler is configured for prediction_type={expected[0]!r}, timestep_type={expected[1]!r}; "
                f"build it with {type(self.scheduler).__name__}.from_config(pipe.scheduler.config, "
                f"prediction_type={declared[0]!r}, timestep_type={declared[1]!r})."
            )

    @property
    def null_class_label(self) -> int:
        """The label of the unconditional branch for classifier-free guidance: the extra last class embedding
        (scorekit models add it themselves; a ``UNet2DModel`` is trained with ``num_class_embeds = classes + 1``)."""
        num_class_embeds = self.unet.config.get("num_class_embeds")
        if num_class_embeds is None:
            raise ValueError("class_labels were given but the model has no class embedding (num_class_embeds=None).")
        is_scorekit_model = "timestep_type" in self.unet.config
        return num_class_embeds if is_scorekit_model else num_class_embeds - 1

    # --- one guided model evaluation -----------------------------------------------------------------------

    def _model_output(self, x, t, class_labels, guidance_scale, classifier, classifier_scale):
        timestep = t.to(x.device).expand(x.shape[0])
        # with classifier guidance the labels are the classifier's; only a class-conditional model sees them
        model_labels = class_labels if self.unet.config.get("num_class_embeds") is not None else None
        if model_labels is None:
            output = self.unet(x, timestep).sample
        elif guidance_scale == 1.0:
            output = self.unet(x, timestep, class_labels=model_labels).sample
        else:
            null_labels = torch.full_like(model_labels, self.null_class_label)
            both = self.unet(
                torch.cat([x, x]), torch.cat([timestep, timestep]),
                class_labels=torch.cat([model_labels, null_labels]),
            ).sample
            conditional, unconditional = both.chunk(2)
            # every output convention is affine in the score at fixed (x, t), so guiding the raw output is
            # guiding the score
            output = unconditional + guidance_scale * (conditional - unconditional)
        if classifier is not None:
            output = self._add_classifier_gradient(output, x, timestep, class_labels, classifier, classifier_scale)
        return output

    def _add_classifier_gradient(self, output, x, timestep, class_labels, classifier, classifier_scale):
        """score + scale * grad_x log p(y | x, t), returned in the model's output convention."""
        level = self.scheduler.level_of(self.scheduler.step_index)
        prediction_type = self.scheduler.config.prediction_type
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(x_in, timestep), dim=-1)
            selected = log_probs[torch.arange(x.shape[0], device=x.device), class_labels].sum()
            gradient = torch.autograd.grad(selected, x_in)[0]
        epsilon, _ = epsilon_and_sample(output, x, level.a, level.sigma, prediction_type)
        # adding s * grad to the score subtracts sigma * s * grad from epsilon = -sigma * score
        guided_epsilon = epsilon - level.sigma * classifier_scale * gradient
        return model_output_from_epsilon(guided_epsilon, x, level.a, level.sigma, prediction_type)

    # --- the loop ------------------------------------------------------------------------------------------

    def _check_call(self, num_inference_steps, output_type, class_labels, batch_size, classifier=None,
                    guidance_scale=1.0, classifier_scale=1.0, latents=None):
        """Reject bad arguments before any sampling; returns ``(class_labels, classifier)`` as the loop uses them
        (labels as a tensor; the classifier wrapped to check its number of classes against the labels)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not supported; choose one of {OUTPUT_TYPES}.")
        if output_type == "pil" and not self.is_image_model:
            raise ValueError("output_type='pil' needs an image model; use 'np' or 'pt' for vector data.")
        if not (isinstance(num_inference_steps, int) and not isinstance(num_inference_steps, bool)
                and num_inference_steps >= 1):
            raise ValueError(f"num_inference_steps={num_inference_steps!r} is invalid: it must be an integer >= 1.")
        check_batch_size(batch_size)
        is_conditional = self.unet.config.get("num_class_embeds") is not None
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels)
            if class_labels.dtype == torch.bool or class_labels.is_floating_point() or class_labels.is_complex():
                raise TypeError(f"class_labels must be integers (one label per sample), got dtype {class_labels.dtype}.")
            if class_labels.shape != (batch_size,):
                raise ValueError(f"class_labels must have shape ({batch_size},), got {tuple(class_labels.shape)}.")
            if classifier is None and not is_conditional:
                raise ValueError("class_labels need a class-conditional model (num_class_embeds set) or a classifier.")
            lowest, highest = int(class_labels.min()), int(class_labels.max())  # one host sync, before the loop
            if is_conditional and not 0 <= lowest <= highest <= self.null_class_label:
                raise ValueError(
                    f"class_labels must lie in [0, {self.null_class_label}] for this model ({self.null_class_label} is "
                    f"the unconditional label), got values in [{lowest}, {highest}]."
                )
            if lowest < 0:
                raise ValueError(f"class_labels must be >= 0, got {lowest}.")
            if classifier is not None:
                classifier = _checked_classifier(classifier, highest)
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale={guidance_scale!r} is invalid: it must be a finite number.")
        if guidance_scale != 1.0 and not is_conditional:
            raise ValueError(
                f"guidance_scale={guidance_scale!r} needs a class-conditional model (classifier-free guidance); this "
                "model is unconditional (num_class_embeds=None). For classifier guidance pass classifier= and "
                "classifier_scale=."
            )
        if guidance_scale != 1.0 and class_labels is None:
            raise ValueError(f"guidance_scale={guidance_scale!r} needs class_labels, the classes to guide towards.")
        if not math.isfinite(classifier_scale):
            raise ValueError(f"classifier_scale={classifier_scale!r} is invalid: it must be a finite number.")
        if classifier is None and classifier_scale != 1.0:
            raise ValueError(f"classifier_scale={classifier_scale!r} has no effect without a classifier; pass "
                             "classifier= (a noise-conditional classifier) or leave classifier_scale at 1.")
        if classifier is not None and class_labels is None:
            raise ValueError("classifier guidance needs class_labels, the classes to guide towards.")
        if latents is not None:
            shape = (batch_size, *self.sample_shape)
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
            check_finite("latents", latents)
        self.check_conventions()
        return class_labels, classifier

    def _sample(
        self,
        batch_size,
        num_inference_steps,
        generator,
        class_labels,
        guidance_scale,
        classifier,
        classifier_scale,
        latents,
        known,
        keep_mask,
        callback_on_step_end,
        sigmas=None,
    ) -> torch.Tensor:
        device, dtype = self._execution_device, self.unet.dtype
        shape = (batch_size, *self.sample_shape)
        if sigmas is None:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        else:
            self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * self.scheduler.init_noise_sigma
        x = latents.to(device=device, dtype=dtype)
        if class_labels is not None:
            class_labels = class_labels.to(device)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if known is not None:
                # score_sde's imputation: the known entries follow the forward process at this level
                level = self.scheduler.level_of(i)
                noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
                x = torch.where(keep_mask, level.a * known + level.sigma * noise, x)
            model_input = self.scheduler.scale_model_input(x, t)
            with torch.no_grad():
                output = self._model_output(model_input, t, class_labels, guidance_scale, classifier, classifier_scale)
            x = self.scheduler.step(output, t, x, generator=generator).prev_sample
            if callback_on_step_end is not None:
                callback_outputs = callback_on_step_end(self, i, t, {"latents": x})
                x = callback_outputs.pop("latents", x)
        self.scheduler.raise_if_nonfinite()
        if known is not None:
            x = torch.where(keep_mask, known, x)
        self.maybe_free_model_hooks()
        return x

    def _postprocess(self, x, output_type, return_dict):
        if self.is_image_model:
            low, high = self.data_range
            images = ((x.float() - low) / (high - low)).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
            return ImagePipelineOutput(images=images) if return_dict else (images,)
        samples = x if output_type == "pt" else x.float().cpu().numpy()
        return ScoreSDEPipelineOutput(samples=samples) if return_dict else (samples,)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 100,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        output_type: Optional[str] = None,
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[["ScoreSDEPipeline", int, Any, Dict], Dict]] = None,
        class_labels: Optional[torch.Tensor] = None,
        guidance_scale: float = 1.0,
        classifier: Optional[Callable] = None,
        classifier_scale: float = 1.0,
        latents: Optional[torch.Tensor] = None,
        sigmas: Optional[Sequence[float]] = None,
    ):
        """Draw ``batch_size`` samples.

        Args:
            batch_size: number of samples.
            num_inference_steps: passed to ``scheduler.set_timesteps`` (see the scheduler for the NFE it means).
            generator: for the initial noise and every noise the scheduler adds; same seed, same samples.
            output_type: `"pil"`, `"np"` or `"pt"` for images (default `"pil"`); `"np"` or `"pt"` for vectors
                (default `"np"`).
            return_dict: return an output object rather than a tuple.
            callback_on_step_end: ``fn(pipe, step_index, timestep, {"latents": x}) -> dict``; a returned
                ``"latents"`` replaces the sample.
            class_labels: one label per sample for a class-conditional model.
            guidance_scale: classifier-free guidance weight ``w`` (``uncond + w (cond - uncond)``); 1 is plain
                conditional sampling.
            classifier: ``fn(x, timestep) -> logits``, a noise-conditional classifier for classifier guidance
                (``score + classifier_scale * grad log p(y | x, t)``).
            classifier_scale: weight of the classifier gradient.
            latents: the initial sample (already scaled by ``init_noise_sigma``), instead of drawing it.
            sigmas: the grid's noise levels ``sigma / a``, decreasing, instead of ``num_inference_steps`` (which is
                then ignored, as in diffusers' pipelines): e.g. the ``sigmas`` of ``calibrate_sigmas``.

        Returns:
            ``ImagePipelineOutput`` for image models, ``ScoreSDEPipelineOutput`` for vector models (or tuples).
        """
        output_type = output_type or ("pil" if self.is_image_model else "np")
        class_labels, classifier = self._check_call(num_inference_steps, output_type, class_labels, batch_size,
                                                    classifier, guidance_scale, classifier_scale, latents)
        x = self._sample(
            batch_size, num_inference_steps, generator, class_labels, guidance_scale, classifier, classifier_scale,
            latents, None, None, callback_on_step_end, sigmas,
        )
        return self._postprocess(x, output_type, return_dict)

    def calibrate_sigmas(
        self,
        num_inference_steps: int,
        num_samples: int = 64,
        generator: Optional[torch.Generator] = None,
        reference_steps: int = 200,
        **search,
    ) -> StepCalibration:
        """Fit the levels of a ``num_inference_steps`` grid to this model (see ``diffusers_scorekit.calibration``):
        the grid whose samples land closest to the model's own ``reference_steps``-level solution, on a pilot
        batch of ``num_samples`` draws from ``generator``. Needs a `ProbabilityFlowODEScheduler`. Pass the result's
        ``sigmas`` to ``__call__``. ``search``: ``max_grids``, ``initial_step``, ``min_step`` of
        ``calibrate_sigmas``. The grid is fitted to the unconditional model: a class-conditional one is called with
        its null label."""
        check_batch_size(num_samples)
        self.check_conventions()
        device, dtype = self._execution_device, self.unet.dtype
        noise = randn_tensor((num_samples, *self.sample_shape), generator=generator, device=device, dtype=dtype)
        is_conditional = self.unet.config.get("num_class_embeds") is not None
        null_labels = torch.full((num_samples,), self.null_class_label, device=device) if is_conditional else None

        def model(x, t):
            return self._model_output(x, t, null_labels, 1.0, None, 1.0)

        return calibrate_sigmas(self.scheduler, model, noise, num_inference_steps, reference_steps, **search)

    @torch.no_grad()
    def inpaint(
        self,
        image: Union[torch.Tensor, np.ndarray],
        mask: Union[torch.Tensor, np.ndarray],
        num_inference_steps: int = 100,
        generator: Optional[torch.Generator] = None,
        output_type: Optional[str] = None,
        return_dict: bool = True,
        class_labels: Optional[torch.Tensor] = None,
        guidance_scale: float = 1.0,
    ):
        """Fill in the entries of ``image`` where ``mask`` is 1 (diffusers' convention: 1 = repaint, 0 = keep).

        ``image`` is in the model's space (``data_range`` for images), shape ``(batch, *sample_shape)``; ``mask``
        broadcasts against it. At every model call the kept entries are set to their forward-noised value at that
        level (score_sde's imputation), and to their exact value at the end.

        Use a scheduler with a corrector: replacement conditions each level on a freshly noised copy of the known
        entries, and without Langevin correction the result is far from the true conditional (on a correlated
        Gaussian the tests measure a regression slope of 0.49 for the true 0.8, exact with 5 corrector steps).
        On well-separated modes it can still pick a mode the known entries rule out (5% of draws in the tests).
        """
        known = torch.as_tensor(image).to(device=self._execution_device, dtype=self.unet.dtype)
        if tuple(known.shape[1:]) != self.sample_shape:
            raise ValueError(f"image must have shape (batch, {', '.join(map(str, self.sample_shape))}), got {tuple(known.shape)}.")
        check_finite("image", known)
        if self.is_image_model:
            self._check_in_data_range("image", known)
        repaint = torch.as_tensor(mask).to(self._execution_device)
        is_binary = (repaint == 0) | (repaint == 1)
        if not is_binary.all():
            raise ValueError(f"mask must hold only 0 (keep) and 1 (repaint), got {repaint[~is_binary].flatten()[0].item()}.")
        try:
            keep_mask = torch.broadcast_to(repaint < 0.5, known.shape)
        except RuntimeError as error:
            raise ValueError(f"mask of shape {tuple(repaint.shape)} does not broadcast to image {tuple(known.shape)}.") from error
        output_type = output_type or ("pil" if self.is_image_model else "np")
        class_labels, _ = self._check_call(num_inference_steps, output_type, class_labels, known.shape[0],
                                           guidance_scale=guidance_scale)
        x = self._sample(
            known.shape[0], num_inference_steps, generator, class_labels, guidance_scale, None, 1.0,
            None, known, keep_mask, None,
        )
        return self._postprocess(x, output_type, return_dict)

    # --- the probability-flow ODE, solved adaptively: likelihood, sampling, encoding ------------------------

    def score_function(self) -> ScoreFunction:
        """The model seen through the scheduler's SDE and conventions."""
        self.check_conventions()
        config = self.scheduler.config
        return ScoreFunction(self.unet, self.scheduler.sde, config.prediction_type, config.timestep_type,
                             config.get("num_train_timesteps", 1000))

    def _check_in_data_range(self, name: str, images: torch.Tensor) -> None:
        """Images must be in the model's space: values within half a range-width of ``data_range`` pass (noisy or
        slightly overshooting images), [0, 255] or [0, 1]-for-[-1, 1]-scale mistakes beyond that do not."""
        low, high = self.data_range
        margin = (high - low) / 2
        lowest, highest = images.min().item(), images.max().item()
        if lowest < low - margin or highest > high + margin:
            raise ValueError(
                f"{name} has values in [{lowest:.4g}, {highest:.4g}], far outside the model's data_range {self.data_range}; "
                f"map images to that range first (8-bit images: k / 255 * {high - low:g} + {low:g})."
            )

    def _as_model_input(self, samples) -> Tuple[torch.Tensor, bool]:
        """``(x, is_8bit)``: PIL images and uint8 arrays become dequantised 8-bit data in [-1, 1]."""
        if isinstance(samples, list) and samples and hasattr(samples[0], "convert"):
            samples = np.stack([np.asarray(image) for image in samples])
            samples = samples[..., None] if samples.ndim == 3 else samples
            samples = torch.from_numpy(samples).permute(0, 3, 1, 2).contiguous()
        samples = torch.as_tensor(samples)
        is_8bit = samples.dtype == torch.uint8
        # a model whose config declares no shape (a custom network) takes the samples' own shape
        shape = self._declared_sample_shape()
        if shape is not None and tuple(samples.shape[1:]) != shape:
            raise ValueError(f"samples must have shape (batch, {', '.join(map(str, shape))}), got {tuple(samples.shape)}.")
        if samples.ndim < 2 or samples.shape[0] == 0:
            raise ValueError(f"samples must be a non-empty batch (batch, ...), got shape {tuple(samples.shape)}.")
        if not is_8bit:
            check_finite("samples", samples)
        return samples, is_8bit

    def log_likelihood(self, samples, *, rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5",
                       divergence: str = "hutchinson", num_probes: int = 1, probe: str = "rademacher",
                       generator: Optional[torch.Generator] = None) -> flows.LikelihoodOutput:
        """Per-sample log-likelihood (nats) and bits/dim of ``samples`` under the model's probability-flow ODE.

        ``samples``: a batch in the model's space (continuous data: ``bits_per_dim = -log p / (D log 2)``), or 8-bit
        images as a list of PIL images or a uint8 tensor/array ``(batch, C, H, W)``, which are dequantised
        (``2 (k + u) / 256 - 1``) and reported as discrete 8-bit data (see ``likelihood.log_likelihood``). The
        result also carries ``nfe``, the model evaluations of the adaptive solve.
        """
        x, is_8bit = self._as_model_input(samples)
        if is_8bit:
            if self.data_range != (-1.0, 1.0):
                raise ValueError(f"8-bit likelihood assumes the model's data range (-1, 1); this pipeline uses {self.data_range}.")
            x = flows.dequantize_and_scale(x, generator=generator)
        x = x.to(device=self._execution_device, dtype=self.unet.dtype)
        return flows.log_likelihood(
            self.score_function(), x, rtol=rtol, atol=atol, method=method, divergence=divergence,
            num_probes=num_probes, probe=probe, data="8bit" if is_8bit else "continuous", generator=generator,
        )

    def variational_bound(self, samples, *, bound: Optional[str] = None, variance_type: str = "fixed_large",
                          num_time_samples: Optional[int] = None, batch_size: int = 256,
                          generator: Optional[torch.Generator] = None) -> bounds.VariationalBoundOutput:
        """Per-sample variational bound in bits/dim, with its terms (prior, diffusion, reconstruction).

        ``bound``: ``"ddpm"`` (DDPM's ``L_T + sum L_(t-1) + L_0``; needs a scheduler on a DDPM schedule) or
        ``"continuous"`` (the continuous-time bound of any SDE); by default ``"ddpm"`` on a DDPM schedule, else
        ``"continuous"``. ``samples`` as for ``log_likelihood``: continuous data in the model's space, or 8-bit
        images (PIL or uint8), which the DDPM bound scores on the bin centres ``2 k / 255 - 1`` with its
        discretised decoder and the continuous bound on dequantised data as the ODE does; both report a bound on
        ``-log2 P(k) / D`` (see ``variational_bound``). ``num_time_samples``: DDPM: ``None`` for all terms, or a
        random subset of that many with a standard error; continuous: Monte Carlo draws of ``t`` (default 64).
        ``variance_type`` (DDPM only): ``"fixed_large"``, ``"fixed_small"`` or ``"learned_range"``.
        """
        x, is_8bit = self._as_model_input(samples)
        if bound is None:
            bound = "ddpm" if bounds.is_ddpm_schedule(self.scheduler.sde) else "continuous"
        flows._check_choice("bound", bound, bounds.BOUNDS)
        if is_8bit:
            if self.data_range != (-1.0, 1.0):
                raise ValueError(f"8-bit bounds assume the model's data range (-1, 1); this pipeline uses {self.data_range}.")
            x = bounds.to_bin_centres(x) if bound == "ddpm" else flows.dequantize_and_scale(x, generator=generator)
        x = x.to(device=self._execution_device, dtype=self.unet.dtype)
        data = "8bit" if is_8bit else "continuous"
        if bound == "ddpm":
            return bounds.ddpm_variational_bound(
                self.score_function(), x, variance_type=variance_type, data=data, num_time_samples=num_time_samples,
                batch_size=batch_size, generator=generator,
            )
        return bounds.continuous_variational_bound(
            self.score_function(), x, num_time_samples=num_time_samples or 64, sampling_eps=self.scheduler.sampling_eps,
            data=data, batch_size=batch_size, generator=generator,
        )

    @torch.no_grad()
    def sample_adaptive(self, batch_size: int = 1, *, rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5",
                        denoise_final: bool = True, generator: Optional[torch.Generator] = None,
                        output_type: Optional[str] = None, latents: Optional[torch.Tensor] = None) -> AdaptiveSamplingOutput:
        """Sample by solving the probability-flow ODE with an adaptive solver (Dormand-Prince by default) from the
        prior to ``sampling_eps``, then (``denoise_final``) one Tweedie step; reports the NFE it took."""
        output_type = output_type or ("pil" if self.is_image_model else "np")
        # given latents set the batch size
        self._check_call(1, output_type, None, batch_size if latents is None else len(latents), latents=latents)
        shape_or_latents = latents if latents is not None else (batch_size, *self.sample_shape)
        flow = flows.ode_sample(
            self.score_function(), shape_or_latents, rtol=rtol, atol=atol, method=method,
            sampling_eps=self.scheduler.sampling_eps, denoise_final=denoise_final, generator=generator,
            device=self._execution_device, dtype=self.unet.dtype,
        )
        (samples,) = self._postprocess(flow.x, output_type, return_dict=False)
        return AdaptiveSamplingOutput(samples=samples, nfe=flow.nfe)

    def encode(self, samples: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-5) -> flows.FlowOutput:
        """Data (in the model's space) to prior latents along the probability-flow ODE: the inverse of ``decode``,
        for interpolation and editing. Returns ``(latents, nfe)``."""
        x = torch.as_tensor(samples).to(device=self._execution_device, dtype=self.unet.dtype)
        with torch.no_grad():
            return flows.encode(self.score_function(), x, rtol=rtol, atol=atol, sampling_eps=self.scheduler.sampling_eps)

    def decode(self, latents: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-5) -> flows.FlowOutput:
        """Prior latents to data (model space, no denoising step) along the probability-flow ODE."""
        latents = torch.as_tensor(latents).to(device=self._execution_device, dtype=self.unet.dtype)
        with torch.no_grad():
            return flows.decode(self.score_function(), latents, rtol=rtol, atol=atol, sampling_eps=self.scheduler.sampling_eps)

    # --- saving and loading --------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: Union[str, os.PathLike], safe_serialization: bool = True, **kwargs):
        """Write ``model_index.json``, the model's safetensors weights and config, and the scheduler config.

        Our own classes are recorded as ``["diffusers_scorekit", ClassName]`` (importable from the package's top
        level), so a checkpoint keeps loading when internal modules move.
        """
        if not safe_serialization:
            raise ValueError("safe_serialization=False is not supported: weights are written as safetensors only.")
        push_to_hub = kwargs.pop("push_to_hub", False)
        # diffusers < 0.33 cannot write non-contiguous (e.g. channels_last) weights to safetensors
        with contiguous_weights(self.unet):
            super().save_pretrained(save_directory, safe_serialization=True, **kwargs)
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path) as f:
            index = json.load(f)
        for name, entry in index.items():
            if isinstance(entry, list) and entry[0] and entry[0].split(".")[0] == LIBRARY:
                index[name] = [LIBRARY, entry[1]]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        if push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            repo_id = kwargs.get("repo_id") or os.path.basename(os.path.abspath(save_directory))
            repo_id = create_repo(repo_id, exist_ok=True, private=kwargs.get("private"), token=kwargs.get("token")).repo_id
            upload_folder(repo_id=repo_id, folder_path=save_directory, token=kwargs.get("token"))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs):
        """Load a folder (or Hub repo) written by ``save_pretrained``, or one laid out like diffusers'
        ``DDPMPipeline`` / ``ScoreSdeVePipeline`` (their scheduler becomes the matching scorekit scheduler).

        Keyword arguments: ``unet=`` / ``scheduler=`` replace a component; ``torch_dtype``; for a repo id,
        ``revision``, ``cache_dir``, ``token``, ``local_files_only`` (``HF_HUB_OFFLINE=1`` is honoured).
        """
        folder = _resolve_folder(pretrained_model_name_or_path, kwargs)
        index_path = os.path.join(folder, "model_index.json")
        if not os.path.isfile(index_path):
            raise OSError(f"{index_path} does not exist: {folder} is not a pipeline folder.")
        with open(index_path) as f:
            try:
                index = json.load(f)
            except json.JSONDecodeError as error:
                raise OSError(f"{index_path} is not valid JSON ({error}): the pipeline folder is damaged.") from error
        if not isinstance(index, dict):
            raise OSError(f"{index_path} must hold a JSON object (component name -> [library, class]), "
                          f"got a {type(index).__name__}.")
        unet = kwargs.pop("unet", None) or _load_model(folder, "unet", index.get("unet"), kwargs.get("torch_dtype"))
        scheduler = kwargs.pop("scheduler", None) or _load_scheduler(folder, index.get("scheduler"))
        pipe = cls(unet=unet, scheduler=scheduler)
        if index.get("_class_name") == "ScoreSdeVePipeline":
            pipe.data_range = (0.0, 1.0)
        return pipe


def check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__} {batch_size!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: it must be >= 1.")


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """One host sync: called on inputs before a loop, never inside one."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or Inf values.")


def _checked_classifier(classifier: Callable, highest_label: int) -> Callable:
    """``classifier`` that raises when it has no logit for the highest class label (instead of an index error)."""

    def checked(x, timestep):
        logits = classifier(x, timestep)
        if logits.shape[-1] <= highest_label:
            raise ValueError(f"class_labels go up to {highest_label}, but the classifier returns "
                             f"{logits.shape[-1]} logits (labels 0 to {logits.shape[-1] - 1}).")
        return logits

    return checked


@contextlib.contextmanager
def contiguous_weights(module: torch.nn.Module):
    """Give ``module``'s non-contiguous parameters and buffers contiguous storage for the duration, then put the
    original (e.g. channels_last) tensors back."""
    originals = []
    for tensor in [*module.parameters(), *module.buffers()]:
        if not tensor.is_contiguous():
            originals.append((tensor, tensor.data))
            tensor.data = tensor.data.contiguous()
    try:
        yield
    finally:
        for tensor, data in originals:
            tensor.data = data


def _resolve_folder(name_or_path, kwargs) -> str:
    """A local folder as is; otherwise a Hub repo id, fetched (or found in the cache) with huggingface_hub."""
    if os.path.isdir(name_or_path):
        return str(name_or_path)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            str(name_or_path),
            revision=kwargs.pop("revision", None),
            cache_dir=kwargs.pop("cache_dir", None),
            token=kwargs.pop("token", None),
            local_files_only=kwargs.pop("local_files_only", False),
            allow_patterns=["*.json", "*.safetensors", "*.md", "*.png"],
        )
    except Exception as error:  # huggingface_hub raises several types for missing, offline or private repos
        raise OSError(
            f"could not load {name_or_path!r}: it is not a local folder, and fetching it as a Hub repo failed "
            f"({type(error).__name__}: {error})"
        ) from error


def _component_class(entry, component: str):
    import diffusers

    import diffusers_scorekit

    if not (isinstance(entry, list) and len(entry) == 2):
        raise ValueError(f"model_index.json has no valid entry for {component!r}: {entry!r}")
    library, class_name = entry
    module = diffusers_scorekit if library.split(".")[0] == LIBRARY else diffusers
    if not hasattr(module, class_name):
        raise ValueError(f"model_index.json names {library}.{class_name} for {component!r}, which does not exist.")
    return getattr(module, class_name)


def _load_model(folder: str, component: str, entry, torch_dtype=None):
    model_class = _component_class(entry, component)
    weights = os.path.join(folder, component, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        others = sorted(os.listdir(os.path.join(folder, component))) if os.path.isdir(os.path.join(folder, component)) else []
        raise OSError(
            f"missing weights file {weights}" + (f" (found {others})" if others else "") +
            "; only safetensors weights are loaded (pickled .bin files are never unpickled)."
        )
    try:
        model, loading_info = model_class.from_pretrained(folder, subfolder=component, use_safetensors=True,
                                                          torch_dtype=torch_dtype, output_loading_info=True)
    except Exception as error:
        raise OSError(f"could not load {weights}: {type(error).__name__}: {error}") from error
    # diffusers only warns about these and leaves the weights random (or on the meta device)
    missing, mismatched = loading_info["missing_keys"], loading_info["mismatched_keys"]
    if missing or mismatched:
        raise OSError(f"{weights} does not hold all of {model_class.__name__}'s weights: " +
                      (f"missing {sorted(missing)}" if missing else "") + (", " if missing and mismatched else "") +
                      (f"of the wrong shape {[key for key, *_ in mismatched]}" if mismatched else "") + ".")
    return model


def _load_scheduler(folder: str, entry) -> ScoreSchedulerMixin:
    scheduler_class = _component_class(entry, "scheduler")
    config = scheduler_class.load_config(folder, subfolder="scheduler")
    if issubclass(scheduler_class, ScoreSchedulerMixin):
        return scheduler_class.from_config(config)
    return convert_diffusers_scheduler(dict(config, _class_name=scheduler_class.__name__))
