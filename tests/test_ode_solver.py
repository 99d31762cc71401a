"""Exact checks of the Dormand-Prince 5(4) solver and its step-size controller (diffusers_scorekit/ode_solver.py).

The tableau is checked in rationals against Butcher's order conditions (one per rooted tree); the solver on ODEs
with closed-form solutions, with step counts, evaluation counts and controller factors worked out by hand.
"""

import math
import re
from fractions import Fraction
from functools import lru_cache

import pytest
import torch

from diffusers_scorekit.ode_solver import (
    A,
    B,
    B_HAT,
    C,
    ERROR_WEIGHTS,
    StepSizeController,
    dormand_prince,
    rms,
)

# --- the tableau ---------------------------------------------------------------------------------------------


@lru_cache(None)
def rooted_trees(order):
    """Rooted trees with ``order`` nodes, each a sorted tuple of its subtrees (1, 1, 2, 4, 9 for orders 1..5)."""
    return sorted({tuple(sorted(forest)) for forest in forests(order - 1)})


@lru_cache(None)
def forests(nodes):
    if nodes == 0:
        return [()]
    found = set()
    for first in range(1, nodes + 1):
        for tree in rooted_trees(first):
            for rest in forests(nodes - first):
                found.add(tuple(sorted((tree,) + rest)))
    return sorted(found)


def tree_order(tree):
    return 1 + sum(map(tree_order, tree))


def density(tree):
    """Butcher's gamma: the tree's order times its subtrees' densities."""
    return tree_order(tree) * math.prod(map(density, tree))


def full_a():
    a = [[Fraction(0)] * 7 for _ in range(7)]
    for stage, row in enumerate(A, start=1):
        a[stage][: len(row)] = row
    return a


def elementary_weights(tree, a):
    """Phi_i(tree) for each stage i: the product over subtrees of sum_j a_ij Phi_j(subtree)."""
    subtrees = [elementary_weights(subtree, a) for subtree in tree]
    return [math.prod(sum(a[i][j] * phi[j] for j in range(7)) for phi in subtrees) for i in range(7)]


def order_defect(weights, tree):
    return sum(w * phi for w, phi in zip(weights, elementary_weights(tree, full_a()))) - Fraction(1, density(tree))


def test_there_are_17_order_conditions_up_to_order_5():
    assert [len(rooted_trees(order)) for order in range(1, 6)] == [1, 1, 2, 4, 9]


def test_rows_sum_to_the_nodes_and_the_weights_to_one():
    assert C[0] == 0 and all(sum(row) == node for row, node in zip(A, C[1:]))
    assert sum(B) == sum(B_HAT) == 1 and sum(ERROR_WEIGHTS) == 0
    assert B == A[-1] + (0,)  # first same as last: the fifth-order solution is the last stage's input


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_fifth_order_weights_meet_every_condition_up_to_order_5(order):
    assert all(order_defect(B, tree) == 0 for tree in rooted_trees(order))


def test_embedded_weights_are_fourth_order_and_not_fifth():
    assert all(order_defect(B_HAT, tree) == 0 for order in range(1, 5) for tree in rooted_trees(order))
    defects = [order_defect(B_HAT, tree) for tree in rooted_trees(5)]
    assert all(defects) and defects[0] == Fraction(-71, 405000)  # the bushy tree: sum b_hat c^4 - 1/5


def test_error_estimate_is_two_thirds_of_dormand_and_princes_own():
    dormand_prince_b_hat = (Fraction(5179, 57600), 0, Fraction(7571, 16695), Fraction(393, 640),
                            Fraction(-92097, 339200), Fraction(187, 2100), Fraction(1, 40))
    assert all(order_defect(dormand_prince_b_hat, tree) == 0 for order in range(1, 5) for tree in rooted_trees(order))
    assert ERROR_WEIGHTS == tuple(Fraction(2, 3) * (b - b_hat) for b, b_hat in zip(B, dormand_prince_b_hat))


# --- the controller ------------------------------------------------------------------------------------------


