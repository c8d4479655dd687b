from __future__ import annotations

import importlib.metadata as md
import sys
import textwrap
import types
import warnings

import pytest

from llamaforge.errors import DuplicateComponentError, UnknownComponentError
from llamaforge.registry import Source, plugin_state, registries
from llamaforge.registry.hookspecs import hookimpl
from llamaforge.registry.manager import PluginState
from llamaforge.registry.registry import Registry


def test_register_get_names_with_wildcards():
    r = Registry("norm")
    r.register("rmsnorm", object, source=Source("a"))
    r.register("rms2", object, source=Source("a"))
    r.register("layernorm", object, source=Source("a"))
    assert r.names() == ["layernorm", "rms2", "rmsnorm"]
    assert r.names("rms*") == ["rms2", "rmsnorm"]
    assert r.get("rmsnorm") is object


def test_duplicate_names_both_sources():
    r = Registry("norm")
    r.register("x", object, source=Source("first-plugin", "dist-one", "1.0"))
    with pytest.raises(DuplicateComponentError) as exc:
        r.register("x", object, source=Source("second-plugin", "dist-two", "2.0"))
    msg = str(exc.value)
    assert "dist-one" in msg and "dist-two" in msg and "'x'" in msg


def test_unknown_name_suggests_closest_and_lists_all():
    with pytest.raises(UnknownComponentError) as exc:
        registries().norm.get("rmsnrom")
    msg = str(exc.value)
    assert "Did you mean 'rmsnorm'" in msg
    assert "layernorm" in msg and "rmsnorm" in msg


def test_builtins_registered_through_the_hook():
    regs = registries()
    assert {"rmsnorm", "layernorm"} <= set(regs.norm.names())
    assert "rope_attention" in regs.attention
    assert {"sdpa", "eager"} <= set(regs.attention_kernel.names())
    assert {"swiglu", "gelu", "relu"} <= set(regs.activation.names())
    assert {"linear", "mlp"} <= set(regs.head.names())
    assert {"default", "llama3"} <= set(regs.rope_scaling.names())
    entry = regs.norm.entry("rmsnorm")
    assert entry.source.distribution == "llamaforge"
    assert entry.doc
    # the built-in modules are real pluggy plugins
    names = {plugin_state().pm.get_name(p) for p in plugin_state().pm.get_plugins()}
    assert "llamaforge.plugins.norms" in names


def test_entry_point_plugin_discovered():
    pytest.importorskip("llamaforge_relu2", reason="example plugin not installed (make test installs it)")
    entry = registries().activation.entry("relu2")
    assert entry.source.distribution == "llamaforge-relu2"
    assert entry.source.version == "0.1.0"


def _fake_entry_points(monkeypatch, eps):
    real = md.entry_points

    def fake(**kw):
        if kw.get("group") == "llamaforge":
            return md.EntryPoints(eps)
        return real(**kw)

    monkeypatch.setattr(md, "entry_points", fake)


def _make_ep(name, module_name):
    ep = md.EntryPoint(name=name, value=module_name, group="llamaforge")
    dist = types.SimpleNamespace(name=f"dist-{name}", version="9.9")
    object.__setattr__(ep, "dist", dist) if hasattr(ep, "dist") else None
    return ep


def _fresh_state(monkeypatch) -> PluginState:
    from llamaforge.registry import manager

    state = PluginState()
    manager._load(state)
    return state


def _install_module(monkeypatch, name, source):
    mod = types.ModuleType(name)
    exec(textwrap.dedent(source), mod.__dict__)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


@pytest.fixture
def good_and_bad_plugins(monkeypatch):
    _install_module(
        monkeypatch,
        "lf_good_plugin",
        """
        from llamaforge import hookimpl
        from llamaforge.plugins.norms import RMSNorm
        @hookimpl
        def llamaforge_register(register):
            register("norm", "goodnorm", RMSNorm)
        """,
    )
    _install_module(
        monkeypatch,
        "lf_dup_plugin",
        """
        from llamaforge import hookimpl
        @hookimpl
        def llamaforge_register(register):
            register("norm", "dupfirst", object)
            register("norm", "rmsnorm", object)
        """,
    )
    eps = [
        _make_ep("good", "lf_good_plugin"),
        _make_ep("broken", "lf_module_that_does_not_exist"),
        _make_ep("dup", "lf_dup_plugin"),
    ]
    _fake_entry_points(monkeypatch, eps)


def test_broken_plugin_reported_builtins_keep_working(monkeypatch, good_and_bad_plugins):
    monkeypatch.delenv("LLAMAFORGE_PLUGINS", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = _fresh_state(monkeypatch)
    regs = state.registries
    assert "goodnorm" in regs.norm
    assert regs.norm.entry("rmsnorm").source.distribution == "llamaforge"
    # the duplicate plugin's partial registration was rolled back
    assert "dupfirst" not in regs.norm
    by_plugin = {f.plugin: f for f in state.failures}
    assert set(by_plugin) == {"broken", "dup"}
    assert "dist-broken" in by_plugin["broken"].message()
    assert "ModuleNotFoundError" in by_plugin["broken"].cause
    assert "registered twice" in by_plugin["dup"].cause
    assert any("dist-broken" in str(w.message) for w in caught)


def test_allowlist_restricts_external_plugins(monkeypatch, good_and_bad_plugins):
    monkeypatch.setenv("LLAMAFORGE_PLUGINS", "good")
    state = _fresh_state(monkeypatch)
    assert "goodnorm" in state.registries.norm
    assert state.failures == []
    monkeypatch.setenv("LLAMAFORGE_PLUGINS", "")
    state = _fresh_state(monkeypatch)
    assert "goodnorm" not in state.registries.norm
    assert "rmsnorm" in state.registries.norm  # built-ins always load


def test_runtime_register_decorator():
    import llamaforge
    from llamaforge.plugins.norms import RMSNorm

    @llamaforge.register("norm", "test_runtime_norm")
    class MyNorm(RMSNorm):
        """A runtime-registered norm."""

    try:
        assert registries().norm.get("test_runtime_norm") is MyNorm
        spec = llamaforge.load_spec("tiny").with_updates(norm="test_runtime_norm")
        assert isinstance(llamaforge.build_model(spec).model.layers[0].input_layernorm, MyNorm)
    finally:
        registries().norm.unregister("test_runtime_norm")


def test_hookimpl_marker_is_the_same_for_everyone():
    import llamaforge

    assert llamaforge.hookimpl is hookimpl
