"""The diffusers scheduler contract, for every scorekit scheduler, and equivalences with known samplers."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from diffusers import DDPMScheduler, ScoreSdeVeScheduler

from diffusers_scorekit import (
    AnnealedLangevinScheduler,
    PredictorCorrectorScheduler,
    ProbabilityFlowODEScheduler,
    VEEulerMaruyamaScheduler,
    VPEulerMaruyamaScheduler,
)
from oracle import GaussianMixture, exact_score_model, run_loop

# (scheduler, num_inference_steps, expected NFE)
CASES = {
    "ald": (lambda: AnnealedLangevinScheduler(num_annealed_steps=3), 4, 4 * 3 + 1),
    "ve_em": (lambda: VEEulerMaruyamaScheduler(), 6, 6),
    "vp_em": (lambda: VPEulerMaruyamaScheduler(), 6, 6),
    "subvp_em_no_denoise": (lambda: VPEulerMaruyamaScheduler(sde_type="subvp", denoise_final=False), 6, 5),
    "pc_ve": (lambda: PredictorCorrectorScheduler(num_corrector_steps=2), 5, 5 * 2 + 4 + 1),
    "pc_vp_ancestral": (
        lambda: PredictorCorrectorScheduler(sde_type="vp", predictor="ancestral", corrector="none", prediction_type="epsilon"),
        5,
        5,
    ),
    "pc_annealed_only": (lambda: PredictorCorrectorScheduler(predictor="none", corrector="annealed_langevin"), 5, 6),
    "ode_heun": (lambda: ProbabilityFlowODEScheduler(solver="heun"), 5, 2 * 4 + 1),
    "ode_dpm_solver_2m": (lambda: ProbabilityFlowODEScheduler(), 5, 5),
    "ode_euler_ve": (lambda: ProbabilityFlowODEScheduler(sde_type="ve", solver="euler", prediction_type="score"), 5, 5),
}

RING = GaussianMixture.ring()


@pytest.fixture(params=sorted(CASES))
def case(request):
    make, steps, nfe = CASES[request.param]
    return make(), steps, nfe


def test_nfe_is_len_timesteps(case):
    scheduler, steps, nfe = case
    scheduler.set_timesteps(steps)
    assert len(scheduler.timesteps) == nfe
    calls = []

    def model(x, t):
        calls.append(t)
        return exact_score_model(RING, scheduler)(x, t)

    run_loop(scheduler, model, (16, 2), steps)
    assert len(calls) == nfe


def test_step_output_and_determinism(case):
    scheduler, steps, _ = case
    model = exact_score_model(RING, scheduler)
    first = run_loop(scheduler, model, (32, 2), steps, seed=3)
    second = run_loop(scheduler, model, (32, 2), steps, seed=3)
    third = run_loop(scheduler, model, (32, 2), steps, seed=4)
    assert torch.equal(first, second)
    assert not torch.equal(first, third)
    assert torch.isfinite(first).all()

    scheduler.set_timesteps(steps)
    x = torch.randn(4, 2) * scheduler.init_noise_sigma
    t = scheduler.timesteps[0]
    output = scheduler.step(model(x, t), t, x)
    assert output.prev_sample.shape == x.shape and output.pred_original_sample.shape == x.shape
    scheduler.set_timesteps(steps)
    as_tuple = scheduler.step(model(x, t), float(t), x, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2


def test_timestep_python_number_and_half_precision(case):
    scheduler, steps, _ = case
    model = exact_score_model(RING, scheduler)
    scheduler.set_timesteps(steps)
    x = (torch.randn(8, 2) * scheduler.init_noise_sigma).to(torch.bfloat16)
    for t in scheduler.timesteps.tolist():
        x = scheduler.step(model(x.float(), t).to(torch.bfloat16), t, x).prev_sample
    assert x.dtype == torch.bfloat16 and torch.isfinite(x.float()).all()


def test_step_makes_no_data_dependent_host_call(case):
    """On meta tensors any .item(), bool(tensor) or data-dependent branch raises: the step has none."""
    scheduler, steps, _ = case
    scheduler.set_timesteps(steps, device="meta")
    x = torch.empty(8, 3, 4, 4, device="meta")
    for t in scheduler.timesteps:
        x = scheduler.step(torch.empty_like(x), t, x).prev_sample
    assert x.device.type == "meta"


class CountKernels(TorchDispatchMode):
    """Counts the aten operations that launch work (views and indexing launch none)."""

    VIEWS = {"view", "select", "slice", "as_strided", "expand", "unsqueeze", "squeeze", "reshape", "alias", "detach",
             "_unsafe_view", "t", "transpose", "permute"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.VIEWS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_a_step_is_a_handful_of_kernels(case):
    """Update rules are planned into one multiply-add per input in set_timesteps (linear_combination): on an
    accelerator a step is the non-finite sum, two kernels of x_0, the noise and three of the update; a Heun
    correction reads four inputs and draws no noise. Only score_sde's Langevin corrector, whose step size is a
    batch statistic, computes on tensors."""
    scheduler, steps, _ = case
    scheduler.set_timesteps(steps, device="meta")
    x = torch.empty(8, 3, 4, 4, device="meta")
    model_output = torch.empty_like(x)
    for index, t in enumerate(scheduler.timesteps):
        with CountKernels() as counter:
            x = scheduler.step(model_output, t, x).prev_sample
        is_snr_langevin = scheduler._stages[index].kind == "correct" and scheduler.corrector == "langevin"
        # the first step allocates the sums' buffer and also sums the sample entering the loop
        budget = (24 if is_snr_langevin else 7) + 3 * (index == 0)
        assert counter.count <= budget, (index, scheduler._stages[index], counter.count)


def test_whole_loop_compiles_to_one_graph_with_identical_output(case):
    """The plain loop has no host sync and no graph break, so torch.compile(fullgraph=True) captures it whole
    (what CUDA graphs and mode="reduce-overhead" need); aot_eager runs the functionalised graph that inductor
    would compile. Noise comes from the global generator: torch.Generator arguments do not trace."""
    scheduler, steps, _ = case
    torch._dynamo.reset()  # each case is a new graph of the same function: start the recompile count afresh

    def loop(x):
        for t in scheduler.timesteps:
            x = scheduler.step(0.3 * x + 1e-3 * t, t, x).prev_sample  # a stand-in model
        return x

    initial = torch.randn(16, 2)
    samples = []
    for run in (loop, torch.compile(loop, fullgraph=True, backend="aot_eager")):
        scheduler.set_timesteps(steps)
        torch.manual_seed(0)
        samples.append(run(initial))
    torch.testing.assert_close(samples[1], samples[0], rtol=0, atol=0)


def test_save_load_round_trip(case, tmp_path):
    scheduler, steps, _ = case
    scheduler.save_config(tmp_path)
    reloaded = type(scheduler).from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(reloaded.config) == public(scheduler.config)
    scheduler.set_timesteps(steps)
    reloaded.set_timesteps(steps)
    assert torch.equal(scheduler.timesteps, reloaded.timesteps)


def test_add_noise_uses_the_marginal(case):
    scheduler, steps, _ = case
    scheduler.set_timesteps(steps)
    x0, noise = torch.randn(3, 2), torch.randn(3, 2)
    timesteps = scheduler.timesteps[:3]
    noisy = scheduler.add_noise(x0, noise, timesteps)
    for i in range(3):
        level = scheduler.level_of(i)
        assert torch.allclose(noisy[i], level.a * x0[i] + level.sigma * noise[i], rtol=1e-5, atol=1e-5)


def test_compatibles_lists_diffusers_and_scorekit():
    names = {cls.__name__ for cls in VPEulerMaruyamaScheduler().compatibles}
    assert {"DDPMScheduler", "ScoreSdeVeScheduler", "ProbabilityFlowODEScheduler", "AnnealedLangevinScheduler"} <= names


# --- from_config -------------------------------------------------------------------------------------------


def test_from_ddpm_config_gives_that_vp_schedule():
    ddpm = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", num_train_timesteps=500)
    for cls in (VPEulerMaruyamaScheduler, PredictorCorrectorScheduler, ProbabilityFlowODEScheduler):
        scheduler = cls.from_config(ddpm.config)
        assert scheduler.config.prediction_type == "v_prediction"
        assert scheduler.config.timestep_type == "discrete"
        assert scheduler.sde_type == "vp"
        a, _ = scheduler.sde.marginal(torch.arange(500, dtype=torch.float64) / 499)
        assert torch.allclose(a**2, ddpm.alphas_cumprod.double(), rtol=1e-3)
        scheduler.set_timesteps(500)
        assert scheduler.timesteps[0] == 499 and scheduler.timesteps[-1] == 0


def test_from_saved_ddpm_config_with_defaults(tmp_path):
    """A saved config lists its default-valued keys in _use_default_values; they must still carry over."""
    DDPMScheduler().save_config(tmp_path)
    scheduler = PredictorCorrectorScheduler.from_pretrained(tmp_path)
    assert scheduler.config.prediction_type == "epsilon" and scheduler.sde_type == "vp"


def test_from_score_sde_ve_config():
    scheduler = PredictorCorrectorScheduler.from_config(ScoreSdeVeScheduler(sigma_max=348.0, correct_steps=2).config)
    config = scheduler.config
    assert (config.sde_type, config.sigma_max, config.num_corrector_steps) == ("ve", 348.0, 2)
    assert (config.prediction_type, config.timestep_type, config.predictor) == ("score", "sigma", "reverse_diffusion")
    assert VEEulerMaruyamaScheduler.from_config(ScoreSdeVeScheduler().config).config.sigma_max == 1348.0


def test_swapping_between_scorekit_schedulers_keeps_conventions():
    source = VPEulerMaruyamaScheduler(beta_max=15.0)  # defaults: epsilon, discrete
    target = PredictorCorrectorScheduler.from_config(source.config)  # whose defaults are score, sigma
    assert (target.sde_type, target.config.prediction_type, target.config.timestep_type) == ("vp", "epsilon", "discrete")
    assert target.config.beta_max == 15.0
    ve = ProbabilityFlowODEScheduler.from_config(VEEulerMaruyamaScheduler(sigma_max=80.0).config)
    assert ve.sde_type == "ve" and ve.config.sigma_max == 80.0 and ve.config.prediction_type == "score"


def test_from_config_refuses_an_sde_the_scheduler_cannot_run():
    with pytest.raises(ValueError, match="sde_type"):
        VEEulerMaruyamaScheduler.from_config(DDPMScheduler().config)


# --- equivalences ------------------------------------------------------------------------------------------


def test_reproduces_score_sde_ve_scheduler_sample_for_sample():
    """Reverse diffusion + Langevin from a ScoreSdeVe config against diffusers' ScoreSdeVePipeline loop.

    diffusers steps between sigma levels of an eps-free grid while calling the model at the eps grid, a
    relative difference of ~1e-4 in the step size at sampling_eps=1e-5; hence rtol=2e-3 rather than exact.
    """
    mixture = GaussianMixture.ring(radius=5.0, std=0.5)
    reference = ScoreSdeVeScheduler(sigma_max=30.0, snr=0.16, correct_steps=1)
    ours = PredictorCorrectorScheduler.from_config(reference.config)
    model = exact_score_model(mixture, ours)
    steps, shape = 200, (64, 2)

    generator = torch.manual_seed(0)
    reference.set_timesteps(steps)
    reference.set_sigmas(steps)
    x = torch.randn(shape, generator=generator) * reference.init_noise_sigma
    for i, t in enumerate(reference.timesteps):
        sigma_t = reference.sigmas[i] * torch.ones(shape[0])
        for _ in range(reference.config.correct_steps):
            x = reference.step_correct(model(x, sigma_t), x, generator=generator).prev_sample
        output = reference.step_pred(model(x, sigma_t), t, x, generator=generator)
        x, x_mean = output.prev_sample, output.prev_sample_mean
    expected = x_mean

    generator = torch.manual_seed(0)
    ours.set_timesteps(steps)
    x = torch.randn(shape, generator=generator) * ours.init_noise_sigma
    for t in ours.timesteps:
        x = ours.step(model(x, t), t, x, generator=generator).prev_sample
    assert torch.allclose(x, expected, rtol=2e-3, atol=2e-3 * mixture.means.abs().max().item())


def test_annealed_langevin_equals_pc_annealed_corrector():
    """ALD with step_lr = 2 snr^2 sigma_min^2 is the PC sampler with only the annealed Langevin corrector."""
    snr, sigma_min, sigma_max = 0.2, 0.01, 10.0
    ald = AnnealedLangevinScheduler(sigma_min=sigma_min, sigma_max=sigma_max, num_annealed_steps=5, step_lr=2 * snr**2 * sigma_min**2)
    pc = PredictorCorrectorScheduler(
        sde_type="ve", sigma_min=sigma_min, sigma_max=sigma_max, predictor="none", corrector="annealed_langevin",
        snr=snr, num_corrector_steps=5, sampling_eps=0.0,
    )
    ald_samples = run_loop(ald, exact_score_model(RING, ald), (64, 2), 10, seed=1)
    pc_samples = run_loop(pc, exact_score_model(RING, pc), (64, 2), 10, seed=1)
    assert torch.allclose(ald_samples, pc_samples, rtol=1e-5, atol=1e-5)


def test_ancestral_on_a_ddpm_schedule_is_ddpm():
    mixture = GaussianMixture.ring()
    reference = DDPMScheduler(clip_sample=False)
    ours = PredictorCorrectorScheduler.from_config(reference.config, predictor="ancestral", corrector="none")
    model = exact_score_model(mixture, ours)
    results = []
    for scheduler in (reference, ours):
        generator = torch.manual_seed(0)
        scheduler.set_timesteps(1000)
        x = torch.randn(16, 2, generator=generator)
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t), t, x, generator=generator).prev_sample
        results.append(x)
    assert torch.allclose(results[0], results[1], atol=1e-4)


# --- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: VEEulerMaruyamaScheduler(sigma_min=1.0, sigma_max=0.5), "sigma_max"),
        (lambda: VEEulerMaruyamaScheduler(sigma_min=0.0), "sigma_min"),
        (lambda: VPEulerMaruyamaScheduler(beta_min=20.0, beta_max=0.1), "beta_max"),
        (lambda: VPEulerMaruyamaScheduler(sde_type="ve"), "sde_type"),
        (lambda: VPEulerMaruyamaScheduler(beta_schedule="cosine"), "beta_schedule"),
        (lambda: VPEulerMaruyamaScheduler(sampling_eps=0.0), "sampling_eps"),
        (lambda: PredictorCorrectorScheduler(snr=0.0), "snr"),
        (lambda: PredictorCorrectorScheduler(predictor="euler"), "predictor"),
        (lambda: PredictorCorrectorScheduler(corrector="hmc"), "corrector"),
        (lambda: PredictorCorrectorScheduler(num_corrector_steps=0), "num_corrector_steps"),
        (lambda: PredictorCorrectorScheduler(prediction_type="flow"), "prediction_type"),
        (lambda: ProbabilityFlowODEScheduler(timestep_type="ticks"), "timestep_type"),
        (lambda: ProbabilityFlowODEScheduler(solver="rk4"), "solver"),
        (lambda: ProbabilityFlowODEScheduler(time_spacing="karras"), "time_spacing"),
        (lambda: AnnealedLangevinScheduler(step_lr=-1.0), "step_lr"),
    ],
)
def test_bad_config_names_the_field(make, field):
    with pytest.raises(ValueError, match=field) as error:
        make()
    assert "invalid" in str(error.value) or "supported" in str(error.value)


def test_bad_calls():
    scheduler = PredictorCorrectorScheduler()
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="before set_timesteps"):
        scheduler.step(x, 1.0, x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    scheduler.set_timesteps(3)
    t = scheduler.timesteps[0]
    with pytest.raises(ValueError, match="shape"):
        scheduler.step(torch.randn(4, 3), t, x)
    with pytest.raises(ValueError, match=r"step 0 .*sigma=50.*NaN"):
        scheduler.step(torch.full_like(x, math.nan), t, x)
    with pytest.raises(ValueError, match=r"timestep=0.70.* but the next entry is 0 .*in order"):
        scheduler.step(x, scheduler.timesteps[2].item(), x)  # the failed step began the loop at entry 0
    for t in scheduler.timesteps:
        x = scheduler.step(torch.zeros_like(x), t, x).prev_sample
    with pytest.raises(ValueError, match="set_timesteps again"):
        scheduler.step(x, t, x)


def test_nonfinite_on_an_accelerator_is_reported_after_the_loop():
    scheduler = VEEulerMaruyamaScheduler()
    scheduler.set_timesteps(3, device="meta")
    # meta tensors stand in for a device whose values cannot be read without a sync: sums are kept instead
    x = torch.empty(2, 2, device="meta")
    for t in scheduler.timesteps:
        x = scheduler.step(torch.empty_like(x), t, x).prev_sample
    assert scheduler._output_sums.device.type == "meta" and scheduler._output_sums.shape == (3,)
    # what the device would have summed: finite, NaN, finite -> the report names the second step
    scheduler.set_timesteps(3)
    scheduler._step_index = 3
    scheduler._output_sums = torch.tensor([1.0, math.nan, -2.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"step 1 of 3 .*sigma=.*NaN or Inf"):
        scheduler.raise_if_nonfinite()
    scheduler._output_sums = torch.tensor([1.0, 3e38, -2.0], dtype=torch.float64)
    scheduler.raise_if_nonfinite()


def test_huge_but_finite_outputs_are_not_reported_and_inf_is():
    scheduler = VEEulerMaruyamaScheduler()
    scheduler.set_timesteps(2)
    x = torch.zeros(64, 8)
    # float32 entries near their maximum: a float32 sum would overflow, the float64 one does not
    scheduler.step(torch.full_like(x, 3e38), scheduler.timesteps[0], x)
    huge_with_inf = torch.full_like(x, 3e38)
    huge_with_inf[3, 5] = -math.inf
    with pytest.raises(ValueError, match="step 1 of 2"):
        scheduler.step(huge_with_inf, scheduler.timesteps[1], x)
    scheduler._nonfinite_flags = [torch.tensor(False)] * 3
    scheduler.raise_if_nonfinite()


def _loop_from(scheduler, model, x, begin_index, record_at=None):
    """Step from entry ``begin_index`` to the end; also return the sample at entry ``record_at``."""
    recorded = None
    for index in range(begin_index, len(scheduler.timesteps)):
        if index == record_at:
            recorded = x.clone()
        t = scheduler.timesteps[index]
        x = scheduler.step(model(x, t), t, x).prev_sample
    return x, recorded


def test_set_begin_index_resumes_a_deterministic_loop():
    scheduler = ProbabilityFlowODEScheduler(solver="euler")
    model = exact_score_model(RING, scheduler)
    scheduler.set_timesteps(12)
    full, at_six = _loop_from(scheduler, model, torch.randn(64, 2), 0, record_at=6)
    scheduler.set_timesteps(12)
    scheduler.set_begin_index(6)
    resumed, _ = _loop_from(scheduler, model, at_six, 6)
    torch.testing.assert_close(resumed, full, rtol=0, atol=0)  # memoryless: the same steps from the same state


def test_dpm_solver_begun_mid_grid_takes_a_first_order_step():
    """With no previous x_0 the extrapolation has nothing to extrapolate from: the step is DDIM's (Euler's)."""
    schedulers = [ProbabilityFlowODEScheduler(solver=solver) for solver in ("dpm_solver_2m", "euler")]
    x = torch.randn(64, 2)
    first_steps = []
    for scheduler in schedulers:
        scheduler.set_timesteps(12)
        scheduler.set_begin_index(6)
        t = scheduler.timesteps[6]
        first_steps.append(scheduler.step(exact_score_model(RING, scheduler)(x, t), t, x).prev_sample)
    torch.testing.assert_close(first_steps[0], first_steps[1], rtol=1e-5, atol=1e-6)


def test_heun_begun_at_a_correction_keeps_the_euler_step():
    """A loop begun at a Heun correction entry has no start of that step: the Euler step that led there stands
    (first order) and the loop goes on in order."""
    scheduler = ProbabilityFlowODEScheduler(solver="heun")
    model = exact_score_model(RING, scheduler)
    scheduler.set_timesteps(5)
    x = torch.randn(4, 2)
    out = scheduler.step(model(x, scheduler.timesteps[1]), scheduler.timesteps[1], x)  # inferred: entry 1
    torch.testing.assert_close(out.prev_sample, x, rtol=1e-6, atol=1e-6)  # x + c (x_0 - x_0), rounded
    assert scheduler.step_index == 2
    x, _ = _loop_from(scheduler, model, out.prev_sample, 2)
    assert torch.isfinite(x).all()


def test_linear_combination_arithmetic_evaluation_and_repr():
    from diffusers_scorekit.schedulers.linear_combination import LinearCombination

    x, eps = LinearCombination.symbol("x"), LinearCombination.symbol("eps")
    update = 0.5 * x - eps / 4 + 2 * (eps - x)
    assert update.coefficients == {"x": -1.5, "eps": 1.75}
    assert repr(update) == "-1.5 x + 1.75 eps"
    assert (x - x).inputs == () and (x + 0 * eps).inputs == ("x",)
    tensors = {"x": torch.tensor([1.0, -2.0]), "eps": torch.tensor([4.0, 8.0])}
    assert torch.equal(update(tensors), torch.tensor([-1.5 + 7.0, 3.0 + 14.0]))
    with pytest.raises(TypeError, match="only numbers scale a LinearCombination"):
        x * eps
    with pytest.raises(ValueError, match="no non-zero coefficient"):
        (x - x)(tensors)


def test_update_rules_with_hand_computed_numbers():
    """Each rule of sde_updates on numbers worked out by hand (the samplers' tests check them in distribution,
    where a flipped noise sign or a rule exact only at alpha = 1 would not show)."""
    from diffusers_scorekit.schedulers import sde_updates

    x, score, noise = torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([0.5])
    # x + (f x - g^2 s) dt + sqrt(-g^2 dt) z with f = 0.5, g^2 = 4, dt = -0.25: 2 + (1 + 4)(-0.25) + 1 * 0.5
    assert sde_updates.euler_maruyama(x, score, 0.5, 4.0, -0.25, noise).item() == pytest.approx(1.25, rel=1e-12)
    # 2 alpha (snr |z| / |s|)^2, norms averaged over the batch: |z| = (3 + 4) / 2, |s| = (1 + 2) / 2
    step = sde_updates.snr_step_size(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 0.0], [0.0, 4.0]]),
                                     snr=0.3, alpha=0.5)
    assert step.item() == pytest.approx(2 * 0.5 * (0.3 * 3.5 / 1.5) ** 2, rel=1e-6)
    # x + a (s - s_start) / (2 s) (x0_start - x0): 1 + 0.8 (0.5 - 2) / 1 * (0.25 - 1)
    corrected = sde_updates.probability_flow_heun_correction(torch.tensor([1.0]), torch.tensor([1.0]),
                                                             torch.tensor([0.25]), 0.8, 0.5, 2.0)
    assert corrected.item() == pytest.approx(1 + 0.8 * (0.5 - 2.0) / 1.0 * (0.25 - 1.0), rel=1e-6)
