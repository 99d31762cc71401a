"""An adaptive Dormand-Prince 5(4) solver in torch for the probability-flow ODE (GitHub issues #4 and #14).

The state is a tensor or a tuple of tensors (``[x, delta_log_p]`` for the likelihood) and stays on its device;
only the end state is returned (no dense output). Dormand and Prince's pair advances with the fifth-order
solution and estimates the error with an embedded fourth-order one; its last stage is the derivative at the new
point, so an accepted step hands it to the next one (first same as last, FSAL) and every attempted step, accepted
or rejected, costs six evaluations. A solve costs ``2 + 6 * (accepted + rejected)`` evaluations: the derivative at
the start, the probe that sizes the first step (``initial_step``) and the steps.

The step size is set by a PI controller (``StepSizeController``). On a score network the step is often held by
the explicit method's stability rather than its accuracy, and the classical controller (scipy's RK45,
torchdiffeq's dopri5) then swings between errors of about 0.5 and 1.5 and has one attempt in four rejected (10 of
40 for scipy's RK45 on benchmarks/bench_likelihood.py's --quick UNet); the PI controller's second term damps that
swing (Gustafsson, ACM TOMS 17, 1991; Hairer and Wanner, Solving ODEs II, IV.2): 5 of 33 there.
"""

from fractions import Fraction
from typing import Callable, NamedTuple

import torch

# Dormand and Prince's RK5(4)7M tableau (J. Comput. Appl. Math. 6, 1980): nodes C, stage coefficients A (row i
# gives stage i + 1 from stages 0..i) and fifth-order weights B (also A's last row: FSAL). B_HAT are the
# alternative fourth-order weights for the same stages that torchdiffeq's dopri5 uses (its "Dormand-Prince-
# Shampine" tableau). Their error estimate B - B_HAT is exactly 2/3 of the one from Dormand and Prince's
# own fourth-order weights (5179/57600, 0, 7571/16695, 393/640, -92097/339200, 187/2100, 1/40; scipy's RK45), so
# at equal rtol and atol the solve is held as torchdiffeq's was, 1.5 times looser than scipy's on the estimate:
# on the exact mixture that keeps its 86 evaluations (98 with Dormand and Prince's weights) at the same bits/dim.
C = tuple(map(Fraction, ("0", "1/5", "3/10", "4/5", "8/9", "1", "1")))
A = (
    (Fraction(1, 5),),
    (Fraction(3, 40), Fraction(9, 40)),
    (Fraction(44, 45), Fraction(-56, 15), Fraction(32, 9)),
    (Fraction(19372, 6561), Fraction(-25360, 2187), Fraction(64448, 6561), Fraction(-212, 729)),
    (Fraction(9017, 3168), Fraction(-355, 33), Fraction(46732, 5247), Fraction(49, 176), Fraction(-5103, 18656)),
    (Fraction(35, 384), Fraction(0), Fraction(500, 1113), Fraction(125, 192), Fraction(-2187, 6784), Fraction(11, 84)),
)
B = A[-1] + (Fraction(0),)
B_HAT = (Fraction(1951, 21600), Fraction(0), Fraction(22642, 50085), Fraction(451, 720), Fraction(-12231, 42400),
         Fraction(649, 6300), Fraction(1, 60))
# the error estimate is the difference of the two solutions: h * sum_i (B - B_HAT)_i k_i
ERROR_WEIGHTS = tuple(b - b_hat for b, b_hat in zip(B, B_HAT))
ORDER = 5
ERROR_ORDER = 4

# step-size control (``StepSizeController``)
SAFETY = 0.9
MIN_FACTOR = 0.2
MAX_FACTOR = 10.0
INTEGRAL_GAIN = 1 / (ERROR_ORDER + 1)  # the classical controller: the error of a step of size h scales as h^5
PROPORTIONAL_GAIN = 0.04  # the beta of Hairer's DOPRI5 code (whose integral gain is 0.2 - 0.75 beta instead)
ERROR_FLOOR = 1e-4  # the smallest error remembered as the previous one (Hairer's), so that an exact step cannot
# hold back the next one's growth
DEFAULT_MAX_STEPS = 10_000


class SolveResult(NamedTuple):
    """The state at ``t_end`` and what it cost: right-hand-side calls, accepted and rejected steps."""

    state: object
    nfe: int
    accepted: int
    rejected: int


def rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.pow(2).mean().sqrt()


def each(function: Callable, *states):
    """``function`` applied part by part to states that are tensors or tuples of tensors."""
    if isinstance(states[0], tuple):
        return tuple(function(*parts) for parts in zip(*states))
    return function(*states)


def initial_step(dynamics: Callable, state, derivative, t_start: float, t_end: float, rtol, atol, norm,
                 order: int = ORDER) -> float:
    """Hairer, Norsett and Wanner's starting step size (Solving ODEs I, II.4), kept inside ``[t_start, t_end]``.

    torchdiffeq's own choice probes the right-hand side at ``t_start + h0`` with ``h0`` unbounded: where the drift
    is small at the start (VE at ``t = eps``) that lies far outside [0, 1], where sigma overflows. One probe
    evaluation.
    """
    span = abs(t_end - t_start)
    direction = 1.0 if t_end > t_start else -1.0
    scale = each(lambda y: atol + rtol * y.abs(), state)
    d0 = norm(each(torch.div, state, scale)).item()
    d1 = norm(each(torch.div, derivative, scale)).item()
    h0 = min(1e-6 if min(d0, d1) < 1e-5 else 0.01 * d0 / d1, span)
    probe = dynamics(t_start + direction * h0, each(lambda y, f: y + direction * h0 * f, state, derivative))
    d2 = norm(each(lambda f1, f0, s: (f1 - f0) / s, probe, derivative, scale)).item() / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1.0 / order)
    return min(100 * h0, h1, span)


