"""diffusers' scheduler conventions (the ideas of its SchedulerCommonTest) and drop-in use of diffusers configs."""

import json
import math
import re

import diffusers
import pytest
import torch

from diffusers_scorekit import (
    AnnealedLangevinScheduler,
    PredictorCorrectorScheduler,
    ProbabilityFlowODEScheduler,
    VEEulerMaruyamaScheduler,
    VPEulerMaruyamaScheduler,
)
from diffusers_scorekit.mixture import GaussianMixture
from oracle import exact_score_model

RING = GaussianMixture.ring()
DDPM_FAMILY = [
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
]
# every scheduler whose steps are independent per sample (score_sde's Langevin corrector couples a batch)
PER_SAMPLE = {
    "ald": lambda: AnnealedLangevinScheduler(num_annealed_steps=2),
    "ve_em": lambda: VEEulerMaruyamaScheduler(),
    "vp_em": lambda: VPEulerMaruyamaScheduler(),
    "pc_annealed": lambda: PredictorCorrectorScheduler(sde_type="vp", corrector="annealed_langevin", prediction_type="epsilon"),
    "ode_heun": lambda: ProbabilityFlowODEScheduler(solver="heun"),
    "ode_dpm_solver_2m": lambda: ProbabilityFlowODEScheduler(),
}


def loop(scheduler, model, x, generator=None, timesteps=None):
    for t in scheduler.timesteps if timesteps is None else timesteps:
        x = scheduler.step(model(x, t), t, x, generator=generator).prev_sample
    return x


def public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


# --- from_config of every diffusers family --------------------------------------------------------------


@pytest.mark.parametrize("name", DDPM_FAMILY)
def test_every_ddpm_family_config_gives_its_vp_schedule_in_memory_and_from_disk(name, tmp_path):
    source = getattr(diffusers, name)(beta_schedule="scaled_linear", prediction_type="v_prediction")
    source.save_config(tmp_path)
    betas = {"beta_start": source.config.beta_start, "beta_end": source.config.beta_end}  # Heun's defaults differ
    reference = diffusers.DDPMScheduler(beta_schedule="scaled_linear", **betas).alphas_cumprod.double()
    for scheduler in (ProbabilityFlowODEScheduler.from_config(source.config), ProbabilityFlowODEScheduler.from_pretrained(tmp_path)):
        config = scheduler.config
        assert (scheduler.sde_type, config.prediction_type, config.timestep_type) == ("vp", "v_prediction", "discrete")
        assert (config.time_spacing, scheduler.sampling_eps, config.solver) == ("uniform", 0.0, "dpm_solver_2m")
        a, _ = scheduler.sde.marginal(torch.tensor([0.0, 500 / 999, 1.0], dtype=torch.float64))
        torch.testing.assert_close(a**2, reference[[0, 500, 999]], rtol=1e-12, atol=0)


def test_score_sde_ve_config_in_memory_and_from_disk(tmp_path):
    source = diffusers.ScoreSdeVeScheduler(sigma_max=80.0, snr=0.2, correct_steps=3)
    source.save_config(tmp_path)
    for scheduler in (PredictorCorrectorScheduler.from_config(source.config), PredictorCorrectorScheduler.from_pretrained(tmp_path)):
        config = scheduler.config
        assert (config.sde_type, config.sigma_max, config.snr, config.num_corrector_steps) == ("ve", 80.0, 0.2, 3)
        assert (config.prediction_type, config.timestep_type, config.predictor) == ("score", "sigma", "reverse_diffusion")


@pytest.mark.parametrize(
    "name, kwargs, spacing",
    [
        ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "edm"),
        ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True}, "log_snr"),
        ("DDIMScheduler", {"timestep_spacing": "trailing", "steps_offset": 1}, "uniform"),
    ],
)
def test_spacings_translate(name, kwargs, spacing):
    scheduler = VPEulerMaruyamaScheduler.from_config(getattr(diffusers, name)(**kwargs).config)
    assert scheduler.config.time_spacing == spacing


