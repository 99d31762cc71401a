"""scorekit schedulers dropped into diffusers' own pipelines: DDPM, Stable Diffusion text-to-image, image-to-image
and inpainting, on tiny random models built offline (nothing from the Hub)."""

import json
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDPMPipeline,
    DDPMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)

from diffusers_scorekit import (
    AnnealedLangevinScheduler,
    PredictorCorrectorScheduler,
    ProbabilityFlowODEScheduler,
    VEEulerMaruyamaScheduler,
    VPEulerMaruyamaScheduler,
)

transformers = pytest.importorskip("transformers")

# Stable Diffusion's scheduler config (v1.x ships PNDM/DDIM with these fields)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1)
# every scorekit scheduler that runs a VP config: (name, how to build it from a config, NFE for n levels)
VP_SCHEDULERS = {
    "vp_em": (lambda config: VPEulerMaruyamaScheduler.from_config(config), lambda n: n),
    "pc": (lambda config: PredictorCorrectorScheduler.from_config(config), lambda n: n + (n - 1) + 1),
    "pc_ancestral_2_correctors": (
        lambda config: PredictorCorrectorScheduler.from_config(
            config, predictor="ancestral", corrector="annealed_langevin", num_corrector_steps=2
        ),
        lambda n: 2 * n + (n - 1) + 1,
    ),
    "ode_euler": (lambda config: ProbabilityFlowODEScheduler.from_config(config, solver="euler"), lambda n: n),
    "ode_heun": (lambda config: ProbabilityFlowODEScheduler.from_config(config, solver="heun"), lambda n: 2 * (n - 1) + 1),
    "ode_dpm_solver_2m": (lambda config: ProbabilityFlowODEScheduler.from_config(config), lambda n: n),
}


# --- the strength rule --------------------------------------------------------------------------------------

# (diffusers scheduler, its config): the grid a scorekit scheduler made from that config follows
STRENGTH_SOURCES = {
    "ddim_leading": ("DDIMScheduler", {}),
    "ddim_trailing": ("DDIMScheduler", {"timestep_spacing": "trailing", "steps_offset": 0}),
    "ddim_linspace": ("DDIMScheduler", {"timestep_spacing": "linspace", "steps_offset": 0}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "steps_offset": 0}),
    "dpm_solver_lu_lambdas": ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True, "steps_offset": 0}),
}


def img2img_start(scheduler, num_inference_steps, strength):
    """What StableDiffusionImg2ImgPipeline (and the inpainting pipeline) do with strength after
    ``set_timesteps(num_inference_steps)``: the slice and the entry it begins at."""
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=scheduler), num_inference_steps, strength, "cpu"
    )
    return timesteps, len(scheduler.timesteps) - len(timesteps)


@pytest.mark.parametrize("source", sorted(STRENGTH_SOURCES))
def test_strength_starts_where_the_diffusers_scheduler_of_that_config_starts(source):
    """The rule: the slice ``timesteps[t_start * order:]`` begins with the first call at level ``t_start``, and
    that level's t is within one step (1/n) of where the diffusers scheduler of the same config begins — plus,
    for DDIM's "leading" spacing, leading's own gap below t = 1 (its first timestep is not 999)."""
    name, kwargs = STRENGTH_SOURCES[source]
    schedule = {k: SD_SCHEDULER[k] for k in ("beta_start", "beta_end", "beta_schedule", "steps_offset")}
    reference = getattr(diffusers, name)(**{**schedule, **kwargs})
    for make, _ in VP_SCHEDULERS.values():
        scheduler = make(reference.config)
        for n in (3, 10, 25):
            reference.set_timesteps(n)
            scheduler.set_timesteps(n)
            gap = 1 - reference.timesteps[0].item() / 999
            for strength in (0.2, 0.6, 1.0):
                if int(n * strength) == 0:
                    continue  # no step left: the pipeline raises its own error
                timesteps, begin = img2img_start(scheduler, n, strength)
                reference_timesteps, reference_begin = img2img_start(reference, n, strength)
                assert begin % scheduler.order == 0 and timesteps[0] == scheduler.timesteps[begin]
                level = scheduler._stages[begin].level
                previous = scheduler._stages[begin - 1] if begin else None
                # the level's first call (Heun's correction that ends the step into the level comes before it)
                assert previous is None or previous.level < level or previous.kind == "heun_correct"
                assert level == reference_begin  # t_start (diffusers' schedulers here have order 1)
                t, reference_t = scheduler.level_of(begin).t, reference_timesteps[0].item() / 999
                assert abs(t - reference_t) <= 1 / n + gap + 1e-3, (source, type(scheduler).__name__, n, strength)


def test_every_class_has_order_entries_per_level():
    schedulers = [AnnealedLangevinScheduler(num_annealed_steps=3), VEEulerMaruyamaScheduler(),
                  PredictorCorrectorScheduler(num_corrector_steps=2), PredictorCorrectorScheduler(predictor="none"),
                  ProbabilityFlowODEScheduler(solver="heun")]
    for scheduler in schedulers:
        scheduler.set_timesteps(4)
        for k in range(3):  # the levels a step leaves (Heun has no step from the last level)
            entries = [i for i, stage in enumerate(scheduler._stages) if stage.level == k and stage.kind != "denoise"]
            if scheduler.config.get("solver") == "heun" and k > 0:
                entries = entries[1:]  # the correction that ends the previous step sits at level k first
            assert entries[0] == k * scheduler.order, (type(scheduler).__name__, k)