def test_first_accepted_step_is_the_classical_factor():
    # no previous error yet: 0.9 * 0.5^(-1/5) (the P term (previous / error)^0.04 is 1)
    assert StepSizeController().factor(0.5) == pytest.approx(0.9 * 0.5**-0.2, rel=1e-14)


def test_falling_error_grows_the_step_faster_and_rising_error_slower():
    controller = StepSizeController()
    controller.factor(0.5)
    assert controller.factor(0.25) == pytest.approx(0.9 * 0.25**-0.24 * 0.5**0.04, rel=1e-14)
    assert controller.factor(0.5) == pytest.approx(0.9 * 0.5**-0.24 * 0.25**0.04, rel=1e-14)
    assert 0.9 * 0.25**-0.24 * 0.5**0.04 > 0.9 * 0.25**-0.2 > 0.9 * 0.5**-0.2 > 0.9 * 0.5**-0.24 * 0.25**0.04


def test_the_step_after_a_rejection_does_not_grow():
    controller = StepSizeController()
    controller.factor(0.25)
    assert controller.factor(1.5) == pytest.approx(0.9 * 1.5**-0.2, rel=1e-14)  # rejected: the I term alone
    assert controller.factor(0.01) == 1.0  # would be 0.9 * 0.01^-0.24 * 0.25^0.04 = 2.6
    # the rejected error is not remembered: the next factor compares with the accepted 0.01
    assert controller.factor(0.02) == pytest.approx(0.9 * 0.02**-0.24 * 0.01**0.04, rel=1e-14)
    # a shrinking factor after a rejection stays as it is
    controller.factor(2.0)
    factor = 0.9 * 0.9**-0.24 * 0.02**0.04
    assert controller.factor(0.9) == pytest.approx(factor, rel=1e-14) and factor < 1


@pytest.mark.parametrize("error", [1.0, 2.0])
def test_an_error_of_one_or_more_is_a_rejection(error):
    controller = StepSizeController()
    assert controller.factor(error) == pytest.approx(0.9 * error**-0.2, rel=1e-14)
    assert controller.after_rejection and controller.previous_error is None


def test_factors_are_capped():
    assert StepSizeController().factor(1e6) == 0.2
    assert StepSizeController().factor(float("nan")) == 0.2
    assert StepSizeController().factor(float("inf")) == 0.2
    assert StepSizeController().factor(1e-9) == 10.0  # 0.9 * 1e-9^-0.24 * 1e-4^0.04 = 98
    assert StepSizeController().factor(0.0) == 10.0
    # a small error below the cap: the formula, 0.9 * 1e-4^(-1/5) = 5.68
    assert StepSizeController().factor(1e-4) == pytest.approx(0.9 * 1e-4**-0.2, rel=1e-14)


def test_the_previous_error_is_floored():
    controller = StepSizeController()
    controller.factor(0.0)
    assert controller.previous_error == 1e-4
    assert controller.factor(0.5) == pytest.approx(0.9 * 0.5**-0.24 * 1e-4**0.04, rel=1e-14)


# --- the solver ----------------------------------------------------------------------------------------------


class Counted:
    """``dy/dt = function(t, y)``; records the times it is evaluated at."""

    def __init__(self, function):
        self.function, self.times = function, []

    def __call__(self, t, y):
        assert t.dtype == torch.float64 and t.ndim == 0
        self.times.append(t.item())
        return self.function(t, y)


def test_a_constant_solution_takes_steps_growing_tenfold():
    """y' = 0: the error is 0, so every step is 10 times the last; the first is 1e-6 (nothing moves, see
    ``initial_step``), and 1e-6 (1 + 10 + ... + 10^6) > 1 > 1e-6 (1 + ... + 10^5): 7 steps, the last cut to land
    on 1. Evaluations: the start, the first step's probe and 6 per step."""
    dynamics = Counted(lambda t, y: torch.zeros_like(y))
    result = dormand_prince(dynamics, torch.ones(3, dtype=torch.float64), 0.0, 1.0, rtol=1e-6, atol=1e-6)
    assert (result.nfe, result.accepted, result.rejected) == (44, 7, 0) and len(dynamics.times) == 44
    assert torch.equal(result.state, torch.ones(3, dtype=torch.float64))
    step_ends = [1e-6 * (10**k - 1) / 9 for k in range(1, 7)] + [1.0]
    assert dynamics.times[0] == 0.0 and dynamics.times[1] == pytest.approx(1e-6, rel=1e-12)
    assert dynamics.times[7::6] == pytest.approx(step_ends, rel=1e-12) and dynamics.times[-1] == 1.0


