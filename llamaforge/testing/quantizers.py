"""Contract check for the `quantizer` kind: what every quantizer, built-in or third-party, must do.

from llamaforge.testing import check_component
check_component("quantizer", "my_quantizer", params={"bits": 6})
"""

from __future__ import annotations

import copy
import tempfile
import uuid
from typing import Any

import torch

from llamaforge.testing.contracts import _factory, _tiny_spec, register_check


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed_prefixes(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """Module names whose tensors were added, removed or changed."""
    changed = set()
    for key in set(before) | set(after):
        a, b = before.get(key), after.get(key)
        if a is None or b is None or a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            changed.add(key.rpartition(".")[0])
    return changed


def check_quantizer(
    component: Any, *, params: dict | None = None, max_relative_error: float = 0.5, tie_embeddings: bool = True
) -> None:
    """On a small random model: quantizes something, keeps logits finite and near the original (relative RMS
    error below `max_relative_error`), honours include/exclude patterns, and round-trips through save/load with
    identical outputs (the quantized state dict is plain tensors that `load_model` reloads)."""
    import llamaforge as lf
    from llamaforge.core.loading import apply_transform, load_model, save_model
    from llamaforge.registry import registries

    params = dict(params or {})
    name = component if isinstance(component, str) else None
    factory = _factory("quantizer", component)
    spec = _tiny_spec(tie_embeddings=tie_embeddings, vocab_size=96, dim=64, ffn_hidden=128)
    base = lf.build_model(spec, seed=0).eval()
    ids = torch.randint(0, spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids).logits

    quantizer = factory(**params)
    assert callable(getattr(quantizer, "apply", None)), "a quantizer must have apply(model) (see core Quantizer)"
    assert callable(getattr(quantizer, "quantize", None)), "a quantizer must have quantize(model, include, exclude)"
    before = _state(base)
    model = quantizer.apply(copy.deepcopy(base))
    assert isinstance(model, torch.nn.Module), f"apply must return the model, got {type(model).__name__}"
    assert _changed_prefixes(before, _state(model)), "the quantizer changed nothing in the model"
    with torch.no_grad():
        out = model(ids).logits
    assert out.shape == ref.shape, f"quantized logits have shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "quantized model produced non-finite logits"
    rel = float((out.float() - ref).norm() / ref.norm())
    assert rel < max_relative_error, f"quantized logits are too far from the original (relative error {rel:.3f})"

    # patterns: exclude everything -> nothing changes; include one block -> nothing outside it changes
    untouched = factory(**params).quantize(copy.deepcopy(base), None, ["*"])
    assert not _changed_prefixes(before, _state(untouched)), "exclude=['*'] must leave the model unchanged"
    only = factory(**params).quantize(copy.deepcopy(base), ["model.layers.0.*"], None)
    outside = {p for p in _changed_prefixes(before, _state(only)) if not p.startswith("model.layers.0.")}
    assert not outside, f"include=['model.layers.0.*'] also changed {sorted(outside)}"

    # save / load round trip through the registry, the same path `llamaforge quantize` and load_model take
    reg = registries().quantizer
    temp_name = None
    if name is None:
        temp_name = f"_contract_{uuid.uuid4().hex[:8]}"
        reg.register(temp_name, factory)
    try:
        q = apply_transform(copy.deepcopy(base), "quantizer", name or temp_name, **params)
        with torch.no_grad():
            expected = q(ids).logits
        with tempfile.TemporaryDirectory() as tmp:
            save_model(q, tmp)
            loaded = load_model(tmp)
            with torch.no_grad():
                got = loaded(ids).logits
        assert torch.equal(got, expected), "a saved and reloaded quantized model gives different logits"
    finally:
        if temp_name is not None:
            reg.unregister(temp_name)


register_check("quantizer", check_quantizer)