@pytest.mark.parametrize(
    "name, kwargs, field",
    [
        ("DDIMScheduler", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ("EulerDiscreteScheduler", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
        ("LMSDiscreteScheduler", {"use_beta_sigmas": True}, "use_beta_sigmas"),
        ("DDPMScheduler", {"thresholding": True}, "thresholding"),
        ("DDPMScheduler", {"variance_type": "learned_range"}, "variance_type"),
        ("EulerDiscreteScheduler", {"timestep_type": "continuous"}, "timestep_type"),
        ("EulerDiscreteScheduler", {"sigma_min": 0.1, "sigma_max": 10.0}, "sigma_min"),
        ("DPMSolverMultistepScheduler", {"prediction_type": "flow_prediction", "use_flow_sigmas": True}, "use_flow_sigmas"),
        ("UniPCMultistepScheduler", {"prediction_type": "flow_prediction"}, "prediction_type"),
    ],
)
def test_fields_that_cannot_translate_raise_naming_the_field(name, kwargs, field):
    config = getattr(diffusers, name)(**kwargs).config
    with pytest.raises(ValueError, match=f"{field}=.* in the {name}|{field}=.* in the DDPM-family"):
        ProbabilityFlowODEScheduler.from_config(config)


def test_a_config_of_an_unknown_class_raises():
    with pytest.raises(ValueError, match="_class_name='FlowMatchEulerDiscreteScheduler'"):
        ProbabilityFlowODEScheduler.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})


def test_ve_only_classes_name_the_classes_that_take_a_vp_config():
    with pytest.raises(ValueError, match="VPEulerMaruyamaScheduler") as error:
        AnnealedLangevinScheduler.from_config(diffusers.DDIMScheduler().config)
    assert "sde_type='vp'" in str(error.value)


def test_round_trips_through_diffusers_keep_sde_spacing_and_solver():
    sources = [
        ProbabilityFlowODEScheduler(sde_type="subvp", beta_schedule="linear", solver="heun", time_spacing="edm", edm_rho=5.0),
        PredictorCorrectorScheduler(sde_type="vp", beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                                    timestep_type="discrete", snr=0.1, num_corrector_steps=2),
    ]
    for source in sources:
        for diffusers_name in ("DDPMScheduler", "EulerDiscreteScheduler", "DPMSolverSinglestepScheduler"):
            middle = getattr(diffusers, diffusers_name).from_config(source.config)
            back = type(source).from_config(middle.config)
            assert public(back.config) == public(source.config), diffusers_name
    # diffusers drops the fields a config left at their defaults (``_use_default_values``), so that the target
    # class's defaults apply: only fields set explicitly survive a class that has a field of the same name
    ve = ProbabilityFlowODEScheduler(sde_type="ve", prediction_type="epsilon", timestep_type="log_sigma", solver="euler",
                                     sigma_max=80.0, sampling_eps=1e-4, num_train_timesteps=1000)
    back = ProbabilityFlowODEScheduler.from_config(diffusers.ScoreSdeVeScheduler.from_config(ve.config).config)
    assert public(back.config) == public(ve.config)


def test_diffusers_private_keys_are_kept(tmp_path):
    diffusers.DDPMScheduler().save_config(tmp_path)
    for scheduler in (PredictorCorrectorScheduler.from_pretrained(tmp_path),
                      VPEulerMaruyamaScheduler.from_config(diffusers.DDPMScheduler.from_pretrained(tmp_path).config)):
        assert scheduler.config._diffusers_version == diffusers.__version__
        assert scheduler.config._class_name == type(scheduler).__name__


def test_from_config_between_scorekit_classes_keeps_the_sde():
    scheduler = VPEulerMaruyamaScheduler(beta_max=12.0, prediction_type="v_prediction", time_spacing="log_snr")
    for cls in (PredictorCorrectorScheduler, ProbabilityFlowODEScheduler, VPEulerMaruyamaScheduler):
        scheduler = cls.from_config(scheduler.config)
    assert public(scheduler.config) == public(
        VPEulerMaruyamaScheduler(beta_max=12.0, prediction_type="v_prediction", time_spacing="log_snr").config
    )