def test_evaluations_are_two_plus_six_per_attempted_step():
    # a stiff decay over a long span: its step is held by stability, and some attempts are rejected
    dynamics = Counted(lambda t, y: -200.0 * y)
    result = dormand_prince(dynamics, torch.ones(2, dtype=torch.float64), 0.0, 1.0, rtol=1e-3, atol=1e-3)
    assert result.rejected > 0 and result.nfe == len(dynamics.times) == 2 + 6 * (result.accepted + result.rejected)


def rotation_decay():
    """y' = M y with M = [[-0.5, 2], [-2, -0.5]]: y(t) = expm(t M) y0, a damped rotation."""
    matrix = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=torch.float64)
    return matrix, lambda t, y: y @ matrix.T


def within_twice_the_tolerance(state, exact, tolerance):
    """The tolerance holds each step's error estimate to ``atol + rtol |y|`` (RMS over the entries); over these
    spans of 10 to 25 steps the largest global error stays within twice ``tolerance * (1 + max |y|)``."""
    return (state - exact).abs().max().item() <= 2 * tolerance * (1 + exact.abs().max().item())


@pytest.mark.parametrize("t_start, t_end", [(0.0, 2.0), (2.0, 0.0), (0.25, 1.75)])
def test_linear_ode_to_the_promised_tolerance_in_both_directions(t_start, t_end):
    matrix, dynamics = rotation_decay()
    y0 = torch.tensor([[1.0, 0.5], [-2.0, 3.0]], dtype=torch.float64)
    exact = y0 @ torch.linalg.matrix_exp((t_end - t_start) * matrix).T
    counted = Counted(dynamics)
    result = dormand_prince(counted, y0, t_start, t_end, rtol=1e-7, atol=1e-7)
    assert within_twice_the_tolerance(result.state, exact, 1e-7)
    assert min(counted.times) == min(t_start, t_end) and max(counted.times) == max(t_start, t_end)


def test_error_shrinks_with_the_tolerance():
    matrix, dynamics = rotation_decay()
    y0 = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    exact = y0 @ torch.linalg.matrix_exp(2 * matrix).T
    errors, evaluations = [], []
    for tolerance in (1e-4, 1e-6, 1e-8, 1e-10):
        result = dormand_prince(dynamics, y0, 0.0, 2.0, rtol=tolerance, atol=tolerance)
        errors.append((result.state - exact).abs().max().item())
        evaluations.append(result.nfe)
        assert within_twice_the_tolerance(result.state, exact, tolerance)
    # a hundredfold tighter tolerance: about a hundredfold smaller error, for about 100^(1/5) = 2.5 times the steps
    assert all(10 < coarse / fine < 1000 for coarse, fine in zip(errors, errors[1:]))
    assert all(1.5 < (fine - 2) / (coarse - 2) < 4 for coarse, fine in zip(evaluations, evaluations[1:]))


def test_the_error_estimate_of_one_step_on_a_quintic():
    """y' = 5 t^4 from y(1) = 1, i.e. y = t^5: the fifth-order solution is exact and the fourth-order one is off by
    5 h^5 (1/5 - sum b_hat c^4) = 5 h^5 * 71/405000 (the lower powers of t integrate exactly in both); the norm
    sees it over atol + rtol max(|y0|, |y1|), with y1 = (1 + h)^5."""
    seen = []

    def norm(scaled):
        seen.append(scaled.clone())
        return scaled.abs().max()

    dynamics = Counted(lambda t, y: 5 * t**4 * torch.ones_like(y))
    result = dormand_prince(dynamics, torch.ones(1, dtype=torch.float64), 1.0, 2.0, rtol=1e-3, atol=2e-3, norm=norm)
    first_step = dynamics.times[7] - 1  # the start, the probe, then the first step's six stages, landing at 1 + h
    new_y = (1 + first_step) ** 5
    assert 0.01 < first_step < 1
    expected = 5 * first_step**5 * 71 / 405000 / (2e-3 + 1e-3 * new_y)
    assert seen[3].abs().item() == pytest.approx(expected, rel=1e-9)  # after initial_step's three
    assert result.state.item() == pytest.approx(32.0, rel=1e-12)


