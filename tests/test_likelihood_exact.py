"""Exact answers for the likelihood module's plumbing: probes, generators, dtypes, defaults and what reaches the
solver.

A linear "score" ``s(x) = M x`` on a VE SDE makes the probability-flow ODE ``dx/dt = -g(t)^2 M x / 2`` solvable
by hand: with ``Delta = sigma(1)^2 - sigma(eps)^2`` the latent is ``expm(-Delta M / 2) x`` and, for fixed probes
``v``, the Hutchinson integral is ``-Delta / 2 * mean_v(v^T M v)`` (``-Delta / 2 * tr M`` for the exact trace).
``M`` is not diagonal, so every probe value shows in the answer.
"""

import re

import pytest
import torch

import diffusers_scorekit.likelihood as likelihood_module

from diffusers_scorekit.likelihood import (
    bits_per_dim,
    decode,
    dequantize_and_scale,
    METHODS,
    eight_bit_levels,
    encode,
    log_likelihood,
    ode_sample,
)
from diffusers_scorekit.mixture import GaussianMixture, marginal_at_timestep
from diffusers_scorekit.ode_solver import initial_step, rms
from diffusers_scorekit.score_function import ScoreFunction
from diffusers_scorekit.sde import VESDE, VPSDE, default_sampling_eps

M = torch.tensor([[0.3, 0.5], [-0.2, 0.4]], dtype=torch.float64)
SDE = VESDE(sigma_min=0.01, sigma_max=1.0)
TIGHT = dict(rtol=1e-9, atol=1e-9)


class LinearScore:
    """``score(x, t) = M x`` in ``x``'s dtype; records the dtypes and times it is called with."""

    def __init__(self):
        self.input_dtypes, self.times = [], []

    def __call__(self, x, timestep):
        self.input_dtypes.append(x.dtype)
        self.times.extend(timestep.tolist())
        return x @ M.T.to(x.dtype)


def linear_score_function():
    return ScoreFunction(LinearScore(), SDE, "score", "continuous")


def x_batch(dtype=torch.float64):
    return torch.tensor([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]], dtype=dtype)


def flow_integral(t_start=None):
    t_start = default_sampling_eps(SDE) if t_start is None else t_start
    return (SDE.sigma(1.0) ** 2 - SDE.sigma(t_start) ** 2).item()


def probes_for(x, num_probes, probe, seed):
    generator = torch.Generator().manual_seed(seed)
    shape = (num_probes, *x.shape)
    if probe == "rademacher":
        return (2 * torch.randint(0, 2, shape, generator=generator) - 1).to(x.dtype)
    return torch.randn(shape, generator=generator, dtype=x.dtype)


@pytest.mark.parametrize("probe, num_probes", [("rademacher", 1), ("rademacher", 3), ("gaussian", 2)])
def test_hutchinson_integral_uses_the_probes_drawn_from_the_generator(probe, num_probes):
    x = x_batch()
    out = log_likelihood(linear_score_function(), x, probe=probe, num_probes=num_probes,
                         generator=torch.Generator().manual_seed(11), **TIGHT)
    probes = probes_for(x, num_probes, probe, 11)
    quadratic_forms = ((probes @ M.T) * probes).sum(-1).mean(0)  # mean over probes of v^T M v, per sample
    delta = flow_integral()
    # tight enough that float32 probes (rounded at 6e-8) would show
    assert torch.allclose(out.delta_log_p, -0.5 * delta * quadratic_forms, rtol=1e-8, atol=0)
    assert torch.allclose(out.latent, x @ torch.linalg.matrix_exp(-0.5 * delta * M).T, rtol=1e-7, atol=1e-9)
    assert torch.allclose(out.log_likelihood, SDE.prior_log_prob(out.latent) + out.delta_log_p, rtol=1e-12)


def test_the_model_is_never_called_outside_the_flows_time_range():
    """Here the drift at ``t = eps`` is tiny, and a first-step probe sized from it alone (torchdiffeq's) would
    land at ``t`` of about 25, where the VE sigma overflows and the solve dies with "underflow in dt"."""
    score_fn, x = linear_score_function(), x_batch()
    eps = default_sampling_eps(SDE)
    for num_probes in (1, 2, 3):
        log_likelihood(score_fn, x, num_probes=num_probes, generator=torch.Generator().manual_seed(0))
    latent, _ = encode(score_fn, x)
    decode(score_fn, latent)
    # the model gets the time in float32
    assert torch.tensor(eps, dtype=torch.float32).item() <= min(score_fn.model.times) and max(score_fn.model.times) <= 1.0


