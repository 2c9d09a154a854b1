"""Adaptive-learning-rate modules: Adam, RMSProp, Adagrad and Yogi.

Each module outputs a direction; the :class:`~fedpipe.common.optim.Optimizer` multiplies it by
``-lrate``, which is where torch applies ``lr``. On the server (aggregated client updates as
gradients) ``adam``, ``yogi`` and ``adagrad`` give FedAdam, FedYogi and FedAdagrad (Reddi et
al., 2021, "Adaptive Federated Optimization").

Reproducing the paper and Flower. The server's gradient is ``x_t - mean(y_i) = -Delta_t``, so
``x_{t+1} = x_t - eta * out`` is the paper's ``x_t + eta m_t / (sqrt(v_t) + tau)`` (the sign
cancels in ``m_t``; ``v_t`` sees squares). With ``eps = tau`` and the server ``lrate = eta``:

- Reddi et al. 2021, Alg. 2: ``bias_correction="none"``, ``initial_accumulator_value =
  tau**2`` (the paper's ``v_{-1} >= tau^2``), for ``adam``, ``yogi`` and ``adagrad`` (whose
  ``beta_1`` is the paper's; 0 drops the momentum).
- Flower's ``FedAdam`` (flwr >= 1.13): ``bias_correction="flower"``; flwr <= 1.12:
  ``"none"``. Flower's ``FedYogi``: ``"none"``. Flower's ``FedAdagrad``: ``beta_1=0``. Flower
  starts ``v`` at zero (``initial_accumulator_value=0``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from fedpipe.common.modules.base import OptiModule
from fedpipe.common.state import State, state_vector
from fedpipe.common.vector import Vector

__all__ = ["AdagradModule", "AdamModule", "RMSPropModule", "YogiModule"]


def _state_step(state: State, module: str) -> int:
    step = state.get("step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{module} state 'step' must be a non-negative int, got {step!r}")
    return step


def _check_beta(value: float, what: str) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{what}={value}; expected a number in [0, 1)")
    return float(value)


def _check_initial(value: float, what: str) -> float:
    if not value >= 0:
        raise ValueError(f"{what}={value}; expected >= 0")
    return float(value)


BIAS_CORRECTIONS = ("torch", "flower", "none")


def _check_bias_correction(value: object, module: str) -> str:
    if not isinstance(value, str) or value not in BIAS_CORRECTIONS:
        raise ValueError(
            f"{module} bias_correction={value!r}; expected one of "
            + ", ".join(repr(mode) for mode in BIAS_CORRECTIONS)
        )
    return value


def _moment_ratio(
    m: Vector, v: Vector, step: int, beta_1: float, beta_2: float, eps: float, mode: str
) -> Vector:
    """``m / (sqrt(v) + eps)``, bias-corrected at ``step`` (1 at the first step) as ``mode``
    says: ``"torch"`` (``torch.optim.Adam``)
    ``(m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)``; ``"flower"`` (Flower's
    ``FedAdam``: Kingma & Ba's step size ``alpha_t``, at Flower's exponent ``round + 1``
    with rounds counted from 1) ``sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) * m / (sqrt(v) + eps)``;
    ``"none"`` (Reddi et al. 2021, Alg. 2) ``m / (sqrt(v) + eps)``."""
    if mode == "torch":
        correction_1 = 1.0 - beta_1**step
        correction_2 = (1.0 - beta_2**step) ** 0.5
        return (m / correction_1) / (v.sqrt() / correction_2 + eps)
    ratio = m / (v.sqrt() + eps)
    if mode == "flower":
        ratio.mul_((1.0 - beta_2 ** (step + 1)) ** 0.5 / (1.0 - beta_1 ** (step + 1)))
    return ratio


class AdamModule(OptiModule):
    """Adam (Kingma & Ba, 2015) and its AMSGrad variant (Reddi et al., 2018), with the exact
    formulas of ``torch.optim.Adam``.

    ``m_t = b1 m + (1 - b1) g``, ``v_t = b2 v + (1 - b2) g^2`` (``m_0 = 0``, ``v_0 =
    initial_accumulator_value``); output ``(m_t / (1 - b1^t)) / (sqrt(v_t) / sqrt(1 - b2^t) +
    eps)``, or another bias correction (see ``bias_correction``). With ``amsgrad`` (as torch
    does it), ``v_t`` in the denominator is replaced by the running maximum of ``v_t``, bias
    correction applied to that maximum.

    torch mapping: ``Adam(lr, betas=(beta_1, beta_2), eps, amsgrad)`` is
    ``Optimizer(lrate=lr, modules=[["adam", {...}]])``. ``Adam(weight_decay=wd)`` (L2 added
    to the gradients) is a ``["ridge", {"alpha": wd / 2}]`` regularizer; ``AdamW(weight_decay=
    wd)`` (decoupled) is ``Optimizer(w_decay=wd)``.

    Parameters
    ----------
    beta_1, beta_2:
        Decay rates of the first and second moment estimates, in [0, 1).
    eps:
        Added to the denominator, after the square root.
    amsgrad:
        Use the maximum of past second-moment estimates.
    bias_correction:
        ``"torch"`` (as above), ``"flower"`` (Flower's ``FedAdam``) or ``"none"`` (Reddi et
        al. 2021, Alg. 2): see the module docstring.
    initial_accumulator_value:
        ``v_0`` (non-negative); the paper's ``v_{-1}``.
    """

    name: ClassVar[str] = "adam"

    def __init__(
        self,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        eps: float = 1e-8,
        amsgrad: bool = False,
        bias_correction: str = "torch",
        initial_accumulator_value: float = 0.0,
    ) -> None:
        self.beta_1 = _check_beta(beta_1, "adam beta_1")
        self.beta_2 = _check_beta(beta_2, "adam beta_2")
        self.eps = float(eps)
        self.amsgrad = bool(amsgrad)
        self.bias_correction = _check_bias_correction(bias_correction, "adam")
        self.initial_accumulator_value = _check_initial(
            initial_accumulator_value, "adam initial_accumulator_value"
        )
        self.step = 0
        self.m: Vector | None = None
        self.v: Vector | None = None
        self.v_max: Vector | None = None

    def get_config(self) -> dict[str, Any]:
        return {
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "eps": self.eps,
            "amsgrad": self.amsgrad,
            "bias_correction": self.bias_correction,
            "initial_accumulator_value": self.initial_accumulator_value,
        }

    def run(self, gradients: Vector) -> Vector:
        if self.m is None or self.v is None:
            self.m = gradients.zeros_like()
            self.v = gradients.full_like(self.initial_accumulator_value)
        self.step += 1
        self.m = self.beta_1 * self.m + (1.0 - self.beta_1) * gradients
        self.v = self.beta_2 * self.v + (1.0 - self.beta_2) * gradients.square()
        second = self.v
        if self.amsgrad:
            self.v_max = self.v if self.v_max is None else self.v_max.maximum(self.v)
            second = self.v_max
        return _moment_ratio(
            self.m, second, self.step, self.beta_1, self.beta_2, self.eps, self.bias_correction
        )

    def get_state(self) -> State:
        return {"step": self.step, "m": self.m, "v": self.v, "v_max": self.v_max}

    def set_state(self, state: State) -> None:
        self.step = _state_step(state, self.name)
        self.m = state_vector(state, "m", self.name)
        self.v = state_vector(state, "v", self.name)
        self.v_max = state_vector(state, "v_max", self.name)


class RMSPropModule(OptiModule):
    """RMSProp (Tieleman & Hinton, 2012, Lecture 6.5), with the exact formulas of
    ``torch.optim.RMSprop``.

    ``v_t = beta v + (1 - beta) g^2``; output ``g / (sqrt(v_t) + eps)``. With ``centered``
    (Graves, 2013), ``a_t = beta a + (1 - beta) g`` and the output is
    ``g / (sqrt(v_t - a_t^2) + eps)``.

    torch mapping: ``RMSprop(lr, alpha=beta, eps, centered)`` is
    ``Optimizer(lrate=lr, modules=[["rmsprop", {...}]])``; ``RMSprop(momentum=mu)`` appends
    ``["momentum", {"beta": mu}]`` after this module; ``weight_decay=wd`` is a
    ``["ridge", {"alpha": wd / 2}]`` regularizer.

    Parameters
    ----------
    beta:
        Decay rate of the average of squared gradients (torch's ``alpha``), in [0, 1).
    eps:
        Added to the denominator, after the square root.
    centered:
        Normalize by the estimated variance rather than the second moment.
    """

    name: ClassVar[str] = "rmsprop"

    def __init__(self, beta: float = 0.99, eps: float = 1e-8, centered: bool = False) -> None:
        self.beta = _check_beta(beta, "rmsprop beta")
        self.eps = float(eps)
        self.centered = bool(centered)
        self.v: Vector | None = None
        self.mean: Vector | None = None

    def get_config(self) -> dict[str, Any]:
        return {"beta": self.beta, "eps": self.eps, "centered": self.centered}

    def run(self, gradients: Vector) -> Vector:
        if self.v is None:
            self.v = gradients.zeros_like()
        self.v = self.beta * self.v + (1.0 - self.beta) * gradients.square()
        second = self.v
        if self.centered:
            if self.mean is None:
                self.mean = gradients.zeros_like()
            self.mean = self.beta * self.mean + (1.0 - self.beta) * gradients
            second = self.v - self.mean.square()
        return gradients / (second.sqrt() + self.eps)

    def get_state(self) -> State:
        return {"v": self.v, "mean": self.mean}

    def set_state(self, state: State) -> None:
        self.v = state_vector(state, "v", self.name)
        self.mean = state_vector(state, "mean", self.name)


class AdagradModule(OptiModule):
    """Adagrad (Duchi et al., 2011), with the exact formulas of ``torch.optim.Adagrad``; with
    ``beta_1 > 0``, FedAdagrad's momentum (Reddi et al., 2021, Alg. 2).

    ``s_t = s_{t-1} + g^2`` with ``s_0 = initial_accumulator_value``; output
    ``g / (sqrt(s_t) + eps)``. With ``beta_1 > 0`` the numerator is ``m_t = b1 m_{t-1} +
    (1 - b1) g`` (``m_0 = 0``), the paper's ``m_t / (sqrt(v_t) + tau)``.

    torch mapping: ``Adagrad(lr, eps, initial_accumulator_value)`` is
    ``Optimizer(lrate=lr, modules=[["adagrad", {...}]])``. torch's ``lr_decay=d`` scales the
    learning rate, ``lr / (1 + d * step)`` at the 0-based step: that is the learning-rate
    scheduler ``["inverse-time-decay", {"initial": lr, "decay_rate": d}]``. ``weight_decay=wd``
    is a ``["ridge", {"alpha": wd / 2}]`` regularizer.

    Parameters
    ----------
    eps:
        Added to the denominator, after the square root.
    initial_accumulator_value:
        Starting value of the sum of squared gradients (non-negative).
    beta_1:
        Decay rate of the gradients' moving average, in [0, 1); 0 is torch's Adagrad.
    """

    name: ClassVar[str] = "adagrad"

    def __init__(
        self, eps: float = 1e-10, initial_accumulator_value: float = 0.0, beta_1: float = 0.0
    ) -> None:
        self.eps = float(eps)
        self.initial_accumulator_value = _check_initial(
            initial_accumulator_value, "adagrad initial_accumulator_value"
        )
        self.beta_1 = _check_beta(beta_1, "adagrad beta_1")
        self.accumulator: Vector | None = None
        self.m: Vector | None = None

    def get_config(self) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "initial_accumulator_value": self.initial_accumulator_value,
            "beta_1": self.beta_1,
        }

    def run(self, gradients: Vector) -> Vector:
        if self.accumulator is None:
            self.accumulator = gradients.full_like(self.initial_accumulator_value)
        self.accumulator = self.accumulator + gradients.square()
        if self.beta_1 == 0.0:
            return gradients / (self.accumulator.sqrt() + self.eps)
        if self.m is None:
            self.m = gradients.zeros_like()
        self.m = self.beta_1 * self.m + (1.0 - self.beta_1) * gradients
        return self.m / (self.accumulator.sqrt() + self.eps)

    def get_state(self) -> State:
        return {"accumulator": self.accumulator, "m": self.m}

    def set_state(self, state: State) -> None:
        self.accumulator = state_vector(state, "accumulator", self.name)
        self.m = state_vector(state, "m", self.name)


class YogiModule(OptiModule):
    """Yogi (Zaheer et al., 2018, "Adaptive Methods for Nonconvex Optimization", Algorithm 2).

    ``m_t = b1 m + (1 - b1) g``; ``v_t = v - (1 - b2) sign(v - g^2) g^2`` with
    ``v_0 = initial_accumulator_value``; output ``m_t / (sqrt(v_t) + eps)``. The paper (and
    Reddi et al. 2021's FedYogi) has no bias correction; ``bias_correction`` can apply Adam's
    (see :class:`AdamModule`).

    Parameters
    ----------
    beta_1, beta_2:
        Decay rates of the first and second moment estimates, in [0, 1).
    eps:
        Added to the denominator, after the square root (the paper uses 1e-3).
    initial_accumulator_value:
        Starting value of ``v`` (non-negative).
    bias_correction:
        ``"none"`` (the paper), ``"torch"`` or ``"flower"``, as :class:`AdamModule`'s.
    """

    name: ClassVar[str] = "yogi"

    def __init__(
        self,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        eps: float = 1e-3,
        initial_accumulator_value: float = 0.0,
        bias_correction: str = "none",
    ) -> None:
        self.beta_1 = _check_beta(beta_1, "yogi beta_1")
        self.beta_2 = _check_beta(beta_2, "yogi beta_2")
        self.eps = float(eps)
        self.initial_accumulator_value = _check_initial(
            initial_accumulator_value, "yogi initial_accumulator_value"
        )
        self.bias_correction = _check_bias_correction(bias_correction, "yogi")
        self.step = 0
        self.m: Vector | None = None
        self.v: Vector | None = None

    def get_config(self) -> dict[str, Any]:
        return {
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "eps": self.eps,
            "initial_accumulator_value": self.initial_accumulator_value,
            "bias_correction": self.bias_correction,
        }

    def run(self, gradients: Vector) -> Vector:
        if self.m is None or self.v is None:
            self.m = gradients.zeros_like()
            self.v = gradients.full_like(self.initial_accumulator_value)
        self.step += 1
        squared = gradients.square()
        self.m = self.beta_1 * self.m + (1.0 - self.beta_1) * gradients
        self.v = self.v - (1.0 - self.beta_2) * (self.v - squared).sign() * squared
        return _moment_ratio(
            self.m, self.v, self.step, self.beta_1, self.beta_2, self.eps, self.bias_correction
        )

    def get_state(self) -> State:
        return {"step": self.step, "m": self.m, "v": self.v}

    def set_state(self, state: State) -> None:
        self.step = _state_step(state, self.name)
        self.m = state_vector(state, "m", self.name)
        self.v = state_vector(state, "v", self.name)