# --- SchedulerCommonTest's ideas ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PER_SAMPLE))
def test_shapes_dtypes_generators_and_batches(name):
    scheduler = PER_SAMPLE[name]()
    scheduler.set_timesteps(4)
    for shape in [(3,), (2, 5), (2, 3, 4, 4), (1, 2, 2, 3, 3)]:
        x = torch.randn(shape)
        out = scheduler.step(0.1 * x, scheduler.timesteps[0], x)
        assert out.prev_sample.shape == shape and out.pred_original_sample.shape == shape
        scheduler.set_timesteps(4)
    exact = exact_score_model(GaussianMixture.ring(std=0.5), scheduler)  # smooth enough for half precision
    model = lambda x, t: exact(x.float(), t).to(x.dtype)  # noqa: E731
    generators = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    initial = torch.randn(3, 2, generator=torch.Generator().manual_seed(5)) * scheduler.init_noise_sigma
    steps = 10  # accurate enough that half-precision rounding is not amplified
    scheduler.set_timesteps(steps)
    full = loop(scheduler, model, initial, generator=generators())
    for i in range(3):  # a batch of many = the same samples one at a time, each with its generator
        scheduler.set_timesteps(steps)
        single = loop(scheduler, model, initial[i : i + 1], generator=torch.Generator().manual_seed(i))
        torch.testing.assert_close(single[0], full[i], rtol=1e-5, atol=1e-5)
    scheduler.set_timesteps(steps)
    torch.testing.assert_close(loop(scheduler, model, initial, generator=generators()), full, rtol=0, atol=0)
    # bfloat16 keeps 8 bits: VE's start at sigma_max = 50 is rounded by up to 0.2, mostly contracted by the end
    for dtype, tolerance in ((torch.float16, 0.01), (torch.bfloat16, 0.1)):
        scheduler.set_timesteps(steps)
        low = loop(scheduler, model, initial.to(dtype), generator=generators())
        assert low.dtype == dtype
        torch.testing.assert_close(low.float(), full, rtol=tolerance, atol=tolerance)


def test_changing_num_inference_steps_between_runs():
    scheduler, fresh = ProbabilityFlowODEScheduler(solver="heun"), ProbabilityFlowODEScheduler(solver="heun")
    model = exact_score_model(RING, scheduler)
    x = torch.randn(8, 2)
    for steps in (3, 7, 4):
        scheduler.set_timesteps(steps)
        fresh.set_timesteps(steps)
        assert len(scheduler.timesteps) == 2 * (steps - 1) + 1
        torch.testing.assert_close(loop(scheduler, model, x), loop(fresh, model, x), rtol=0, atol=0)
        fresh = ProbabilityFlowODEScheduler(solver="heun")


def test_add_noise_takes_every_timestep_form():
    scheduler = VPEulerMaruyamaScheduler.from_config(diffusers.DDPMScheduler().config)
    alphas_cumprod = diffusers.DDPMScheduler().alphas_cumprod.double()
    x0, noise = torch.randn(2, 3), torch.randn(2, 3)

    def expected(indices):
        a2 = alphas_cumprod[torch.as_tensor(indices)].reshape(-1, 1)
        return (a2.sqrt() * x0 + (1 - a2).sqrt() * noise).float()

    for timesteps, indices in [(500, [500]), (500.0, [500]), (torch.tensor(500), [500]), ([100, 900], [100, 900]),
                               (torch.tensor([100, 900]), [100, 900]), (torch.tensor([100.0, 900.0]), [100, 900])]:
        torch.testing.assert_close(scheduler.add_noise(x0, noise, timesteps), expected(indices), rtol=1e-5, atol=1e-6)


# --- custom schedules -------------------------------------------------------------------------------------


