"""Executable contracts for component authors.

One call checks a component against its interface the same way the built-ins are checked::

    from llamaforge.testing import check_component
    check_component("activation", "relu2")          # by registered name
    check_component("norm", MyNorm)                 # or by factory

Hypothesis strategies for valid specs live here too (`specs()`), so plugin suites can property-test models that
use their components.
"""

from llamaforge.testing.contracts import (
    check_activation,
    check_attention,
    check_attention_kernel,
    check_component,
    check_head,
    check_model,
    check_norm,
    check_position_embedding,
)
from llamaforge.testing.strategies import specs

__all__ = [
    "check_activation",
    "check_attention",
    "check_attention_kernel",
    "check_component",
    "check_head",
    "check_model",
    "check_norm",
    "check_position_embedding",
    "specs",
]