# --- DDPMPipeline and DDIMPipeline ----------------------------------------------------------------------------


def tiny_unet2d():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1,
    )


class CallCounter:
    """Counts a module's forward calls and records the timesteps it is called with."""

    def __init__(self, module):
        self.timesteps = []
        module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.timesteps.append(float(torch.as_tensor(timestep).flatten()[0]))


@pytest.mark.parametrize("name", sorted(VP_SCHEDULERS))
def test_ddpm_pipeline(name):
    make, nfe = VP_SCHEDULERS[name]
    unet = tiny_unet2d()
    counter = CallCounter(unet)
    pipe = DDPMPipeline(unet=unet, scheduler=make(DDPMScheduler().config))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=4, output_type="np", generator=torch.manual_seed(0)).images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    assert counter.timesteps == pipe.scheduler.timesteps.tolist() and len(counter.timesteps) == nfe(4)


def test_ddpm_pipeline_runs_a_fitted_grid_kept_in_the_scheduler_config():
    """``register_fitted_sigmas``: diffusers' own pipeline asks for ``set_timesteps(4)`` and gets the fitted grid."""
    unet = tiny_unet2d()
    counter = CallCounter(unet)
    scheduler = ProbabilityFlowODEScheduler.from_config(DDPMScheduler().config)
    scheduler.set_timesteps(4)
    fitted = [scheduler.sigmas[0].item(), 2.0, 0.5, 0.1]
    scheduler.register_fitted_sigmas(fitted)
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe(batch_size=2, num_inference_steps=4, output_type="np", generator=torch.manual_seed(0))
    assert pipe.scheduler.sigmas.tolist() == pytest.approx(fitted, rel=1e-12)
    assert counter.timesteps == pipe.scheduler.timesteps.tolist() and len(counter.timesteps) == 4


def test_ddim_pipeline_raises_pointing_to_ddpm_pipeline():
    """DDIMPipeline turns any scheduler into a DDIMScheduler when built; assigned afterwards, a scorekit scheduler
    refuses DDIM's eta argument with a pointer to the pipelines that run it."""
    pipe = DDIMPipeline(unet=tiny_unet2d(), scheduler=ProbabilityFlowODEScheduler.from_config(DDPMScheduler().config))
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    pipe.scheduler = ProbabilityFlowODEScheduler.from_config(DDPMScheduler().config)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(TypeError, match=r"\['eta', 'use_clipped_model_output'\].*DDPMPipeline"):
        pipe(batch_size=1, num_inference_steps=2, output_type="np")


# --- Stable Diffusion ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_components(tmp_path_factory):
    """A 32-pixel Stable Diffusion: UNet, VAE, CLIP text encoder and a CLIP tokenizer from a tiny vocabulary."""
    folder = tmp_path_factory.mktemp("tokenizer")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {token: i for i, token in enumerate(["<|startoftext|>", "<|endoftext|>"] + letters + [f"{c}</w>" for c in letters])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
    ).eval()
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)


def run_sd(pipeline_cls, components, scheduler, **call):
    pipe = pipeline_cls(**components, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    counter = CallCounter(components["unet"])
    callbacks = []

    def on_step_end(pipe, i, t, tensors):
        callbacks.append(float(t))
        return tensors

    image = pipe(prompt="a cat", guidance_scale=3.0, output_type="np", generator=torch.manual_seed(0),
                 callback_on_step_end=on_step_end, **call).images
    components["unet"]._forward_pre_hooks.clear()
    assert np.isfinite(image).all() and image.shape == (1, 32, 32, 3)
    assert counter.timesteps == callbacks  # one UNet call (CFG batches both halves) and one callback per entry
    return counter.timesteps


@pytest.mark.parametrize("name", sorted(VP_SCHEDULERS))
def test_stable_diffusion_txt2img_img2img_inpaint(name, sd_components):
    make, nfe = VP_SCHEDULERS[name]
    scheduler = make(diffusers.DDIMScheduler(**SD_SCHEDULER).config)
    n = 3
    calls = run_sd(StableDiffusionPipeline, sd_components, scheduler, num_inference_steps=n, height=32, width=32)
    assert calls == scheduler.timesteps.tolist() and len(calls) == nfe(n)

    image = torch.rand(1, 3, 32, 32, generator=torch.manual_seed(1))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    n, strength = 4, 0.5
    begin = (n - int(n * strength)) * scheduler.order
    for pipeline_cls, extra in ((StableDiffusionImg2ImgPipeline, {}), (StableDiffusionInpaintPipeline, {"mask_image": mask})):
        calls = run_sd(pipeline_cls, sd_components, scheduler, image=image, strength=strength, num_inference_steps=n,
                       **extra)
        assert calls == scheduler.timesteps[begin:].tolist(), pipeline_cls.__name__
