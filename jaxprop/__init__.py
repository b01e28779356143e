"""jaxprop: reverse-mode autodiff for JAX with its own tracer, tape and reverse sweep."""

from jaxprop import rules as _rules  # noqa: F401  (registers every VJP rule)
from jaxprop.api import grad, hessian, jacrev, value_and_grad, vjp
from jaxprop.registry import MissingRuleError, Node, defvjp, noderule, register, registered

__version__ = "0.1.0"

__all__ = [
    "MissingRuleError", "Node", "defvjp", "grad", "hessian", "jacrev", "noderule", "register",
    "registered", "value_and_grad", "vjp",
]
