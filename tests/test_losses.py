"""Losses at the exact score: known minima, zero gradient, agreement between estimators; a tiny model learns."""

import math

import pytest
import torch

from diffusers_scorekit import ScoreFunction, ScoreMLP, VESDE, VPSDE, SubVPSDE
from diffusers_scorekit.losses import denoising_score_matching_loss, sliced_score_matching_loss
from diffusers_scorekit.parametrization import model_target, t_from_timestep

DIM, MEAN, STD = 4, 0.7, 0.5
SDES = [VESDE(0.01, 10.0), VPSDE(0.1, 20.0), SubVPSDE(0.1, 20.0)]


class ExactGaussianModel(torch.nn.Module):
    """The exact network for data N(MEAN, STD^2 I), in any output convention, plus ``delta`` times x_t so that
    the loss's gradient at the optimum can be measured."""

    def __init__(self, sde, prediction_type="epsilon", timestep_type="continuous", error=0.0):
        super().__init__()
        self.sde, self.prediction_type, self.timestep_type = sde, prediction_type, timestep_type
        self.delta = torch.nn.Parameter(torch.zeros(()))
        self.error = error

    def forward(self, x, timestep):
        t = t_from_timestep(timestep, self.sde, self.timestep_type, 1000)
        a, sigma = (v.reshape(-1, 1).to(x) for v in self.sde.marginal(t))
        variance = a**2 * STD**2 + sigma**2
        epsilon = (1 + self.error) * sigma * (x - a * MEAN) / variance
        sample_0 = (x - sigma * epsilon) / a
        return model_target(sample_0, epsilon, a, sigma, self.prediction_type) + self.delta * x


def score_fn_for(sde, prediction_type="epsilon", timestep_type="continuous", error=0.0):
    model = ExactGaussianModel(sde, prediction_type, timestep_type, error)
    return ScoreFunction(model, sde, prediction_type, timestep_type, 1000)


def data(n=40000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return MEAN + STD * torch.randn(n, DIM, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("sde", SDES, ids=repr)
@pytest.mark.parametrize("prediction_type", ["epsilon", "score", "sample", "v_prediction"])
def test_dsm_minimum_at_a_fixed_time(sde, prediction_type):
    """At fixed t the exact model's noise-prediction error is Var(z | x_t) = a^2 s^2 / (a^2 s^2 + sigma^2)."""
    x0 = data()
    t = torch.full((len(x0),), 0.3, dtype=torch.float64)
    loss = denoising_score_matching_loss(score_fn_for(sde, prediction_type), x0, t=t, generator=torch.Generator().manual_seed(1))
    a, sigma = (v.item() for v in sde.marginal(0.3))
    expected = a**2 * STD**2 / (a**2 * STD**2 + sigma**2)
    assert abs(loss.item() / expected - 1) < 0.02


@pytest.mark.parametrize("sde", SDES, ids=repr)
@pytest.mark.parametrize("weighting", ["sigma2", "likelihood", "native"])
def test_gradient_vanishes_at_the_exact_score(sde, weighting):
    x0 = data(20000)
    gradients = {}
    for error in (0.0, 0.1):
        score_fn = score_fn_for(sde, error=error)
        loss = denoising_score_matching_loss(score_fn, x0, weighting=weighting, generator=torch.Generator().manual_seed(2))
        gradients[error] = torch.autograd.grad(loss, score_fn.model.delta)[0].item()
    # the same draws: the exact model's gradient is Monte-Carlo noise, a 10% error's is far larger
    assert abs(gradients[0.0]) < 0.1 * abs(gradients[0.1])


@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_likelihood_weighting_importance_sampling_estimates_the_same_objective(sde):
    x0 = data(40000)
    score_fn = score_fn_for(sde)
    uniform = denoising_score_matching_loss(score_fn, x0, weighting="likelihood", generator=torch.Generator().manual_seed(3))
    importance = denoising_score_matching_loss(score_fn, x0, weighting="likelihood", importance_sampling=True,
                                               generator=torch.Generator().manual_seed(4))
    # the exact value: (1 / (1 - eps)) * integral of g^2 / sigma^2 * a^2 s^2 / (a^2 s^2 + sigma^2) dt
    eps = 1e-5 if isinstance(sde, VESDE) else 1e-3
    times = torch.linspace(eps, 1, 200001, dtype=torch.float64)
    a, sigma = sde.marginal(times)
    integrand = sde.diffusion_squared(times) / sigma**2 * a**2 * STD**2 / (a**2 * STD**2 + sigma**2)
    exact = torch.trapezoid(integrand, times).item() / (1 - eps)
    assert abs(importance.item() / exact - 1) < 0.03
    assert abs(uniform.item() / exact - 1) < 0.25  # same mean, much larger variance


@pytest.mark.parametrize("variance_reduced", [True, False])
def test_sliced_score_matching_at_the_exact_score(variance_reduced):
    """At the true score of N(a m, v I): E[tr grad s + |s|^2 / 2] = -D / (2 v), times the sigma^2 weight."""
    sde = VPSDE(0.1, 20.0)
    score_fn = score_fn_for(sde, "score")
    x0 = data(20000).float()
    t = torch.full((len(x0),), 0.2, dtype=torch.float64)
    loss = sliced_score_matching_loss(score_fn, x0, t=t, num_projections=4, variance_reduced=variance_reduced,
                                      generator=torch.Generator().manual_seed(5))
    a, sigma = (v.item() for v in sde.marginal(0.2))
    variance = a**2 * STD**2 + sigma**2
    expected = -DIM / (2 * variance) * sigma**2
    assert abs(loss.item() / expected - 1) < 0.05


def test_a_tiny_model_learns():
    torch.manual_seed(0)
    sde = VPSDE(0.1, 20.0)
    model = ScoreMLP(data_dim=2, hidden_dim=64, num_layers=2, prediction_type="epsilon", timestep_type="continuous")
    score_fn = ScoreFunction(model, sde, "epsilon", "continuous")
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    angles = torch.rand(4096, generator=generator) * 2 * math.pi
    points = torch.stack([angles.cos(), angles.sin()], 1) + 0.05 * torch.randn(4096, 2, generator=generator)
    evaluation = lambda: denoising_score_matching_loss(score_fn, points, generator=torch.Generator().manual_seed(9)).item()  # noqa: E731
    before = evaluation()
    for step in range(300):
        batch = points[torch.randint(0, 4096, (256,), generator=generator)]
        loss = denoising_score_matching_loss(score_fn, batch, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert evaluation() < 0.7 * before


def test_bad_arguments():
    score_fn = score_fn_for(VPSDE())
    x0 = data(8)
    with pytest.raises(ValueError, match="weighting"):
        denoising_score_matching_loss(score_fn, x0, weighting="snr")
    with pytest.raises(ValueError, match="time_sampling"):
        denoising_score_matching_loss(score_fn, x0, time_sampling="log")
    with pytest.raises(ValueError, match="importance_sampling"):
        denoising_score_matching_loss(score_fn, x0, importance_sampling=True)
    with pytest.raises(ValueError, match="num_projections"):
        sliced_score_matching_loss(score_fn, x0, num_projections=0)
