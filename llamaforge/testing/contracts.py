"""Contract checks, one per interface kind. Each raises AssertionError with a message saying what broke."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llamaforge.core.interfaces import Activation, Attention, AttentionMask, Norm, PositionEmbedding
from llamaforge.core.spec import ComponentSpec, ModelSpec, load_spec


def _factory(kind: str, component: Any) -> Any:
    if isinstance(component, str):
        from llamaforge.registry.manager import lookup

        return lookup(kind, component).factory
    return component


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_norm(component: Any, *, dim: int = 32, eps: float = 1e-5, params: dict | None = None) -> None:
    """Keeps shape and dtype, gives finite outputs, and is scale-invariant when it claims to be."""
    norm = _factory("norm", component)(dim=dim, eps=eps, **(params or {}))
    assert isinstance(norm, nn.Module), f"norm factory must return an nn.Module, got {type(norm).__name__}"
    x = torch.randn(3, 5, dim, generator=_gen(0))
    for dtype in (torch.float32, torch.bfloat16):
        y = norm.to(dtype)(x.to(dtype))
        assert y.shape == x.shape, f"norm changed shape {tuple(x.shape)} -> {tuple(y.shape)}"
        assert y.dtype == dtype, f"norm changed dtype {dtype} -> {y.dtype}"
        assert torch.isfinite(y).all(), "norm produced non-finite values"
    norm = norm.float()
    if getattr(norm, "scale_invariant", False) or (isinstance(norm, Norm) and norm.scale_invariant):
        torch.testing.assert_close(norm(x * 7.5), norm(x), atol=1e-4, rtol=1e-4, msg="claims scale invariance, isn't")


def check_activation(component: Any, *, params: dict | None = None) -> None:
    """Elementwise (commutes with permutations), shape/dtype preserving, `gated` is a bool, differentiable."""
    act = _factory("activation", component)(**(params or {}))
    assert isinstance(act, nn.Module), "activation factory must return an nn.Module"
    assert isinstance(getattr(act, "gated", False), bool), "activation.gated must be a bool"
    x = torch.randn(4, 7, 16, generator=_gen(1), requires_grad=True)
    y = act(x)
    assert y.shape == x.shape and y.dtype == x.dtype, "activation must keep shape and dtype"
    perm = torch.randperm(16, generator=_gen(2))
    torch.testing.assert_close(act(x[..., perm]), y[..., perm], msg="activation is not elementwise")
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all(), "activation gradient missing or non-finite"
    if isinstance(act, Activation):
        assert act.gated in (True, False)


def check_attention_kernel(kernel: Any, *, atol: float = 1e-5) -> None:
    """Matches the eager reference for causal, masked and grouped-query inputs."""
    from llamaforge.plugins.attention import eager

    kernel = _factory("attention_kernel", kernel)
    g = _gen(3)
    for heads, kv_heads, t in ((4, 4, 9), (4, 2, 9), (6, 1, 1), (2, 1, 5)):
        q = torch.randn(2, heads, t, 8, generator=g)
        k = torch.randn(2, kv_heads, t, 8, generator=g)
        v = torch.randn(2, kv_heads, t, 8, generator=g)
        causal = AttentionMask(causal=True)
        torch.testing.assert_close(
            kernel(q, k, v, mask=causal),
            eager(q, k, v, mask=causal),
            atol=atol,
            rtol=1e-4,
            msg=f"causal attention differs from eager (heads={heads}, kv={kv_heads}, t={t})",
        )
        explicit = torch.rand(2, 1, t, t, generator=g) > 0.3
        explicit |= torch.eye(t, dtype=torch.bool)
        m = AttentionMask(causal=False, mask=explicit)
        torch.testing.assert_close(
            kernel(q, k, v, mask=m),
            eager(q, k, v, mask=m),
            atol=atol,
            rtol=1e-4,
            msg="masked attention differs from eager",
        )


def check_position_embedding(component: Any, *, head_dim: int = 16, params: dict | None = None) -> None:
    """apply() keeps shapes and dtypes of q and k; the same positions always give the same result."""
    pe = _factory("position_embedding", component)(
        head_dim=head_dim, max_positions=64, theta=10000.0, scaling=None, **(params or {})
    )
    assert isinstance(pe, PositionEmbedding), "position embedding must subclass PositionEmbedding"
    pos = torch.arange(10).unsqueeze(0).expand(2, -1)
    state = pe(pos, torch.float32)
    q = torch.randn(2, 4, 10, head_dim, generator=_gen(4))
    k = torch.randn(2, 2, 10, head_dim, generator=_gen(5))
    q2, k2 = pe.apply(q, k, state)
    assert q2.shape == q.shape and k2.shape == k.shape, "position embedding changed q/k shapes"
    q3, k3 = pe.apply(q, k, pe(pos, torch.float32))
    torch.testing.assert_close(q2, q3)
    torch.testing.assert_close(k2, k3)


def _tiny_spec(**overrides: Any) -> ModelSpec:
    base: dict[str, Any] = dict(
        vocab_size=64,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=48,
        max_positions=64,
        rope_theta=10000.0,
    )
    base.update(overrides)
    return ModelSpec.parse(base)


def check_attention(component: Any, *, params: dict | None = None, kernel: str = "sdpa") -> None:
    """Causal, batch-independent, keeps state-dict keys across kernels, and agrees with its own KV cache."""
    name = component if isinstance(component, str) else f"py:{component.__module__}:{component.__qualname__}"
    spec = _tiny_spec(attention=ComponentSpec(name=name, params=params or {}), attention_kernel=kernel)
    check_model(spec)
    model = _build(spec)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn, Attention), "attention factory must return an Attention subclass"
    other = _build(spec.with_updates(attention_kernel="eager" if kernel != "eager" else "sdpa"))
    assert set(model.state_dict()) == set(other.state_dict()), "changing the kernel changed state-dict keys"
    other.load_state_dict(model.state_dict())
    ids = torch.randint(0, spec.vocab_size, (2, 12), generator=_gen(6))
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids).logits, other(ids).logits, atol=1e-4, rtol=1e-4, msg="sdpa and eager kernels disagree"
        )
        full = model(ids).logits
        cache = model.new_cache(2, 16)
        step = [model(ids[:, :5], cache=cache, cache_position=torch.arange(5)).logits]
        for t in range(5, 12):
            step.append(model(ids[:, t : t + 1], cache=cache, cache_position=torch.tensor([t])).logits)
        torch.testing.assert_close(
            torch.cat(step, 1),
            full,
            atol=1e-4,
            rtol=1e-4,
            msg="incremental decoding with the KV cache differs from a full forward",
        )
    if getattr(attn, "accepts_prenorm", False):  # handed the un-normed input and the norm, it must apply the norm
        _check_prenorm(model, spec)
    if getattr(attn, "accepts_residual", False):  # handed the block's input, it must add it to its output
        _check_residual(model, spec)


def _cache_call_args(positions: Any, dtype: torch.dtype) -> tuple[dict, dict, dict]:
    """An attention module's keyword arguments for three calls over an 8-position cache: the first five positions
    (filling it), all six in one causal pass, and the sixth alone as a one-token step over the cache."""
    first = {"position_state": positions(torch.arange(5)[None], dtype), "mask": AttentionMask(),
             "cache_position": torch.arange(5)}  # fmt: skip
    full = {"position_state": positions(torch.arange(6)[None], dtype), "mask": AttentionMask(),
            "cache_position": torch.arange(6)}  # fmt: skip
    step = {"position_state": positions(torch.tensor([[5]]), dtype), "cache_position": torch.tensor([5]),
            "mask": AttentionMask(causal=False, mask=torch.arange(8)[None, None, None, :] <= 5)}  # fmt: skip
    return first, full, step


def _check_residual(model: nn.Module, spec: ModelSpec) -> None:
    """An attention module that declares `accepts_residual` gives, from (x, residual=r), r + what it gives from x, on
    a full forward and on a one-token step over the cache."""
    attn, positions = model.model.layers[0].self_attn, model.model.rotary_emb
    x = torch.randn(1, 6, spec.dim, generator=_gen(9))
    r = torch.randn(1, 6, spec.dim, generator=_gen(10))
    first, full, step = _cache_call_args(positions, x.dtype)
    with torch.no_grad():
        for rows, args in ((slice(0, 6), full), (slice(5, 6), step)):
            out = []
            for extra in ({}, {"residual": r[:, rows]}):
                cache = model.new_cache(1, 8)
                attn(x[:, :5], positions=positions, cache=cache, **first)  # the cache holds the first five
                out.append(attn(x[:, rows], positions=positions, cache=cache, **args, **extra))
            torch.testing.assert_close(out[1], r[:, rows] + out[0], atol=1e-5, rtol=1e-5,
                                       msg="forward(x, residual=r) differs from r + forward(x)")  # fmt: skip


def _check_prenorm(model: nn.Module, spec: ModelSpec) -> None:
    """An attention module that declares `accepts_prenorm` gives, from (x, prenorm=norm), what it gives from norm(x),
    on a full forward and on a one-token step over the cache (both writing the same cache rows)."""
    block = model.model.layers[0]
    attn, norm, positions = block.self_attn, block.input_layernorm, model.model.rotary_emb
    x = torch.randn(1, 6, spec.dim, generator=_gen(8))
    first, full, step = _cache_call_args(positions, x.dtype)
    with torch.no_grad():
        for rows, args in ((slice(0, 6), full), (slice(5, 6), step)):
            out = []
            for prenorm in (False, True):
                cache = model.new_cache(1, 8)
                attn(norm(x[:, :5]), positions=positions, cache=cache, **first)  # the cache holds the first five
                inp = x[:, rows] if prenorm else norm(x[:, rows])
                extra = {"prenorm": norm} if prenorm else {}
                out.append((attn(inp, positions=positions, cache=cache, **args, **extra), cache.keys[0].clone()))
            torch.testing.assert_close(out[1][0], out[0][0], atol=1e-5, rtol=1e-5,
                                       msg="forward(x, prenorm=norm) differs from forward(norm(x))")  # fmt: skip
            torch.testing.assert_close(out[1][1], out[0][1], atol=1e-5, rtol=1e-5, msg="prenorm changed the cache")


def check_head(component: Any, *, params: dict | None = None) -> None:
    """(B, T, dim) -> (B, T, vocab) and gradients reach the hidden states."""
    emb = nn.Embedding(50, 16)
    head = _factory("head", component)(dim=16, vocab_size=50, embedding=emb, tie=False, **(params or {}))
    h = torch.randn(2, 3, 16, requires_grad=True)
    out = head(h)
    assert out.shape == (2, 3, 50), f"head output shape {tuple(out.shape)}, expected (2, 3, 50)"
    out.sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


def _build(spec: ModelSpec) -> nn.Module:
    from llamaforge.core.model import build_model

    return build_model(spec, seed=0).eval()


def check_model(spec: ModelSpec | str | dict, *, seq: int = 10, atol: float = 1e-4) -> None:
    """Output shapes, causality, batch independence, and a finite loss with gradients for every parameter."""
    spec = load_spec(spec)
    model = _build(spec)
    seq = min(seq, spec.max_positions)
    g = _gen(7)
    ids = torch.randint(0, spec.vocab_size, (3, seq), generator=g)
    with torch.no_grad():
        logits = model(ids).logits
        assert logits.shape == (3, seq, spec.vocab_size), f"logits shape {tuple(logits.shape)}"
        assert torch.isfinite(logits).all(), "non-finite logits"
        t = seq // 2
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % spec.vocab_size
        torch.testing.assert_close(
            model(changed).logits[:, :t],
            logits[:, :t],
            atol=atol,
            rtol=atol,
            msg=f"changing token {t} changed earlier logits: not causal",
        )
        for row in range(3):
            torch.testing.assert_close(
                model(ids[row : row + 1]).logits[0],
                logits[row],
                atol=atol,
                rtol=atol,
                msg="batch rows are not independent",
            )
    model.train()
    out = model(ids, ids)
    assert out.loss is not None and torch.isfinite(out.loss), "loss is not finite"
    out.loss.backward()
    if spec.dropout == 0:
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"parameters receive no gradient: {missing[:5]}"


_CHECKS = {
    "norm": check_norm,
    "activation": check_activation,
    "attention": check_attention,
    "attention_kernel": check_attention_kernel,
    "position_embedding": check_position_embedding,
    "head": check_head,
}


def check_component(kind: str, component: Any, **kwargs: Any) -> None:
    """Run the contract check for `kind` on a registered name or a factory."""
    _load_check_modules()
    try:
        check = _CHECKS[kind]
    except KeyError:
        raise ValueError(f"no contract check for kind {kind!r}; kinds with checks: {sorted(_CHECKS)}") from None
    check(component, **kwargs)


def _load_check_modules() -> None:
    """Import the other modules of llamaforge.testing: each registers checks for its kinds (samplers, ...)."""
    import importlib
    import pkgutil

    import llamaforge.testing as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("contracts", "strategies") and not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")


def register_check(kind: str, check: Any) -> None:
    """Let other modules (samplers, quantizers, adapters) add the contract check for their kind."""
    _CHECKS[kind] = check
