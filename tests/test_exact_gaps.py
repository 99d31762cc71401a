"""Exact answers for code the rest of the suite exercises without pinning its result (each test says which
one-line bug it is there to catch)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import ScoreSdeVeScheduler
from diffusers.configuration_utils import FrozenDict
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from diffusers_scorekit import (
    NCSNScoreModel,
    PredictorCorrectorScheduler,
    ScoreMLP,
    ScoreSDEPipeline,
    VEEulerMaruyamaScheduler,
)
from diffusers_scorekit.losses import sample_time
from diffusers_scorekit.mixture import marginal_at_timestep
from diffusers_scorekit.score_function import ScoreFunction
from diffusers_scorekit.sde import VESDE, VPSDE, SubVPSDE
from oracle import GaussianMixture, exact_score_model, run_loop

# --- the DDPM schedule made continuous: beta(t) = -d log alpha_bar / dt ---------------------------------------


@pytest.mark.parametrize("sde_cls", [VPSDE, SubVPSDE])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_ddpm_beta_is_minus_the_derivative_of_log_alpha_bar(sde_cls, schedule):
    """Central differences of log alpha_bar against beta, between and across the knots (a wrong Hermite slope
    or a sign slip in beta leaves positivity and continuity intact, which is all the older test checks)."""
    sde = sde_cls.from_ddpm_schedule(num_train_timesteps=40, beta_schedule=schedule)
    t = torch.linspace(0.003, 0.997, 997, dtype=torch.float64)
    h = 1e-6
    numeric = -(sde.log_alpha_bar(t + h) - sde.log_alpha_bar(t - h)) / (2 * h)
    assert torch.allclose(sde.beta(t), numeric, rtol=1e-6, atol=1e-9)
    # the drift and diffusion are the ones of that beta (VP: g^2 = beta; sub-VP: g^2 = beta (1 - alpha_bar^2))
    alpha_bar = sde.log_alpha_bar(t).exp()
    assert torch.allclose(sde.drift_coefficient(t), -0.5 * numeric, rtol=1e-6, atol=1e-9)
    expected_g2 = numeric if sde_cls is VPSDE else numeric * (1 - alpha_bar**2)
    assert torch.allclose(sde.diffusion_squared(t), expected_g2, rtol=1e-6, atol=1e-9)


def test_continuous_linear_beta_is_minus_the_derivative_of_log_alpha_bar():
    sde = VPSDE(0.1, 20.0)
    t = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    assert torch.allclose(sde.beta(t), 0.1 + t * 19.9, rtol=1e-12)
    h = 1e-6
    numeric = -(sde.log_alpha_bar(t + h) - sde.log_alpha_bar(t - h)) / (2 * h)
    assert torch.allclose(sde.beta(t), numeric, rtol=1e-7)


def test_discrete_schedule_knots_and_their_slopes():
    """At the knots log alpha_bar is the table; the end slopes are the end secants (Fritsch-Carlson)."""
    alphas_cumprod = torch.tensor([0.99, 0.95, 0.8, 0.5, 0.3], dtype=torch.float64)
    sde = VPSDE.from_alphas_cumprod(alphas_cumprod)
    knots = torch.arange(5, dtype=torch.float64) / 4
    assert torch.allclose(sde.log_alpha_bar(knots), alphas_cumprod.log(), rtol=1e-13)
    log_table = alphas_cumprod.log()
    end_secants = torch.stack([log_table[1] - log_table[0], log_table[4] - log_table[3]]) * 4
    assert torch.allclose(sde.beta(torch.tensor([0.0, 1.0], dtype=torch.float64)), -end_secants, rtol=1e-12)


# --- predictor-corrector's default predictor (reverse diffusion) on VP and sub-VP --------------------------


def _closed_form_marginal(sde_type, t, beta_min, beta_max):
    log_alpha_bar = -(beta_min * t + 0.5 * (beta_max - beta_min) * t**2)
    a = math.exp(0.5 * log_alpha_bar)
    sigma = math.sqrt(1 - a**2) if sde_type == "vp" else 1 - a**2
    return a, sigma


@pytest.mark.parametrize("sde_type", ["vp", "subvp"])
def test_reverse_diffusion_step_on_vp_and_subvp_is_exact(sde_type):
    """One step from t = 1 to t = 0.4 is ``(2 - A) x + B score + sqrt(B) z`` with ``A = a_hi / a_lo`` and
    ``B = sigma_hi^2 - A^2 sigma_lo^2``. On VE ``A = 1``, so only VP and sub-VP see the ``2 - A``."""
    beta_min, beta_max = 0.1, 2.0
    scheduler = PredictorCorrectorScheduler(sde_type=sde_type, beta_min=beta_min, beta_max=beta_max, corrector="none",
                                            sampling_eps=0.4, denoise_final=False, timestep_type="continuous")
    a_hi, sigma_hi = _closed_form_marginal(sde_type, 1.0, beta_min, beta_max)
    a_lo, sigma_lo = _closed_form_marginal(sde_type, 0.4, beta_min, beta_max)
    forward_scale = a_hi / a_lo
    forward_variance = sigma_hi**2 - forward_scale**2 * sigma_lo**2

    def step(x, score):
        scheduler.set_timesteps(2)
        assert len(scheduler.timesteps) == 1
        return scheduler.step(score, scheduler.timesteps[0], x, generator=torch.Generator().manual_seed(0)).prev_sample

    shape = (20000, 2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    score = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    zero = torch.zeros(shape, dtype=torch.float64)
    noise_part = step(zero, zero)  # same seed each call: the same noise
    assert torch.allclose(step(x, zero) - noise_part, (2 - forward_scale) * x, rtol=1e-10, atol=1e-12)
    assert torch.allclose(step(zero, score) - noise_part, forward_variance * score, rtol=1e-10, atol=1e-12)
    assert abs(noise_part.var().item() / forward_variance - 1) < 0.03  # 40000 draws: standard error 0.007


@pytest.mark.parametrize("sde_type", ["vp", "subvp"])
def test_reverse_diffusion_recovers_the_mixture_on_vp_and_subvp(sde_type):
    """The default predictor alone, from the exact score, lands on the 64-D mixture (measured at 300 steps:
    variance error 0.04 against the limit 0.06; it is first order, so the ring's narrow modes need ~800)."""
    from test_oracle_sampling import MIXTURES, assert_on_the_mixture

    mixture, num_samples = MIXTURES["64d"]
    scheduler = PredictorCorrectorScheduler(sde_type=sde_type, prediction_type="epsilon", timestep_type="continuous",
                                            corrector="none")
    assert scheduler.config.predictor == "reverse_diffusion"
    samples = run_loop(scheduler, exact_score_model(mixture, scheduler), (num_samples, mixture.dim), 300)
    assert_on_the_mixture(mixture.report(samples))


# --- ScoreSdeVe -> scorekit config translation -------------------------------------------------------------


@pytest.mark.parametrize("target_cls", [PredictorCorrectorScheduler, VEEulerMaruyamaScheduler])
def test_score_sde_ve_config_carries_every_value_over(target_cls):
    """Every ScoreSdeVe field set to a non-default value arrives under its scorekit name."""
    source = ScoreSdeVeScheduler(num_train_timesteps=500, snr=0.075, sigma_min=0.02, sigma_max=90.0,
                                 sampling_eps=1e-4, correct_steps=3)
    scheduler = target_cls.from_config(source.config)
    config = scheduler.config
    assert (scheduler.sde_type, config.sigma_min, config.sigma_max) == ("ve", 0.02, 90.0)
    assert (config.sampling_eps, config.num_train_timesteps) == (1e-4, 500)
    assert (config.prediction_type, config.timestep_type) == ("score", "sigma")
    if target_cls is PredictorCorrectorScheduler:
        assert (config.snr, config.num_corrector_steps) == (0.075, 3)
        assert (config.predictor, config.corrector) == ("reverse_diffusion", "langevin")


# --- classifier-free and classifier guidance, pinned with stub models --------------------------------------


class StubModel:
    """A made-up model: its output for label ``k`` is ``(1 + k / 4) x + (k - 1) t / 10`` (each label, the null
    one included, answers differently). ``scorekit_style`` models keep label ``num_class_embeds`` for the null
    class; a ``UNet2DModel`` keeps ``num_class_embeds - 1``; any other label is an error."""

    def __init__(self, num_classes, prediction_type, timestep_type, scorekit_style=True, fixed=None):
        config = dict(data_dim=2, num_class_embeds=None if fixed else num_classes + (0 if scorekit_style else 1))
        if scorekit_style:
            config.update(prediction_type=prediction_type, timestep_type=timestep_type)
        self.config = FrozenDict(config)
        self.num_classes = num_classes
        self.fixed = fixed  # a function of (x, t) used instead, for the reference run
        self.dtype, self.device = torch.float32, torch.device("cpu")

    @staticmethod
    def answer(x, timestep, labels):
        t = torch.as_tensor(timestep, dtype=x.dtype).reshape(-1, 1)
        k = labels.to(x.dtype).reshape(-1, 1)
        return (1 + k / 4) * x + (k - 1) * t / 10

    def __call__(self, x, timestep, class_labels=None):
        if self.fixed is not None:
            assert class_labels is None
            return SimpleNamespace(sample=self.fixed(x, timestep))
        assert class_labels is not None and class_labels.shape == (x.shape[0],)
        assert 0 <= class_labels.min() and class_labels.max() <= self.num_classes, "not a label of this model"
        return SimpleNamespace(sample=self.answer(x, timestep, class_labels))


def _pc_scheduler():
    return PredictorCorrectorScheduler(sde_type="vp", prediction_type="epsilon", timestep_type="continuous",
                                       corrector="langevin", snr=0.1)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scorekit_style", [True, False], ids=["scorekit_null_label", "unet_null_label"])
@pytest.mark.parametrize("guidance_scale", [0.0, 1.0, 2.5])
def test_classifier_free_guidance_is_the_exact_combination(guidance_scale, scorekit_style):
    """Samples with guidance equal those of a model that outputs ``u + w (c - u)`` itself (``c`` at the
    label, ``u`` at the null label), seed for seed."""
    num_classes, labels = 3, torch.tensor([0, 1, 2, 2, 0, 1])
    null = torch.full_like(labels, num_classes)  # the stub's null label either way (see StubModel)

    def guided(x, timestep):
        conditional, unconditional = StubModel.answer(x, timestep, labels), StubModel.answer(x, timestep, null)
        return unconditional + guidance_scale * (conditional - unconditional)

    stub = StubModel(num_classes, "epsilon", "continuous", scorekit_style)
    pipe = _quiet(ScoreSDEPipeline(unet=stub, scheduler=_pc_scheduler()))
    samples = pipe(batch_size=6, num_inference_steps=8, class_labels=labels, guidance_scale=guidance_scale,
                   generator=torch.manual_seed(0), output_type="pt").samples
    reference_model = StubModel(num_classes, "epsilon", "continuous", scorekit_style, fixed=guided)
    reference = _quiet(ScoreSDEPipeline(unet=reference_model, scheduler=_pc_scheduler()))
    expected = reference(batch_size=6, num_inference_steps=8, generator=torch.manual_seed(0), output_type="pt").samples
    assert torch.allclose(samples, expected, rtol=1e-6, atol=1e-6)
    assert pipe.null_class_label == num_classes


@pytest.mark.parametrize("prediction_type", ["epsilon", "score", "sample"])
def test_classifier_guidance_adds_the_exact_gradient(prediction_type):
    """With a linear-logit classifier ``log p(y | x) = x . v_y - logsumexp_k x . v_k``, guidance adds
    ``s (v_y - sum_k p_k v_k)`` to the score: the same samples as a model that outputs that guided score."""
    directions = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    labels, scale = torch.tensor([0, 1, 2, 1]), 1.5
    scheduler = PredictorCorrectorScheduler(sde_type="vp", prediction_type=prediction_type,
                                            timestep_type="continuous", corrector="none")

    def classifier(x, timestep):
        return x @ directions.T

    def stub(x, timestep):  # any made-up model output, in the scheduler's convention
        return 0.5 * x + torch.as_tensor(timestep, dtype=x.dtype).reshape(-1, 1) / 10

    def guided(x, timestep):
        a, sigma = marginal_at_timestep(scheduler.sde, timestep, "continuous")
        gradient = directions[labels] - torch.softmax(x @ directions.T, dim=1) @ directions
        output = stub(x, timestep)
        if prediction_type == "score":
            return output + scale * gradient
        if prediction_type == "epsilon":  # epsilon = -sigma score
            return output - sigma * scale * gradient
        return output + sigma**2 / a * scale * gradient  # x0 = (x + sigma^2 score) / a

    results = []
    for model, kwargs in ((stub, dict(class_labels=labels, classifier=classifier, classifier_scale=scale)), (guided, {})):
        unet = StubModel(3, prediction_type, "continuous", fixed=model)
        pipe = _quiet(ScoreSDEPipeline(unet=unet, scheduler=scheduler))
        results.append(pipe(batch_size=4, num_inference_steps=6, generator=torch.manual_seed(0), output_type="pt",
                            **kwargs).samples)
    assert torch.allclose(results[0], results[1], rtol=1e-5, atol=1e-5)


# --- discrete training times -------------------------------------------------------------------------------


@pytest.mark.parametrize("sde", [VESDE(0.01, 5.0), VPSDE.from_ddpm_schedule(num_train_timesteps=7)], ids=["ve", "ddpm"])
def test_discrete_training_times_are_the_training_steps(sde):
    """``t = i / (N - 1)`` for integer ``i`` in ``[0, N - 1]``, every step drawn, about equally often."""
    num_steps = 7
    score_fn = ScoreFunction(lambda x, t: x, sde, "epsilon", "discrete", num_train_timesteps=num_steps)
    t = sample_time(score_fn, 7000, time_sampling="discrete", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float64 and t.shape == (7000,)
    steps = t * (num_steps - 1)
    assert torch.allclose(steps, steps.round(), atol=1e-12)
    counts = torch.bincount(steps.round().long(), minlength=num_steps)
    assert len(counts) == num_steps and counts.min() > 850 and counts.max() < 1150  # 1000 +- 4.9 sd


# --- how a "sigma" timestep is embedded ----------------------------------------------------------------------


def _model_pair(cls, prediction_type, **kwargs):
    torch.manual_seed(0)
    by_sigma = cls(prediction_type=prediction_type, timestep_type="sigma", **kwargs)
    by_log_sigma = cls(prediction_type=prediction_type, timestep_type="log_sigma", **kwargs)
    by_log_sigma.load_state_dict(by_sigma.state_dict())
    return by_sigma.eval(), by_log_sigma.eval()


@pytest.mark.parametrize("prediction_type", ["score", "epsilon"])
@pytest.mark.parametrize("model", ["mlp", "ncsn"])
def test_a_sigma_model_is_the_log_sigma_model_at_log_sigma(model, prediction_type):
    """Shared weights: told ``sigma`` or ``log sigma``, the two models agree (the sigma one embeds ``log sigma``
    and, for a score, divides by the same sigma); sigma = 0 is read as the floor 1e-12."""
    if model == "mlp":
        by_sigma, by_log_sigma = _model_pair(ScoreMLP, prediction_type, data_dim=3, hidden_dim=16, num_layers=1,
                                             embedding_dim=16)
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    else:
        by_sigma, by_log_sigma = _model_pair(NCSNScoreModel, prediction_type, in_channels=1, sample_size=8,
                                             block_out_channels=(8, 16), norm_num_groups=4, embedding_dim=16)
        x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.0, 0.01, 0.7, 50.0], dtype=torch.float64)
    log_sigma = sigma.clamp_min(1e-12).log()
    with torch.no_grad():
        out_sigma = by_sigma(x, sigma.float()).sample
        out_log_sigma = by_log_sigma(x, log_sigma.float()).sample
    scale = out_log_sigma.abs().amax(dim=tuple(range(1, x.ndim)), keepdim=True)
    assert torch.allclose(out_sigma / scale, out_log_sigma / scale, rtol=1e-4, atol=1e-4)
    # and sigma is not read as if it were log sigma (or t): the embedding changes the answer
    with torch.no_grad():
        assert not torch.allclose(by_log_sigma(x, sigma.float()).sample, out_log_sigma, rtol=1e-2, atol=1e-2)