def test_the_first_steps_evaluations_are_shared_with_the_solver(monkeypatch):
    """Two evaluations start a solve (the derivative at the start and the probe that sizes the first step); every
    step after that, accepted or rejected, costs six: its stages less the one it shares with the last (FSAL)."""
    spy = SolverSpy(monkeypatch)
    score_fn, x = linear_score_function(), x_batch()
    for run in (lambda: encode(score_fn, x), lambda: log_likelihood(score_fn, x)):
        calls_before = len(score_fn.model.times) // len(x)
        nfe = run().nfe
        result = spy.results[-1]
        assert nfe == result.nfe == len(score_fn.model.times) // len(x) - calls_before
        assert nfe == 2 + 6 * (result.accepted + result.rejected) and result.accepted > 1


def test_a_batch_of_one_is_a_batch():
    score_fn, x = linear_score_function(), x_batch()
    alone = log_likelihood(score_fn, x[:1], divergence="exact", **TIGHT)
    together = log_likelihood(score_fn, x, divergence="exact", **TIGHT)
    assert torch.allclose(alone.log_likelihood, together.log_likelihood[:1], rtol=1e-9)
    assert torch.allclose(alone.bits_per_dim, together.bits_per_dim[:1], rtol=1e-9)


def test_exact_divergence_is_the_trace():
    out = log_likelihood(linear_score_function(), x_batch(), divergence="exact", **TIGHT)
    expected = -0.5 * flow_integral() * torch.trace(M).item()
    assert torch.allclose(out.delta_log_p, torch.full((3,), expected, dtype=torch.float64), rtol=1e-7)


class SolverSpy:
    """Wraps the likelihood module's ``dormand_prince``: records the keywords, the times, the state's dtypes, the
    right-hand side's and what the solve returned."""

    def __init__(self, monkeypatch):
        self.calls, self.returned_dtypes, self.results = [], [], []
        original = likelihood_module.dormand_prince

        def spy(func, state, t_start, t_end, **kwargs):
            dtypes = tuple(part.dtype for part in state) if isinstance(state, tuple) else (state.dtype,)
            self.calls.append(dict(kwargs, times=[t_start, t_end], state_dtypes=dtypes))

            def recorded(t, y):
                result = func(t, y)
                parts = result if isinstance(result, tuple) else (result,)
                self.returned_dtypes.append(tuple(part.dtype for part in parts))
                return result

            self.results.append(original(recorded, state, t_start, t_end, **kwargs))
            return self.results[-1]

        monkeypatch.setattr(likelihood_module, "dormand_prince", spy)


def test_the_solver_integrates_in_float64_and_the_model_sees_its_own_dtype(monkeypatch):
    spy = SolverSpy(monkeypatch)
    score_fn = linear_score_function()
    x = x_batch(torch.float32)
    latent, _ = encode(score_fn, x)
    out = log_likelihood(score_fn, x, generator=torch.Generator().manual_seed(0))
    assert [call["state_dtypes"] for call in spy.calls] == [(torch.float64,), (torch.float64, torch.float64)]
    assert set(spy.returned_dtypes) == {(torch.float64,), (torch.float64, torch.float64)}
    assert set(score_fn.model.input_dtypes) == {torch.float32}
    assert latent.dtype == out.latent.dtype == torch.float32 and out.log_likelihood.dtype == torch.float64


def test_tolerances_and_times_reach_the_solver(monkeypatch):
    spy = SolverSpy(monkeypatch)
    score_fn, x = linear_score_function(), x_batch()
    solver = dict(rtol=2e-4, atol=3e-4, method="dopri5")
    encode(score_fn, x, sampling_eps=0.25, **solver)
    decode(score_fn, x, sampling_eps=0.25, **solver)
    ode_sample(score_fn, x, sampling_eps=0.25, **solver)
    log_likelihood(score_fn, x, sampling_eps=0.25, **solver)
    assert [(call["rtol"], call["atol"], call["times"]) for call in spy.calls] == [
        (2e-4, 3e-4, [0.25, 1.0]), (2e-4, 3e-4, [1.0, 0.25]), (2e-4, 3e-4, [1.0, 0.25]), (2e-4, 3e-4, [0.25, 1.0]),
    ]
    # the flows of x alone use the solver's default norm, the likelihood its own (see below)
    assert [call["norm"] is rms for call in spy.calls] == [True, True, True, False]


