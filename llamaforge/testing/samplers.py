"""Contract check for the `sampler` kind: what every stage of a generation pipeline must do.

from llamaforge.testing import check_component
check_component("sampler", "my_sampler", params={"strength": 0.5})
"""

from __future__ import annotations

from typing import Any

import torch

from llamaforge.testing.contracts import _factory, register_check


def _stage(component: Any, params: dict | None) -> Any:
    if isinstance(component, str):
        from llamaforge.registry.manager import lookup

        entry = lookup("sampler", component)
        return entry.factory(**entry.validate_params(params or {}))
    return _factory("sampler", component)(**(params or {}))


def check_sampler(component: Any, *, params: dict | None = None, vocab: int = 37) -> None:
    """Shape/dtype preserving, pure, row-independent, ignores padded context (-1), leaves a token to pick, and
    (for choosers) argmax of the output is the token it means; a `plain_argmax` stage returns its logits as they
    are, since the compiled greedy decode step relies on that and never calls it."""
    stage = _stage(component, params)
    assert callable(stage), f"sampler factory must return a callable stage, got {type(stage).__name__}"
    assert isinstance(getattr(stage, "chooses", False), bool), "sampler.chooses must be a bool"
    plain = getattr(stage, "plain_argmax", False)
    assert isinstance(plain, bool), "sampler.plain_argmax must be a bool"
    assert not plain or stage.chooses, "plain_argmax=True is only meaningful for a stage with chooses=True"
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(4, vocab, generator=g) * 3
    context = torch.randint(0, vocab, (4, 6), generator=g)
    before = logits.clone()
    out = stage(logits, context)
    assert isinstance(out, torch.Tensor), "a sampler stage returns a tensor of logits"
    assert out.shape == logits.shape, f"sampler changed shape {tuple(logits.shape)} -> {tuple(out.shape)}"
    assert out.dtype == logits.dtype, f"sampler changed dtype {logits.dtype} -> {out.dtype}"
    assert torch.equal(logits, before), "sampler modified its input logits in place"
    assert not torch.isnan(out).any(), "sampler produced NaN"
    assert (out > float("-inf")).any(-1).all(), "sampler masked every token of a row; nothing is left to pick"
    torch.testing.assert_close(stage(logits, context), out, msg="sampler is not deterministic for the same input")
    rows = torch.cat([stage(logits[i : i + 1], context[i : i + 1]) for i in range(logits.size(0))])
    torch.testing.assert_close(rows, out, msg="sampler output for a row depends on the other rows of the batch")
    padded = torch.cat([torch.full((4, 3), -1, dtype=context.dtype), context, torch.full((4, 2), -1)], dim=1)
    torch.testing.assert_close(stage(logits, padded), out, msg="negative context ids mark padding and must be ignored")
    if plain:  # the compiled greedy step skips the stage and takes the argmax: the stage must not change it
        torch.testing.assert_close(out, logits, msg="a plain_argmax stage must return the logits unchanged")
    empty = stage(logits, context[:, :0])
    assert empty.shape == logits.shape, "sampler must accept an empty context (B, 0)"
    # Large or tiny logits (bf16 models, fp32 pipeline) must not overflow into NaN.
    extreme = torch.cat([logits * 1e4, logits * 1e-6])
    assert not torch.isnan(stage(extreme, torch.cat([context, context]))).any(), "sampler NaN on extreme logits"


register_check("sampler", check_sampler)