def test_custom_timesteps_and_sigmas_give_that_grid():
    scheduler = ProbabilityFlowODEScheduler.from_config(diffusers.DDIMScheduler().config)
    scheduler.set_timesteps(6)
    grid = scheduler.timesteps.clone()
    noise_ratios = [scheduler.level_of(i).noise_ratio for i in range(6)]
    scheduler.set_timesteps(timesteps=grid.tolist())
    torch.testing.assert_close(scheduler.timesteps, grid, rtol=0, atol=0)
    scheduler.set_timesteps(sigmas=noise_ratios)
    torch.testing.assert_close(scheduler.timesteps, grid, rtol=1e-5, atol=1e-3)
    assert scheduler.num_inference_steps == 6
    timesteps, count = diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.retrieve_timesteps(
        scheduler, timesteps=[999, 500, 10]
    )
    assert count == 3 and timesteps.tolist() == [999.0, 500.0, 10.0]
    timesteps, _ = diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.retrieve_timesteps(
        scheduler, sigmas=[10.0, 1.0, 0.1]
    )
    assert [round(scheduler.level_of(i).noise_ratio, 9) for i in range(3)] == [10.0, 1.0, 0.1]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"timesteps": [10, 500]}, ValueError, "timesteps=.*strictly decreasing"),
        ({"timesteps": [1200, 10]}, ValueError, r"timesteps=.*lie in \[0, 999\]"),
        ({"sigmas": [200.0, 1.0]}, ValueError, "sigmas=.*lie in"),
        ({"sigmas": [1.0, 0.0]}, ValueError, "sigmas=.*denoise_final"),
        ({"sigmas": ["1", "0.5"]}, TypeError, "sigmas=.*list of numbers"),
        ({"num_inference_steps": 5, "timesteps": [10, 5]}, ValueError, "exactly one of"),
        ({"num_inference_steps": True}, ValueError, "num_inference_steps=True"),
        ({"num_inference_steps": 2.0}, ValueError, "num_inference_steps=2.0"),
        ({"num_inference_steps": 10**9}, ValueError, "num_inference_steps=1000000000 .*at most 100000"),
    ],
)
def test_bad_set_timesteps_calls(kwargs, error, match):
    with pytest.raises(error, match=match):
        ProbabilityFlowODEScheduler.from_config(diffusers.DDIMScheduler().config).set_timesteps(**kwargs)


def test_huge_counts_are_refused_before_allocating():
    scheduler = AnnealedLangevinScheduler(num_annealed_steps=100)
    with pytest.raises(ValueError, match="1000000 model calls .*100 per level"):
        scheduler.set_timesteps(20_000)


# --- beginning mid-schedule -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pc_annealed", "ode_heun", "ode_dpm_solver_2m", "ald"])
def test_a_loop_over_a_slice_begins_where_the_slice_does(name):
    """Like diffusers' index_for_timestep: the first timestep tells the entry. A slice (views of timesteps),
    plain numbers, and set_begin_index all give the same samples."""
    scheduler = PER_SAMPLE[name]()
    model = exact_score_model(RING, scheduler)
    scheduler.set_timesteps(5)
    begin = 2 * scheduler.order
    x = torch.randn(16, 2) * scheduler.level_of(begin).sigma
    runs = []
    for form in ("slice", "numbers", "set_begin_index"):
        scheduler.set_timesteps(5)
        timesteps = scheduler.timesteps[begin:]
        if form == "numbers":
            timesteps = timesteps.tolist()
        if form == "set_begin_index":
            scheduler.set_begin_index(begin)
        runs.append(loop(scheduler, model, x, generator=torch.Generator().manual_seed(0), timesteps=timesteps))
        assert scheduler.begin_index == begin and scheduler.step_index == len(scheduler.timesteps)
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=0)
    torch.testing.assert_close(runs[2], runs[0], rtol=0, atol=0)


def test_out_of_order_and_unknown_timesteps_raise():
    scheduler = PredictorCorrectorScheduler()
    scheduler.set_timesteps(4)
    x = torch.randn(2, 2)
    with pytest.raises(ValueError, match="timestep=1234, which is no entry of scheduler.timesteps"):
        scheduler.step(x, 1234.0, x)
    scheduler.step(x, scheduler.timesteps[2], x)  # begins at entry 2
    with pytest.raises(ValueError, match="called with entry 5 but the next entry is 3"):
        scheduler.step(x, scheduler.timesteps[5], x)
    with pytest.raises(ValueError, match="timestep=50.0 but the next entry is 3"):
        scheduler.step(x, 50.0, x)


# --- differentiable step, DDIM's arguments, noise_scale ---------------------------------------------------