@pytest.mark.parametrize("method", ["bosh3", "rk45", "DOPRI5"])
def test_methods_other_than_dopri5_are_refused(method):
    assert METHODS == ("dopri5",)
    message = f"method={method!r} is not supported; choose one of ('dopri5',)."
    for call in (encode, decode, ode_sample, log_likelihood):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            call(linear_score_function(), x_batch(), method=method)


def test_defaults_are_the_documented_ones(monkeypatch):
    spy = SolverSpy(monkeypatch)
    score_fn, x = linear_score_function(), x_batch()
    eps = default_sampling_eps(SDE)
    encode(score_fn, x)
    decode(score_fn, x)
    ode_sample(score_fn, x)
    log_likelihood(score_fn, x)
    assert [(call["rtol"], call["atol"], call["times"]) for call in spy.calls] == [
        (1e-5, 1e-5, [eps, 1.0]), (1e-5, 1e-5, [1.0, eps]), (1e-5, 1e-5, [1.0, eps]), (1e-5, 1e-5, [eps, 1.0]),
    ]
    # one Rademacher probe, drawn from the generator
    default = log_likelihood(score_fn, x, generator=torch.Generator().manual_seed(5))
    one = log_likelihood(score_fn, x, num_probes=1, probe="rademacher", generator=torch.Generator().manual_seed(5))
    assert torch.equal(default.log_likelihood, one.log_likelihood)
    # Tweedie's last step is on by default
    assert torch.equal(ode_sample(score_fn, x).x, ode_sample(score_fn, x, denoise_final=True).x)


# --- ode_sample ---------------------------------------------------------------------------------------------


def gaussian_score_function():
    """Data N(mu, s^2 I) on VP: the flow is affine and Tweedie's denoiser is exact (see test_likelihood.py)."""
    gaussian = GaussianMixture([1.0], torch.tensor([[0.5, -0.25]], dtype=torch.float64), [0.3])
    sde = VPSDE()

    def model(x, timestep):
        return gaussian.model_output(x, *marginal_at_timestep(sde, timestep, "continuous"), "epsilon")

    return ScoreFunction(model, sde, "epsilon", "continuous"), gaussian


