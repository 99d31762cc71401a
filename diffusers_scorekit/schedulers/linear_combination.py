"""A step's update as a linear combination of its input tensors, with coefficients fixed by the grid.

Every update rule in ``sde_updates`` is linear in the sample, the model output, the noise and (for multistep
solvers) tensors kept from earlier steps, with coefficients that depend only on the noise levels. So a scheduler
runs each rule once per stage in ``set_timesteps`` on *symbols* (``LinearCombination.symbol("sample")``, ...)
rather than on tensors: the rule's arithmetic then happens on float64 Python numbers, and ``step`` is left with
one multiply-add per input. A stochastic step costs three elementwise kernels instead of about fifteen, its
coefficients carry no float32 rounding, and the formulas are still written once, readably, in ``sde_updates``.
"""

from typing import Dict, Mapping, Tuple

import torch


class LinearCombination:
    """``sum_k c_k input_k`` over named inputs, closed under ``+``, ``-`` and scaling by numbers.

    Calling it on a mapping of input names to tensors evaluates it. A product of two combinations is not linear
    and raises, which is what keeps a rule that is not a fixed linear map from being planned this way.
    """

    __slots__ = ("coefficients",)

    def __init__(self, coefficients: Mapping[str, float]):
        self.coefficients: Dict[str, float] = dict(coefficients)

    @classmethod
    def symbol(cls, name: str) -> "LinearCombination":
        return cls({name: 1.0})

    @property
    def inputs(self) -> Tuple[str, ...]:
        """The names this combination reads (those with a non-zero coefficient)."""
        return tuple(name for name, coefficient in self.coefficients.items() if coefficient != 0.0)

    def __add__(self, other: "LinearCombination") -> "LinearCombination":
        if not isinstance(other, LinearCombination):
            return NotImplemented
        total = dict(self.coefficients)
        for name, coefficient in other.coefficients.items():
            total[name] = total.get(name, 0.0) + coefficient
        return LinearCombination(total)

    def __mul__(self, scalar) -> "LinearCombination":
        if isinstance(scalar, (LinearCombination, torch.Tensor)):
            raise TypeError("only numbers scale a LinearCombination: a product of inputs is not a linear update")
        return LinearCombination({name: coefficient * float(scalar) for name, coefficient in self.coefficients.items()})

    __rmul__ = __mul__

    def __truediv__(self, scalar) -> "LinearCombination":
        return self * (1.0 / float(scalar))

    def __neg__(self) -> "LinearCombination":
        return self * -1.0

    def __sub__(self, other: "LinearCombination") -> "LinearCombination":
        return self + (-other)

    def __call__(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        names = self.inputs
        if not names:
            raise ValueError("a LinearCombination with no non-zero coefficient has no tensor to take a shape from")
        result = tensors[names[0]] * self.coefficients[names[0]]
        for name in names[1:]:
            result.add_(tensors[name], alpha=self.coefficients[name])  # in place: no further allocation
        return result

    def __repr__(self) -> str:
        return " + ".join(f"{coefficient:.6g} {name}" for name, coefficient in self.coefficients.items())
