"""The plugin author's own test suite: llamaforge's contract checks, one call per component."""

from __future__ import annotations

from hypothesis import given, settings

from llamaforge.testing import check_component, check_model, specs


def test_relu2_activation_contract():
    check_component("activation", "relu2")


def test_scalenorm_contract():
    check_component("norm", "scalenorm")


@settings(max_examples=8, deadline=None)
@given(specs(activations=("relu2",), norms=("scalenorm", "rmsnorm")))
def test_models_using_the_plugin(spec):
    check_model(spec)