# --- the EMA of a training run -------------------------------------------------------------------------------


def test_ema_weights_are_the_exact_average_of_the_trajectory(tmp_path):
    """Record the weights after every optimizer update of a tiny run and recompute the EMA that diffusers'
    EMAModel defines: ``e_k = d_k e_{k-1} + (1 - d_k) w_k`` with ``d_k = min(decay, k / (k + 9))`` for
    ``k >= 2`` and ``d_1 = 0`` (its default warm-up); the saved pipeline must hold ``e_K``. Gradient
    accumulation makes a micro-batch that is not an update: the EMA must not move on it."""
    trajectory = []

    def record(optimizer, args, kwargs):
        trajectory.append([p.detach().clone() for group in optimizer.param_groups for p in group["params"]])

    handle = register_optimizer_step_post_hook(record)
    decay, updates = 0.2, 5
    try:
        from diffusers_scorekit import cli

        cli.main(["train", "--dataset", "two_moons", "--num_toy_samples", "500", "--hidden_dim", "16", "--num_layers",
                  "1", "--train_batch_size", "32", "--gradient_accumulation_steps", "2", "--max_train_steps",
                  str(updates), "--use_ema", "--ema_decay", str(decay), "--learning_rate", "1e-2", "--lr_warmup_steps", "0",
                  "--num_inference_steps", "2", "--num_eval_samples", "8", "--eval_likelihood_samples", "0",
                  "--checkpointing_steps", "1000", "--output_dir", str(tmp_path)])
    finally:
        handle.remove()
    assert len(trajectory) == updates
    ema = None
    for k, weights in enumerate(trajectory, start=1):
        d = 0.0 if k == 1 else min(decay, k / (k + 9))
        ema = weights if ema is None else [d * e + (1 - d) * w for e, w in zip(ema, weights)]
    saved = load_file(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    pipe = ScoreSDEPipeline.from_pretrained(tmp_path)
    names = [name for name, _ in pipe.unet.named_parameters()]
    assert len(names) == len(ema)
    for name, expected in zip(names, ema):
        assert torch.allclose(saved[name], expected, rtol=1e-5, atol=1e-7), name
    # and the last raw weights differ from the EMA, so the check is not vacuous
    assert not all(torch.allclose(w, e, rtol=1e-5, atol=1e-7) for w, e in zip(trajectory[-1], ema))


# --- the SDE interface that only the likelihood and samplers call -------------------------------------------


@pytest.mark.parametrize("sde", [VESDE(0.01, 5.0), VPSDE(0.1, 20.0), SubVPSDE.from_ddpm_schedule(num_train_timesteps=9)],
                         ids=repr)
def test_drift_diffusion_and_prior_sampling(sde):
    x = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert torch.equal(sde.drift(x, t), sde.drift_coefficient(t).reshape(3, 1, 1) * x)
    assert torch.equal(sde.drift(x, 0.5), sde.drift_coefficient(0.5) * x)
    assert torch.allclose(sde.diffusion(t) ** 2, sde.diffusion_squared(t), rtol=1e-14)
    draw = sde.prior_sampling((4, 3), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * sde.prior_std
    assert draw.dtype == torch.float64 and draw.device.type == "cpu" and torch.equal(draw, expected)


def test_sde_reprs_name_their_parameters():
    assert repr(VESDE(0.01, 5.0)) == "VESDE(sigma_min=0.01, sigma_max=5.0)"
    assert repr(VPSDE(0.1, 20.0)) == "VPSDE(beta_min=0.1, beta_max=20.0)"
    assert repr(SubVPSDE.from_alphas_cumprod([0.9, 0.5, 0.1])) == "SubVPSDE(discrete schedule with 3 steps)"


@pytest.mark.parametrize("kwargs", [{}, dict(num_train_timesteps=50, beta_start=2e-4, beta_end=0.03,
                                              beta_schedule="scaled_linear"),
                                    dict(num_train_timesteps=4, trained_betas=[0.1, 0.2, 0.3, 0.4])])
def test_ddpm_alphas_cumprod_is_diffusers_own(kwargs):
    from diffusers import DDPMScheduler

    from diffusers_scorekit.sde import ddpm_alphas_cumprod

    ours = ddpm_alphas_cumprod(**kwargs)
    assert ours.dtype == torch.float64
    assert torch.equal(ours, DDPMScheduler(**kwargs).alphas_cumprod.to(torch.float64))


@pytest.mark.filterwarnings("ignore:divide by zero")
def test_discrete_schedule_checks_its_table_and_reads_it_in_float64():
    with pytest.raises(ValueError, match="at least 2"):
        VPSDE.from_alphas_cumprod([0.5])
    with pytest.raises(ValueError, match="1-D"):
        VPSDE.from_alphas_cumprod([[0.9, 0.5], [0.4, 0.1]])
    with pytest.raises(ValueError, match="non-increasing"):
        VPSDE.from_alphas_cumprod([0.5, 0.9])
    with pytest.raises(ValueError, match="finite"):
        VPSDE.from_alphas_cumprod([0.9, 0.0])
    # two entries and flat stretches are fine; the lower clamp keeps t = -0 on the first segment
    two = VPSDE.from_alphas_cumprod([0.9, 0.4])  # one segment, both end slopes its secant: log-linear
    logs = torch.tensor([math.log(0.9), 0.5 * (math.log(0.9) + math.log(0.4)), math.log(0.4)], dtype=torch.float64)
    assert torch.allclose(two.log_alpha_bar([0.0, 0.5, 1.0]), logs, rtol=1e-13)
    assert torch.allclose(two.beta([0.0, 0.3, 1.0]), torch.full((3,), math.log(0.9 / 0.4), dtype=torch.float64))
    flat = VPSDE.from_alphas_cumprod([0.9, 0.9, 0.5])
    assert flat.beta(0.25).item() == 0.0
    assert torch.allclose(flat.log_alpha_bar(torch.tensor([-1e-12], dtype=torch.float64)),
                          torch.tensor([math.log(0.9)], dtype=torch.float64), rtol=1e-12)
    table32 = torch.tensor([0.999, 0.7, 0.3], dtype=torch.float32)
    knots = VPSDE.from_alphas_cumprod(table32).log_alpha_bar(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert torch.allclose(knots, table32.double().log(), rtol=1e-14)


def test_discrete_schedule_slopes_at_inner_knots_are_harmonic_means():
    """Fritsch-Carlson: at an inner knot, d log alpha_bar / dt is the harmonic mean of the two secants (0 where
    they differ in sign or one is 0), which is what keeps the interpolant monotone."""
    table = np.array([0.99, 0.95, 0.8, 0.5, 0.3])
    secants = np.diff(np.log(table)) * 4
    harmonic = 2 / (1 / secants[:-1] + 1 / secants[1:])
    sde = VPSDE.from_alphas_cumprod(table)
    inner = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    assert np.allclose(sde.beta(inner).numpy(), -harmonic, rtol=1e-12)
    flat = VPSDE.from_alphas_cumprod([0.9, 0.9, 0.5])
    assert flat.beta(torch.tensor([0.25, 0.5], dtype=torch.float64)).tolist() == [0.0, 0.0]


def test_build_sde_defaults_and_keywords():
    from diffusers import DDPMScheduler

    from diffusers_scorekit.sde import build_sde

    assert repr(build_sde("ve")) == "VESDE(sigma_min=0.01, sigma_max=50.0)"
    assert repr(build_sde("ve", sigma_min=0.02, sigma_max=7.0)) == "VESDE(sigma_min=0.02, sigma_max=7.0)"
    assert repr(build_sde("vp")) == "VPSDE(beta_min=0.1, beta_max=20.0)"
    assert repr(build_sde("subvp", beta_min=0.2, beta_max=9.0)) == "SubVPSDE(beta_min=0.2, beta_max=9.0)"
    cases = [(dict(beta_schedule="linear"), {}),
             (dict(beta_schedule="scaled_linear", num_train_timesteps=30, beta_start=1e-3, beta_end=0.05),
              dict(beta_schedule="scaled_linear", num_train_timesteps=30, beta_start=1e-3, beta_end=0.05))]
    for sde_type in ("vp", "subvp"):
        for ours, theirs in cases:
            sde = build_sde(sde_type, **ours)
            num_steps = theirs.get("num_train_timesteps", 1000)
            knots = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
            expected = DDPMScheduler(**theirs).alphas_cumprod.to(torch.float64).log()
            assert torch.allclose(sde.log_alpha_bar(knots), expected, rtol=1e-12, atol=1e-14)
            assert type(sde).__name__ == ("VPSDE" if sde_type == "vp" else "SubVPSDE")


def test_unknown_conventions_are_named_in_the_error():
    from diffusers_scorekit import parametrization as p

    x = torch.zeros(2, 2, dtype=torch.float64)
    for call in (lambda: p.epsilon_and_sample(x, x, 1.0, 0.5, "eps"), lambda: p.model_target(x, x, 1.0, 0.5, "eps")):
        with pytest.raises(ValueError, match="'eps'"):
            call()
    sde = VESDE(0.01, 5.0)
    for call in (lambda: p.timestep_from_t(0.5, sde, "time", 1000), lambda: p.t_from_timestep(0.5, sde, "time", 1000)):
        with pytest.raises(ValueError, match="'time'"):
            call()


def test_time_arithmetic_is_float64_and_coefficients_take_the_data_dtype():
    from diffusers_scorekit.sde import as_time, broadcast_like, default_sampling_eps

    for t in (1, 0.5, [0, 1], np.array([0.25], dtype=np.float32), torch.tensor([0.5], dtype=torch.float32)):
        assert as_time(t).dtype == torch.float64
    x = torch.ones(2, 3, dtype=torch.float32)
    coefficient = broadcast_like(torch.tensor([1.0, 2.0], dtype=torch.float64), x)
    assert coefficient.dtype == torch.float32 and coefficient.shape == (2, 1)
    assert broadcast_like(torch.tensor(3.0, dtype=torch.float64), x).dtype == torch.float32
    assert default_sampling_eps(VESDE()) == 1e-5 and default_sampling_eps(VPSDE()) == 1e-3
    assert default_sampling_eps(SubVPSDE.from_ddpm_schedule(num_train_timesteps=10)) == 0.0


def test_sde_parameters_defaults_and_ranges():
    assert repr(VESDE()) == "VESDE(sigma_min=0.01, sigma_max=50.0)"
    assert repr(VPSDE()) == "VPSDE(beta_min=0.1, beta_max=20.0)"
    assert repr(SubVPSDE()) == "SubVPSDE(beta_min=0.1, beta_max=20.0)"
    VPSDE(0.0, 1.0)  # beta_min = 0 is allowed
    for make in (lambda: VESDE(0.0, 1.0), lambda: VESDE(1.0, 1.0)):
        with pytest.raises(ValueError, match="sigma_min"):
            make()
    with pytest.raises(ValueError, match="beta_min"):
        VPSDE(1.0, 1.0)


def test_trained_betas_win_over_a_schedule_name_and_negative_time_stays_on_the_first_segment():
    from diffusers_scorekit.sde import build_sde

    betas = [0.1, 0.2, 0.3, 0.4]
    sde = build_sde("vp", beta_schedule="linear", trained_betas=betas, num_train_timesteps=4)
    expected = torch.tensor(np.cumprod(1 - np.array(betas, dtype=np.float32)), dtype=torch.float64)
    assert torch.allclose(sde.log_alpha_bar(torch.arange(4, dtype=torch.float64) / 3).exp(), expected, rtol=1e-6)
    flat = VPSDE.from_alphas_cumprod([0.9, 0.9, 0.5])  # first segment constant, so is its extrapolation
    assert flat.log_alpha_bar(torch.tensor([-0.1], dtype=torch.float64)).item() == pytest.approx(math.log(0.9), abs=1e-14)


def test_gaussian_statistics_of_two_points_and_its_errors():
    from diffusers_scorekit.metrics import gaussian_statistics

    mean, covariance = gaussian_statistics(torch.tensor([[0.0, 1.0], [2.0, 5.0]]))
    assert torch.equal(mean, torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert torch.equal(covariance, torch.tensor([[2.0, 4.0], [4.0, 8.0]], dtype=torch.float64))  # unbiased
    with pytest.raises(ValueError, match="at least 2 points"):
        gaussian_statistics(torch.ones(1, 3))
    with pytest.raises(ValueError, match="^features must have shape"):
        gaussian_statistics(torch.ones(4))


def test_neighbour_radii_balls_are_closed_and_statistics_shapes_are_checked():
    from diffusers_scorekit.metrics import frechet_distance_from_statistics, kth_neighbour_radius, precision_recall

    real = torch.tensor([[0.0], [1.0], [3.0]])
    assert kth_neighbour_radius(real, 1).tolist() == [1.0, 1.0, 2.0]  # k = 1 is the nearest neighbour
    # -1 lies exactly on the ball of radius 1 around 0: inside (closed balls, as in Kynkaanniemi et al.)
    assert precision_recall(real, torch.tensor([[-1.0], [10.0]]), k=1)["precision"] == 0.5
    mean, covariance = torch.zeros(2), torch.eye(2)
    with pytest.raises(ValueError):
        frechet_distance_from_statistics(mean, covariance, mean, torch.eye(3))


def test_pooled_variance_ratio_by_hand():
    # two 1-D modes (std 1 and 2); members chosen so each mode's sample variance is known exactly
    mixture = GaussianMixture([1.0, 1.0], [[0.0], [10.0]], [1.0, 2.0])
    first, second = torch.tensor([-1.0, 1.0, 0.0]), torch.tensor([10.0, 13.0, 7.0, 10.0])  # variances 1 and 6
    samples = torch.cat([first, second])[:, None]
    expected = (3 * 1.0 + 4 * 6.0) / (3 * 1.0 + 4 * 4.0)
    assert mixture.pooled_variance_ratio(samples) == pytest.approx(expected, rel=1e-12)
    # given labels win over the likeliest component; a mode with one member counts zero variance
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 0])
    # mode 0 gets -1, 1, 0, 10 (variance 77 / 3, by hand), mode 1 gets 10, 13, 7 (variance 9)
    assert mixture.pooled_variance_ratio(samples, labels) == pytest.approx((4 * 77 / 3 + 3 * 9.0) / (4 * 1.0 + 3 * 4.0), rel=1e-12)
    lone = torch.tensor([0, 0, 0, 0, 0, 0, 1])
    # mode 0 gets -1, 1, 0, 10, 13, 7 (variance 34, by hand), mode 1 only the last 10
    assert mixture.pooled_variance_ratio(samples, lone) == pytest.approx(6 * 34.0 / (6 * 1.0 + 1 * 4.0), rel=1e-12)