def test_step_is_differentiable_with_the_planned_coefficients():
    scheduler = ProbabilityFlowODEScheduler(solver="euler")
    scheduler.set_timesteps(4)
    x = torch.randn(3, 2, requires_grad=True)
    output = (0.5 * x).detach().requires_grad_(True)
    prev = scheduler.step(output, scheduler.timesteps[0], x).prev_sample
    grad_output, grad_x = torch.autograd.grad(prev.sum(), (output, x))
    hi, lo = scheduler.level_of(0), scheduler.level_of(1)
    # DDIM: x_lo = a_lo (x / a_hi + (s_lo - s_hi) eps)
    torch.testing.assert_close(grad_output, torch.full_like(x, lo.a * (lo.noise_ratio - hi.noise_ratio)))
    torch.testing.assert_close(grad_x, torch.full_like(x, lo.a / hi.a))
    with pytest.raises(ValueError, match="NaN"):
        scheduler.step(torch.full_like(x, math.nan).requires_grad_(True), scheduler.timesteps[1], prev)


def test_ddim_arguments_raise_pointing_to_ddpm_pipeline():
    scheduler = ProbabilityFlowODEScheduler()
    scheduler.set_timesteps(3)
    x = torch.randn(2, 2)
    with pytest.raises(TypeError, match=r"\['eta', 'use_clipped_model_output'\].*DDPMPipeline"):
        scheduler.step(x, scheduler.timesteps[0], x, eta=0.0, use_clipped_model_output=None)


def test_noise_scale_zero_is_exact_score_ascent():
    """On one Gaussian N(mu, s^2) the smoothed score is -(x - mu) / (s^2 + sigma^2): noise-free ascent contracts
    x - mu by exactly (1 - alpha_i / (s^2 + sigma_i^2)) per step, whatever the generator."""
    mu, s = torch.tensor([[0.7, -0.4]]), 0.3
    gaussian = GaussianMixture([1.0], mu, torch.tensor([s]))
    scheduler = AnnealedLangevinScheduler(num_annealed_steps=3, step_lr=1e-3, sigma_min=0.1, noise_scale=0.0)
    model = exact_score_model(gaussian, scheduler)
    x = torch.randn(5, 2, dtype=torch.float64)
    samples = []
    for seed in (0, 1):
        scheduler.set_timesteps(4)
        samples.append(loop(scheduler, model, x, generator=torch.Generator().manual_seed(seed)))
    factor = 1.0
    for i in range(len(scheduler.timesteps)):
        sigma = scheduler.level_of(i).sigma
        step = sigma**2 if i == len(scheduler.timesteps) - 1 else 1e-3 * (sigma / 0.1) ** 2  # the denoising step
        factor *= 1 - step / (s**2 + sigma**2)
    # the model is called with float32 timesteps (sigma rounded to float32)
    torch.testing.assert_close(samples[0], mu.double() + factor * (x - mu.double()), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(samples[1], samples[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="noise_scale=-1.0"):
        AnnealedLangevinScheduler(noise_scale=-1.0)


# --- bad input (scheduler side) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: VEEulerMaruyamaScheduler(sigma_max=math.inf), ValueError, "sigma_max=inf .*finite"),
        (lambda: VPEulerMaruyamaScheduler(beta_max=math.nan), ValueError, "beta_max=nan .*finite"),
        (lambda: PredictorCorrectorScheduler(snr="0.16"), TypeError, "snr='0.16' .*number, not str"),
        (lambda: PredictorCorrectorScheduler(num_corrector_steps=1.0), TypeError, "num_corrector_steps=1.0 .*integer"),
        (lambda: ProbabilityFlowODEScheduler(denoise_final="yes"), TypeError, "denoise_final='yes'"),
        (lambda: ProbabilityFlowODEScheduler(solver=3), ValueError, "solver=3"),
        (lambda: VPEulerMaruyamaScheduler(trained_betas=["a"]), TypeError, "trained_betas="),
        (lambda: PredictorCorrectorScheduler(predictor="none", corrector="none"), ValueError, "predictor='none'"),
    ],
)
def test_bad_config_values(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_a_config_json_with_a_string_number_names_the_field(tmp_path):
    VEEulerMaruyamaScheduler().save_config(tmp_path)
    path = tmp_path / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "sigma_max": "50"}))
    with pytest.raises(TypeError, match="sigma_max='50'"):
        VEEulerMaruyamaScheduler.from_pretrained(tmp_path)