class StepSizeController:
    """How much the step changes after each attempt, from its scaled error norm (the attempt is accepted when < 1).

    Accepted: ``SAFETY * error^-(INTEGRAL_GAIN + PROPORTIONAL_GAIN) * previous^PROPORTIONAL_GAIN``, i.e. the
    classical ``SAFETY * error^(-1/5)`` times ``(previous / error)^0.04``, with ``previous`` the last accepted
    error (at the first step, the error itself; at least ``ERROR_FLOOR``): the step grows faster while the error
    falls from step to step, and less fast when it rises. Kept in ``[MIN_FACTOR, MAX_FACTOR]``, and at most 1 right
    after a rejection (the error estimate just failed for a larger step: growing again invites another rejection).

    Rejected: ``max(MIN_FACTOR, SAFETY * error^(-1/5))``; NaN or Inf: ``MIN_FACTOR``.
    """

    def __init__(self):
        self.previous_error = None
        self.after_rejection = False

    def factor(self, error: float) -> float:
        if not error < 1:
            self.after_rejection = True
            return max(MIN_FACTOR, SAFETY * error ** -INTEGRAL_GAIN) if error < float("inf") else MIN_FACTOR
        remembered = max(error, ERROR_FLOOR)
        previous = remembered if self.previous_error is None else self.previous_error
        if error > 0:
            optimal = SAFETY * error ** -(INTEGRAL_GAIN + PROPORTIONAL_GAIN) * previous ** PROPORTIONAL_GAIN
        else:
            optimal = MAX_FACTOR
        factor = min(MAX_FACTOR, max(MIN_FACTOR, optimal))
        if self.after_rejection:
            factor = min(factor, 1.0)
        self.previous_error, self.after_rejection = remembered, False
        return factor


def _time(t: float, state) -> torch.Tensor:
    reference = state[0] if isinstance(state, tuple) else state
    return torch.tensor(t, dtype=torch.float64, device=reference.device)


def _combine(state, h: float, weights, stages):
    """``state + h * sum_i weights_i * stages_i``."""

    def part(y, *ks):
        total = y.clone()
        for weight, k in zip(weights, ks):
            total.add_(k, alpha=h * weight)
        return total

    return each(part, state, *stages)


def dormand_prince(dynamics: Callable, state, t_start: float, t_end: float, *, rtol: float, atol: float,
                   norm: Callable = rms, max_steps: int = DEFAULT_MAX_STEPS) -> SolveResult:
    """Integrate ``d state / dt = dynamics(t, state)`` from ``t_start`` to ``t_end`` (either direction).

    ``t`` is handed to ``dynamics`` as a 0-d float64 tensor on the state's device. A step is accepted when
    ``norm(error / (atol + rtol * max(|y|, |y_new|))) < 1``, part by part for a tuple state; ``norm`` gets a
    state-shaped tuple or tensor of scaled errors (default, for a tensor state: the RMS over its entries). The last
    step lands on ``t_end`` exactly. Raises ``RuntimeError`` after ``max_steps`` attempted steps.
    """
    a = [tuple(map(float, row)) for row in A]
    c = tuple(map(float, C))
    error_weights = tuple(map(float, ERROR_WEIGHTS))
    t_start, t_end = float(t_start), float(t_end)
    direction = 1.0 if t_end > t_start else -1.0
    calls = 0

    def evaluate(t: float, y):
        nonlocal calls
        calls += 1
        return dynamics(_time(t, y), y)

    t, y = t_start, state
    k_first = evaluate(t, y)
    h = initial_step(evaluate, y, k_first, t_start, t_end, rtol, atol, norm)
    controller = StepSizeController()
    accepted = rejected = 0
    while direction * (t_end - t) > 0:
        if accepted + rejected >= max_steps:
            raise RuntimeError(
                f"the ODE solve took more than max_steps={max_steps} steps between t={t_start} and t={t_end} "
                f"(reached t={t:.4g}, step {h:.3g}); loosen rtol/atol or check the model for NaN or stiffness."
            )
        h = min(h, direction * (t_end - t))
        t_new = t_end if h == direction * (t_end - t) else t + direction * h
        signed_h = direction * h
        stages = [k_first]
        for row, node in zip(a, c[1:]):
            # the last row is B: its stage input is the new state, and its value the derivative there
            y_stage = _combine(y, signed_h, row, stages)
            stages.append(evaluate(t + node * signed_h if node != 1 else t_new, y_stage))
        y_new = y_stage
        error = _combine(each(torch.zeros_like, y), signed_h, error_weights, stages)
        scaled = each(lambda e, y0, y1: e / (atol + rtol * torch.maximum(y0.abs(), y1.abs())), error, y, y_new)
        error_norm = norm(scaled).item()
        if error_norm < 1:
            t, y, k_first = t_new, y_new, stages[-1]
            accepted += 1
        else:
            rejected += 1
        h *= controller.factor(error_norm)
    return SolveResult(y, calls, accepted, rejected)

