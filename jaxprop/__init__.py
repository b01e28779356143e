"""jaxprop: reverse-mode autodiff for JAX with its own tracer, tape and reverse sweep."""

from jaxprop import rules as _rules  # noqa: F401  (registers every VJP rule)
from jaxprop import checkpointing
from jaxprop.anomaly import NonFiniteGradientError, detect_anomaly
from jaxprop.api import grad, hessian, jacrev, value_and_grad, vjp
from jaxprop.registry import MissingRuleError, Node, defvjp, noderule, register, registered
from jaxprop.registry import vjp_rule
from jaxprop.explain import Explanation, explain
from jaxprop.hooks import (clip_gradient, clip_gradient_norm, feedback_alignment, feedback_rule,
                           gradient_reversal, hook, override, scope_hook, straight_through)
from jaxprop.filtered import filter_grad, filter_value_and_grad, filter_vjp
from jaxprop.nan import NanReport, find_nan_origin
from jaxprop.checkpointing import checkpoints
from jaxprop.tags import grad_and_tags, scope_tag, tag, value_and_grad_and_tags
from jaxprop.scopes import ScopeWarning, scoped
from jaxprop.tracer import inlining

__version__ = "0.1.0"

__all__ = [
    "MissingRuleError", "Node", "checkpoints", "checkpointing", "defvjp", "grad", "hessian",
    "jacrev", "noderule", "register", "registered", "value_and_grad", "vjp",
    "Explanation", "NanReport", "clip_gradient", "clip_gradient_norm", "explain",
    "feedback_alignment", "feedback_rule", "find_nan_origin", "grad_and_tags",
    "gradient_reversal", "hook", "inlining", "override", "straight_through", "tag",
    "value_and_grad_and_tags", "vjp_rule",
    "NonFiniteGradientError", "ScopeWarning", "detect_anomaly", "filter_grad",
    "filter_value_and_grad", "filter_vjp", "scope_hook", "scope_tag", "scoped",
]