def test_bad_step_inputs():
    scheduler = VEEulerMaruyamaScheduler()
    scheduler.set_timesteps(3)
    t, x = scheduler.timesteps[0], torch.randn(2, 2)
    with pytest.raises(TypeError, match="sample must be a floating-point tensor, got torch.int64"):
        scheduler.step(x, t, torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="model_output is on meta but sample is on cpu"):
        scheduler.step(torch.empty(2, 2, device="meta"), t, x)
    with pytest.raises(TypeError, match="original_samples must be a floating-point tensor, got torch.uint8"):
        scheduler.add_noise(torch.ones(2, 2, dtype=torch.uint8), x, t)
    with pytest.raises(ValueError, match=r"the sample passed to step 0 of 3 .*NaN or Inf"):
        scheduler.step(x, t, torch.tensor([[1.0, math.inf], [0.0, 0.0]]))


# --- exact values and messages of the shared scheduler machinery ----------------------------------------------


def _ode_on_ddpm(num_train_timesteps=500):
    return ProbabilityFlowODEScheduler.from_config(diffusers.DDPMScheduler(num_train_timesteps=num_train_timesteps).config)


def test_add_noise_is_diffusers_own_on_its_schedule():
    reference = diffusers.DDPMScheduler(num_train_timesteps=500)
    x_0, noise = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0)), torch.randn(3, 2, 4)
    timesteps = torch.tensor([499, 250, 0])
    expected = reference.add_noise(x_0, noise, timesteps)
    ours = _ode_on_ddpm()
    torch.testing.assert_close(ours.add_noise(x_0, noise, timesteps), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.add_noise(x_0, noise, [499, 250, 0]), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match=r"^noise must be a floating-point tensor, got torch\.int64\.$"):
        ours.add_noise(x_0, torch.zeros(3, 2, 4, dtype=torch.int64), timesteps)
    with pytest.raises(TypeError, match=r"^original_samples must be a floating-point tensor, got list\.$"):
        ours.add_noise([1.0], noise, timesteps)


def test_custom_grids_accept_their_range_ends_and_name_what_is_wrong():
    scheduler = _ode_on_ddpm()
    scheduler.set_timesteps(timesteps=[499, 0])  # the range's two ends, t = 1 and t = 0
    assert scheduler.timesteps.tolist() == [499.0, 0.0]
    top = scheduler.level_of(0).noise_ratio
    scheduler.set_timesteps(sigmas=[top, 0.5])
    assert scheduler.level_of(0).noise_ratio == pytest.approx(top, rel=1e-9)
    bad = {
        "timesteps=[500.0, 0.0] is invalid: its values must lie in [0, 499] (t from 0 to 1).": dict(timesteps=[500, 0]),
        "timesteps=[10.0, 10.0] is invalid: it must be finite and strictly decreasing.": dict(timesteps=[10, 10]),
        "timesteps=[nan, 1.0] is invalid: it must be finite and strictly decreasing.": dict(timesteps=[math.nan, 1]),
        "len(timesteps)=0 is invalid: it must be an integer >= 1.": dict(timesteps=[]),
        f"sigmas=[{top * 1.01!r}, 0.5] is invalid: its values must lie in ": dict(sigmas=[top * 1.01, 0.5]),
        "sigmas=[1.0, -0.5] is invalid: its values must lie in ": dict(sigmas=[1.0, -0.5]),
    }
    for message, kwargs in bad.items():
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            scheduler.set_timesteps(**kwargs)
    with pytest.raises(ValueError, match=re.escape(" and be positive: the final step to sigma = 0 is denoise_final's")):
        scheduler.set_timesteps(sigmas=[1.0, 0.0])


def test_begin_index_takes_any_entry_and_the_end():
    scheduler = _ode_on_ddpm()
    with pytest.raises(ValueError, match="^set_begin_index was called before set_timesteps"):
        scheduler.set_begin_index(0)
    scheduler.set_timesteps(4)
    scheduler.set_begin_index(4)  # an empty loop (img2img at strength 0)
    scheduler.set_begin_index(2)
    x = torch.ones(2, 3)
    stepped = scheduler.step(torch.zeros(2, 3), scheduler.timesteps[2], x).prev_sample
    assert scheduler.step_index == 3
    fresh = _ode_on_ddpm()
    fresh.set_timesteps(4)
    torch.testing.assert_close(stepped, fresh.step(torch.zeros(2, 3), fresh.timesteps[2], x).prev_sample)
    for index in (5, -1, 2.0, True):
        with pytest.raises(ValueError, match=re.escape(f"begin_index={index!r} is invalid: it must be an integer in [0, 4].")):
            scheduler.set_begin_index(index)