def test_states_may_be_tuples_of_tensors():
    matrix, dynamics = rotation_decay()
    y0 = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    result = dormand_prince(lambda t, pair: (dynamics(t, pair[0]), -pair[1]), (y0, torch.ones(3, dtype=torch.float64)),
                            0.0, 1.0, rtol=1e-8, atol=1e-8, norm=lambda pair: torch.maximum(*map(rms, pair)))
    assert within_twice_the_tolerance(result.state[0], y0 @ torch.linalg.matrix_exp(matrix).T, 1e-8)
    assert within_twice_the_tolerance(result.state[1], torch.full((3,), math.exp(-1), dtype=torch.float64), 1e-8)


def test_too_many_steps_is_a_clear_error():
    message = ("the ODE solve took more than max_steps=3 steps between t=0.0 and t=1.0 (reached t=0.000111, "
               "step 0.001); loosen rtol/atol or check the model for NaN or stiffness.")
    with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
        dormand_prince(lambda t, y: torch.zeros_like(y), torch.ones(1, dtype=torch.float64), 0.0, 1.0,
                       rtol=1e-6, atol=1e-6, max_steps=3)


def test_a_model_that_returns_nan_ends_in_the_step_limit():
    with pytest.raises(RuntimeError, match="max_steps=20 steps"):
        dormand_prince(lambda t, y: torch.full_like(y, float("nan")) if t > 0.5 else -y,
                       torch.ones(1, dtype=torch.float64), 0.0, 1.0, rtol=1e-6, atol=1e-6, max_steps=20)



def test_steps_are_accepted_exactly_when_their_error_is_below_one(monkeypatch):
    """Every error the controller sees is one attempt: below 1 accepted, 1 or more rejected (the stiff decay has
    rejected attempts with errors between 1 and 2)."""
    errors = []
    factor = StepSizeController.factor
    monkeypatch.setattr(StepSizeController, "factor", lambda self, error: errors.append(error) or factor(self, error))
    result = dormand_prince(lambda t, y: -200.0 * y, torch.ones(2, dtype=torch.float64), 0.0, 1.0, rtol=1e-3,
                            atol=1e-3)
    assert any(1 <= error < 2 for error in errors)
    assert (result.accepted, result.rejected) == (sum(e < 1 for e in errors), sum(e >= 1 for e in errors))


def test_rejections_count_towards_max_steps():
    attempts = []
    with pytest.raises(RuntimeError, match="max_steps=4 steps"):
        dormand_prince(lambda t, y: attempts.append(t) or torch.full_like(y, float("nan")),
                       torch.ones(1, dtype=torch.float64), 0.0, 1.0, rtol=1e-6, atol=1e-6, max_steps=4)
    assert len(attempts) == 2 + 6 * 4  # the start, the first-step probe and four rejected attempts


def test_the_last_step_lands_on_t_end_where_t_plus_the_remaining_span_would_not():
    # from 1 down to 1e-17: t - (t - 1e-17) rounds to 0 for any t of order 1e-2, so only an end taken as t_end
    # evaluates at t_end, and nothing is evaluated outside [t_end, t_start]
    times = []
    dormand_prince(lambda t, y: times.append(t.item()) or -y, torch.ones(3, dtype=torch.float64), 1.0, 1e-17,
                   rtol=1e-6, atol=1e-6)
    assert times[-1] == 1e-17 and all(1e-17 <= t <= 1.0 for t in times)
