"""Exact answers for the likelihood module's plumbing: probes, generators, dtypes, defaults and what reaches the
solver.

A linear "score" ``s(x) = M x`` on a VE SDE makes the probability-flow ODE ``dx/dt = -g(t)^2 M x / 2`` solvable
by hand: with ``Delta = sigma(1)^2 - sigma(eps)^2`` the latent is ``expm(-Delta M / 2) x`` and, for fixed probes
``v``, the Hutchinson integral is ``-Delta / 2 * mean_v(v^T M v)`` (``-Delta / 2 * tr M`` for the exact trace).
``M`` is not diagonal, so every probe value shows in the answer.
"""

import pytest
import torch
import torchdiffeq

from diffusers_scorekit.likelihood import (
    bits_per_dim,
    decode,
    dequantize_and_scale,
    eight_bit_levels,
    encode,
    log_likelihood,
    ode_sample,
)
from diffusers_scorekit.mixture import GaussianMixture, marginal_at_timestep
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
    assert torch.allclose(out.delta_log_p, -0.5 * delta * quadratic_forms, rtol=1e-7, atol=1e-9)
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


def test_exact_divergence_is_the_trace():
    out = log_likelihood(linear_score_function(), x_batch(), divergence="exact", **TIGHT)
    expected = -0.5 * flow_integral() * torch.trace(M).item()
    assert torch.allclose(out.delta_log_p, torch.full((3,), expected, dtype=torch.float64), rtol=1e-7)


class SolverSpy:
    """Wraps ``torchdiffeq.odeint``: records the keywords, the state's dtypes and the right-hand side's."""

    def __init__(self, monkeypatch):
        self.calls, self.returned_dtypes = [], []
        original = torchdiffeq.odeint

        def spy(func, state, times, **kwargs):
            dtypes = tuple(part.dtype for part in state) if isinstance(state, tuple) else (state.dtype,)
            self.calls.append(dict(kwargs, times=times.tolist(), state_dtypes=dtypes))

            def recorded(t, y):
                result = func(t, y)
                parts = result if isinstance(result, tuple) else (result,)
                self.returned_dtypes.append(tuple(part.dtype for part in parts))
                return result

            return original(recorded, state, times, **kwargs)

        monkeypatch.setattr(torchdiffeq, "odeint", spy)


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


def test_tolerances_method_and_times_reach_the_solver(monkeypatch):
    spy = SolverSpy(monkeypatch)
    score_fn, x = linear_score_function(), x_batch()
    solver = dict(rtol=2e-4, atol=3e-4, method="bosh3")
    encode(score_fn, x, sampling_eps=0.25, **solver)
    decode(score_fn, x, sampling_eps=0.25, **solver)
    ode_sample(score_fn, x, sampling_eps=0.25, **solver)
    log_likelihood(score_fn, x, sampling_eps=0.25, **solver)
    assert [(call["rtol"], call["atol"], call["method"], call["times"]) for call in spy.calls] == [
        (2e-4, 3e-4, "bosh3", [0.25, 1.0]),
        (2e-4, 3e-4, "bosh3", [1.0, 0.25]),
        (2e-4, 3e-4, "bosh3", [1.0, 0.25]),
        (2e-4, 3e-4, "bosh3", [0.25, 1.0]),
    ]


def test_defaults_are_the_documented_ones(monkeypatch):
    spy = SolverSpy(monkeypatch)
    score_fn, x = linear_score_function(), x_batch()
    eps = default_sampling_eps(SDE)
    encode(score_fn, x)
    decode(score_fn, x)
    ode_sample(score_fn, x)
    log_likelihood(score_fn, x)
    assert [(call["rtol"], call["atol"], call["method"], call["times"]) for call in spy.calls] == [
        (1e-5, 1e-5, "dopri5", [eps, 1.0]), (1e-5, 1e-5, "dopri5", [1.0, eps]),
        (1e-5, 1e-5, "dopri5", [1.0, eps]), (1e-5, 1e-5, "dopri5", [eps, 1.0]),
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
    with pytest.raises(ValueError, match=r"^shape_or_latent=.* positive ints"):
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