def test_non_finite_errors_say_where():
    scheduler = _ode_on_ddpm()
    scheduler.set_timesteps(3)
    x = torch.ones(2, 3)
    level = scheduler.level_of(0)
    where = f"step 0 of 3 (t={level.t:.6g}, sigma={level.sigma:.6g}, timestep={level.timestep:.6g})"
    with pytest.raises(ValueError, match=re.escape(f"model output (or the sample entering the loop) at {where} contains NaN or Inf.")):
        scheduler.step(torch.full((2, 3), math.nan), scheduler.timesteps[0], x)
    scheduler.set_timesteps(3)
    x = scheduler.step(torch.zeros(2, 3), scheduler.timesteps[0], x).prev_sample
    level = scheduler.level_of(1)
    where = f"step 1 of 3 (t={level.t:.6g}, sigma={level.sigma:.6g}, timestep={level.timestep:.6g})"
    with pytest.raises(ValueError, match="^" + re.escape(f"model output at {where} contains NaN or Inf.")):
        scheduler.step(torch.full((2, 3), math.inf), scheduler.timesteps[1], x)


_SPACED = "scorekit spaces levels uniformly in t, in log-SNR or by Karras' rho (use_karras_sigmas)"


@pytest.mark.parametrize("name, kwargs, message", [
    ("DDIMScheduler", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr=True in the DDPM-family config is "
     "not supported: zero terminal SNR puts sigma / a = inf at t = 1, where no SDE can start."),
    ("EulerDiscreteScheduler", {"use_exponential_sigmas": True}, f"use_exponential_sigmas=True in the DDPM-family "
     f"config is not supported: {_SPACED}."),
    ("LMSDiscreteScheduler", {"use_beta_sigmas": True}, f"use_beta_sigmas=True in the DDPM-family config is not "
     f"supported: {_SPACED}."),
    ("DDPMScheduler", {"thresholding": True}, "thresholding=True in the DDPM-family config is not supported: dynamic "
     "thresholding is not a step of a score SDE sampler; set it to False."),
    ("DDPMScheduler", {"variance_type": "learned_range"}, "variance_type='learned_range' in the DDPM-family config is "
     "not supported: a model with learned variance outputs twice the sample's channels."),
    ("DDPMScheduler", {"variance_type": "learned"}, "variance_type='learned' in the DDPM-family config is not "
     "supported: a model with learned variance outputs twice the sample's channels."),
    ("EulerDiscreteScheduler", {"timestep_type": "continuous"}, "timestep_type='continuous' in the DDPM-family config "
     "is not supported: only discrete training timesteps translate."),
    ("EulerDiscreteScheduler", {"sigma_min": 0.1}, "sigma_min=0.1 in the DDPM-family config is not supported: on a VP "
     "schedule the sigma range is the beta schedule's; leave it None."),
    ("EulerDiscreteScheduler", {"sigma_max": 10.0}, "sigma_max=10.0 in the DDPM-family config is not supported: on a "
     "VP schedule the sigma range is the beta schedule's; leave it None."),
    ("DPMSolverMultistepScheduler", {"prediction_type": "flow_prediction", "use_flow_sigmas": True}, "use_flow_sigmas="
     "True in the DDPM-family config is not supported: flow-matching models are not score models."),
    ("UniPCMultistepScheduler", {"prediction_type": "flow_prediction"}, "prediction_type='flow_prediction' in the "
     "DDPM-family config is not supported: choose one of ('epsilon', 'score', 'sample', 'v_prediction')."),
    ("DDIMScheduler", {"timestep_spacing": "karras"}, "timestep_spacing='karras' in the DDPM-family config is not "
     "supported: choose linspace, leading or trailing."),
])
def test_untranslatable_fields_say_why(name, kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        ProbabilityFlowODEScheduler.from_config(getattr(diffusers, name)(**kwargs).config)