@pytest.mark.parametrize("sampling_eps", [None, 0.05])
def test_ode_sample_is_decode_then_tweedie(sampling_eps):
    score_fn, gaussian = gaussian_score_function()
    latent = score_fn.sde.prior_sampling((4, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    decoded = decode(score_fn, latent, sampling_eps=sampling_eps)
    plain = ode_sample(score_fn, latent, sampling_eps=sampling_eps, denoise_final=False)
    assert torch.equal(plain.x, decoded.x) and plain.nfe == decoded.nfe

    denoised = ode_sample(score_fn, latent, sampling_eps=sampling_eps)
    eps = default_sampling_eps(score_fn.sde) if sampling_eps is None else sampling_eps
    a, sigma = (value.item() for value in score_fn.sde.marginal(eps))
    tweedie = (decoded.x + sigma**2 * gaussian.score(decoded.x, a, sigma)) / a
    assert torch.allclose(denoised.x, tweedie, rtol=1e-9, atol=1e-9) and denoised.nfe == decoded.nfe + 1


def test_ode_sample_draws_its_latent_from_the_generator_in_the_given_dtype():
    score_fn, _ = gaussian_score_function()
    drawn = ode_sample(score_fn, (3, 2), generator=torch.Generator().manual_seed(8), dtype=torch.float64,
                       denoise_final=False)
    latent = score_fn.sde.prior_sampling((3, 2), generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    assert drawn.x.dtype == torch.float64
    assert torch.equal(drawn.x, decode(score_fn, latent).x)


@pytest.mark.parametrize("shape", [(4,), (4, 0), (4, 2.0), (0, 2)])
def test_ode_sample_rejects_shapes_that_are_not_positive_ints(shape):
    score_fn, _ = gaussian_score_function()
    message = f"shape_or_latent={shape!r} is not supported; give a latent tensor or a shape (batch, ...) of positive ints."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ode_sample(score_fn, shape)


def test_a_shape_of_ones_is_a_shape():
    score_fn, _ = gaussian_score_function()
    assert ode_sample(score_fn, (1, 2), generator=torch.Generator().manual_seed(0)).x.shape == (1, 2)


# --- errors that name what was wrong ------------------------------------------------------------------------


def test_errors_name_the_argument():
    score_fn = linear_score_function()
    with pytest.raises(ValueError, match=r"^x must be a floating-point tensor"):
        encode(score_fn, torch.zeros(3))
    with pytest.raises(ValueError, match=r"^latent must be a floating-point tensor"):
        decode(score_fn, torch.zeros(3))
    with pytest.raises(ValueError, match=r"^data='16bit' is not supported; choose one of"):
        bits_per_dim(torch.zeros(1), 2, data="16bit")
    with pytest.raises(ValueError, match=r"^num_probes=0 is not supported; it must be a positive int\.$"):
        log_likelihood(score_fn, x_batch(), num_probes=0)
    with pytest.raises(ValueError, match=r"^atol=0 is not supported; it must be a positive number\.$"):
        encode(score_fn, x_batch(), atol=0)
    with pytest.raises(ValueError, match=r"^rtol=-1 is not supported; it must be a positive number\.$"):
        decode(score_fn, x_batch(), rtol=-1)
    with pytest.raises(ValueError, match=r"^x is an empty batch \(shape \(0, 2\)\): there is nothing to integrate\.$"):
        encode(score_fn, torch.zeros(0, 2))
    with pytest.raises(ValueError, match=r"with at least 2 dimensions, got <class 'list'>\.$"):
        encode(score_fn, [[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"got tensor of dtype torch\.int64 and shape \(3, 2\)\.$"):
        encode(score_fn, torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^sampling_eps=1\.0 is not supported; it must lie in \[0, 1\)\.$"):
        encode(score_fn, x_batch(), sampling_eps=1.0)
    vp_score_fn, _ = gaussian_score_function()
    with pytest.raises(ValueError, match=r"^sampling_eps=0 is not supported; sigma\(sampling_eps\) is 0 for this SDE, "
                       r"where the score is undefined\.$"):
        encode(vp_score_fn, x_batch(), sampling_eps=0)


@pytest.mark.parametrize("low, high, accepted", [(-1.0, 1.0, True), (0.5, 0.5, True), (-1.5, 0.0, False),
                                                 (0.0, 1.5, False), (-1.0001, 0.0, False), (0.0, 1.0001, False)])
def test_eight_bit_likelihood_needs_the_unit_range_and_accepts_its_ends(low, high, accepted):
    x = torch.tensor([[low, high], [high, low]], dtype=torch.float64)
    if accepted:
        out = log_likelihood(linear_score_function(), x, data="8bit", divergence="exact")
        assert torch.allclose(out.bits_per_dim, bits_per_dim(out.log_likelihood, 2) + 7, rtol=1e-12)
    else:
        with pytest.raises(ValueError, match=r"^x='values in \[.*\]' is not supported; data=\"8bit\" needs"):
            log_likelihood(linear_score_function(), x, data="8bit", divergence="exact")


def test_eight_bit_levels_name_the_values_out_of_range():
    with pytest.raises(ValueError, match=r"^images='values in \[1\.5, 300\.0\]' is not supported; give integers in "
                       r"\[0, 255\]\.$"):
        eight_bit_levels(torch.tensor([1.5, 300.0]))


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64])
def test_eight_bit_levels_reject_bool_and_complex(dtype):
    with pytest.raises(ValueError, match=r"^images\.dtype=torch\.(bool|complex64) is not supported; give uint8"):
        eight_bit_levels(torch.zeros(2, 2, dtype=dtype))


def test_dequantisation_is_levels_plus_the_generators_uniform_noise():
    levels = torch.tensor([[0, 17, 255], [128, 3, 64]], dtype=torch.uint8)
    assert eight_bit_levels(levels).dtype == torch.float32
    scaled = dequantize_and_scale(levels, torch.Generator().manual_seed(9))
    noise = torch.rand(levels.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float32)
    assert scaled.dtype == torch.float32
    assert torch.equal(scaled, 2 * (levels.to(torch.float32) + noise) / 256 - 1)


# --- the first step: Hairer, Norsett and Wanner's rule, inside the interval ----------------------------------


class Recorded:
    """``dy/dt = rate * y``; records where it is evaluated."""

    def __init__(self, rate):
        self.rate, self.points = rate, []

    def __call__(self, t, y):
        self.points.append((float(t), y.clone()))
        return self.rate * y


def first_step(rate, times, order=5, rtol=1e-3, atol=1e-3):
    dynamics = Recorded(rate)
    state = torch.ones(2, dtype=torch.float64)
    step = initial_step(dynamics, state, rate * state, *times, rtol, atol, rms, order)
    return step, dynamics.points


# With y = 1 and rtol = atol = 1e-3 every entry's scale is 2e-3, so d0 = 500 and d1 = 1000 |rate| / 2; the probe
# at h0 gives d2 = |rate|^2 / 2e-3 (the change of f over h0, scaled, divided by h0).
@pytest.mark.parametrize("times, probe_time, probe_value", [([0.0, 1.0], 0.005, 0.99), ([1.0, 0.0], 0.995, 1.01)])
def test_first_step_of_a_linear_decay(times, probe_time, probe_value):
    step, points = first_step(-2.0, times)  # h0 = 0.01 * 500 / 1000, d2 = 2000: h1 = (0.01 / 2000)^(1/5)
    assert step == pytest.approx((0.01 / 2000) ** (1 / 5), rel=1e-12)
    [(t, y)] = points
    assert t == pytest.approx(probe_time, rel=1e-12) and torch.allclose(y, torch.full((2,), probe_value, dtype=torch.float64), rtol=1e-12)
    assert first_step(-2.0, times, order=3)[0] == pytest.approx((0.01 / 2000) ** (1 / 3), rel=1e-12)


def test_first_step_is_at_most_a_hundred_times_the_probe_step():
    # rate -2000: h0 = 0.01 * 500 / 1e6 = 5e-6, h1 = (0.01 / 2e9)^(1/5) = 0.0055 > 100 h0
    step, points = first_step(-2000.0, [0.0, 1.0])
    assert step == pytest.approx(5e-4, rel=1e-12) and points[0][0] == pytest.approx(5e-6, rel=1e-12)


def test_first_step_and_its_probe_stay_inside_the_interval():
    # a short interval caps both the probe (h0 = 0.005 > 0.001) and the step
    step, points = first_step(-2.0, [0.0, 1e-3])
    assert step == 1e-3 and points[0][0] == pytest.approx(1e-3, rel=1e-12)
    # a slow start (d1 = 5e-4) asks for h0 = 1e4: probed at the interval's end, not at t = 1e4
    step, points = first_step(-1e-6, [0.0, 1.0])
    assert step == 1.0 and points[0][0] == 1.0


def test_first_step_when_nothing_moves():
    # d1 = 0: h0 = 1e-6 and, as f does not change either, h1 = max(1e-6, 1e-3 h0) = 1e-6
    step, points = first_step(0.0, [0.0, 1.0])
    assert step == 1e-6 and points[0][0] == pytest.approx(1e-6, rel=1e-12)


def test_first_step_of_a_pair_of_states_uses_the_pairs_norm():
    state = (torch.ones(2, dtype=torch.float64), torch.full((1,), 4.0, dtype=torch.float64))

    def dynamics(t, pair):
        return (-2.0 * pair[0], torch.zeros_like(pair[1]))

    def norm(pair):  # the x part only, as if the second were negligible
        return pair[0].pow(2).mean().sqrt()

    step = initial_step(dynamics, state, dynamics(0.0, state), 0.0, 1.0, 1e-3, 1e-3, norm, 5)
    assert step == pytest.approx((0.01 / 2000) ** (1 / 5), rel=1e-12)


def test_the_likelihoods_error_norm(monkeypatch):
    spy = SolverSpy(monkeypatch)
    log_likelihood(linear_score_function(), x_batch(), generator=torch.Generator().manual_seed(0))
    [call] = spy.calls
    assert set(call) == {"rtol", "atol", "norm", "times", "state_dtypes"}
    error = (torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64),
             torch.tensor([12.0, -12.0, 0.0], dtype=torch.float64))
    # max(RMS of x's entries, RMS of delta_log_p / D): sqrt(25 / 6) against sqrt(96) / 2
    assert call["norm"](error).item() == pytest.approx(96**0.5 / 2, rel=1e-12)
    small_log_p_error = (error[0], error[1] / 10)  # sqrt(0.96) / 2 < sqrt(25 / 6)
    assert call["norm"](small_log_p_error).item() == pytest.approx((25 / 6) ** 0.5, rel=1e-12)


def test_first_step_scales_the_tolerance_by_the_state():
    # y = 3: scale = 1e-3 + 1e-3 * 3 = 4e-3, so d0 = 750, d1 = 1500 and h0 = 0.005; f changes by 0.06 over it:
    # d2 = (0.06 / 4e-3) / 0.005 = 3000 and h1 = (0.01 / 3000)^(1/5)
    state = torch.full((2,), 3.0, dtype=torch.float64)
    step = initial_step(Recorded(-2.0), state, -2.0 * state, 0.0, 1.0, 1e-3, 1e-3, rms, 5)
    assert step == pytest.approx((0.01 / 3000) ** (1 / 5), rel=1e-12)
