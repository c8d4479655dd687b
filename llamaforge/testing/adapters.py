"""Contract check for the `adapter` kind: what every adapter (LoRA or a third party's) must guarantee.

from llamaforge.testing import check_component
check_component("adapter", "lora", params={"rank": 4, "targets": "q_proj,v_proj"})
"""

from __future__ import annotations

from typing import Any

import torch

from llamaforge.core.interfaces import Adapter, AdapterLayer
from llamaforge.testing.contracts import _factory, register_check

_SPEC = {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_positions": 32}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_adapter(
    component: Any,
    *,
    params: dict[str, Any] | None = None,
    spec: Any = None,
    merge: bool = True,
    atol: float = 1e-5,
) -> None:
    """Base names and values survive wrapping; a fresh adapter is the identity; only adapter parameters train;
    merged equals unmerged; disabling gives the base back; removal restores the base module and weights bitwise.
    Pass `merge=False` for adapters that cannot fold into the base weights."""
    from llamaforge.core import finetune as ft
    from llamaforge.core.model import build_model
    from llamaforge.core.spec import load_spec

    spec = load_spec(spec) if spec is not None else load_spec("tiny").with_updates(**_SPEC, tie_embeddings=False)
    model = build_model(spec, seed=0, dtype="float32").eval()
    classes = {n: type(m) for n, m in model.named_modules()}
    before = _state(model)
    ids = torch.randint(0, spec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = model(ids).logits

    adapter = _factory("adapter", component)(**(params or {}))
    assert isinstance(adapter, Adapter), f"adapter factory must return an Adapter, got {type(adapter).__name__}"
    model = adapter.add(model, "contract") or model
    layers = ft.adapter_layers(model)
    assert layers, "the adapter wrapped no module"
    assert all(isinstance(m, AdapterLayer) for m in layers.values())
    state = model.state_dict()
    missing = sorted(set(before) - set(state))
    assert not missing, f"wrapping renamed base tensors: {missing[:3]}"
    for key, value in before.items():
        assert torch.equal(state[key], value), f"wrapping changed base tensor {key}"
    added = set(state) - set(before)
    own = {id(p) for p in ft.adapter_parameters(model, "contract")}
    listed = {n for n, p in model.named_parameters() if id(p) in own}
    assert added == listed, f"state-dict entries {sorted(added ^ listed)[:3]} are not the adapter's listed parameters"
    assert len(ft.adapter_state_dict(model, "contract")) == len(added), "adapter_state_dict misses adapter tensors"
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids).logits, base_logits, atol=atol, rtol=atol, msg="fresh adapter is not identity"
        )

    params_ = ft.mark_only_adapter_trainable(model, "contract")
    model.train()
    model(ids, ids).loss.backward()
    adapter_ids = {id(p) for p in params_}
    for name, p in model.named_parameters():
        if id(p) in adapter_ids:
            assert p.grad is not None, f"adapter parameter {name} received no gradient"
        else:
            assert p.grad is None, f"frozen base parameter {name} received a gradient"
    model.eval().zero_grad(set_to_none=True)

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params_:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        adapted = model(ids).logits
    assert (adapted - base_logits).abs().max() > 1e-4, "changing the adapter parameters does not change outputs"
    with torch.no_grad(), ft.adapters_disabled(model):
        torch.testing.assert_close(model(ids).logits, base_logits, atol=atol, rtol=atol, msg="disabled != base")
    if merge:
        ft.merge_adapters(model)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, adapted, atol=1e-4, rtol=1e-4, msg="merged != unmerged")
        ft.unmerge_adapters(model)
        for key, value in before.items():
            assert torch.equal(model.state_dict()[key], value), f"unmerge did not restore {key} bitwise"

    ft.remove_adapter(model, "contract")
    after = model.state_dict()
    assert set(after) == set(before), "removal left adapter tensors behind"
    for key, value in before.items():
        assert torch.equal(after[key], value), f"removal did not restore {key} bitwise"
    changed = [n for n, m in model.named_modules() if classes.get(n) is not type(m)]
    assert not changed, f"removal left modules of another class: {changed[:3]}"


register_check("adapter", check_adapter)
