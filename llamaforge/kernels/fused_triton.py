"""The Triton sources of the fused decode kernels (`qkv_rope`, `gate_up`, `int8_mm`, `decode_attention`) and the
pieces they share. Importing this module imports Triton, so their modules import it only when a kernel is first
launched; the shared pieces are module-level `triton.jit` functions, which a kernel can only call when both live in
one module's globals (the interpreter resolves calls there, not in a closure)."""

import triton
import triton.language as tl


@triton.jit
def inv_rms_of(squares, k_len, eps):
    """1 / sqrt(mean(x ** 2) + eps) from the row's squares summed per lane (RMSNorm's statistics, fp32)."""
    return 1.0 / tl.sqrt(tl.sum(squares, axis=0) / k_len + eps)


@triton.jit
def row_inv_rms(x_ptr, k_len, eps, BLOCK_K: tl.constexpr):
    """RMSNorm's 1/rms of the row, in a loop of its own over it."""
    squares = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(0, k_len, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(x_ptr + k, mask=k < k_len, other=0.0).to(tl.float32)
        squares += h * h
    return inv_rms_of(squares, k_len, eps)


@triton.jit
def row_tile(x_ptr, g_ptr, out_ptr, k, k_ok, inv_rms, NORM: tl.constexpr):
    """The row's values at k, as a (1, BLOCK_K) fp32 tile to multiply the weight tiles by; with NORM, after RMSNorm
    with RMSNorm's roundings in out_ptr's dtype (the normalised row, then its product with the weight g). (Laying
    the row out as its 16-bit values and widening after, half the block barriers per int8 loop step in the sm_90
    code, was timed on an H200 and changed nothing: benchmarks/HISTORY.md, seventeenth session.)"""
    xv = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    if NORM:
        out_ty = out_ptr.dtype.element_ty
        g = tl.load(g_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        xv = ((xv * inv_rms).to(out_ty).to(tl.float32) * g).to(out_ty).to(tl.float32)
    return xv[None, :]


@triton.jit
def widen_int8(w):
    """int8 values as fp32 through the float's bits (as llamaforge.kernels.row_gemv): exact, and no I2F (a slow
    conversion) per value."""
    return (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def softmax_block(q, kt, vt, ok, m_i, l_i, acc, scale, DOT: tl.constexpr):
    """One block of keys/values folded into a one-query online softmax: q (R, D) (pre-scaled unless DOT), kt and vt
    (BLOCK, D), ok (BLOCK,) the allowed positions; returns the running max, sum and weighted values. With DOT the
    block products run on tensor cores (16-bit inputs, R >= 16)."""
    if DOT:
        s = (tl.dot(q, tl.trans(kt)) * scale).to(tl.float32)  # (R, BLOCK)
    else:
        s = tl.sum(q[:, None, :] * kt.to(tl.float32)[None, :, :], axis=2)
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing allowed yet: keep the sums at zero
    alpha = tl.exp(m_i - m_use)
    p = tl.exp(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if DOT:
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
    else:
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt.to(tl.float32)[None, :, :], axis=1)
    return m_new, l_i, acc


@triton.jit
def attend_positions(
    q, k_ptr, v_ptr, ok_ptr, start, end, sk_l, sv_l, m_i, l_i, acc, scale,
    BLOCK: tl.constexpr, D: tl.constexpr, DOT: tl.constexpr, MOD: tl.constexpr,
):  # fmt: skip
    """The online softmax over cache positions [start, end) of one key/value head (k_ptr / v_ptr at its position 0,
    ok_ptr its row's mask bytes), BLOCK at a time; MOD the loads' cache modifier (".cg": data other programs of the
    running launch wrote, read through L2)."""
    d = tl.arange(0, D)
    for l0 in range(start, end, BLOCK):
        offs = l0 + tl.arange(0, BLOCK)
        inside = offs < end
        rows = offs[:, None]
        # the three loads issued before any arithmetic, so their latencies overlap
        kt = tl.load(k_ptr + rows * sk_l + d[None, :], mask=inside[:, None], other=0.0, cache_modifier=MOD)
        vt = tl.load(v_ptr + rows * sv_l + d[None, :], mask=inside[:, None], other=0.0, cache_modifier=MOD)
        ok = tl.load(ok_ptr + offs, mask=inside, other=0) != 0
        m_i, l_i, acc = softmax_block(q, kt, vt, ok, m_i, l_i, acc, scale, DOT)
    return m_i, l_i, acc


@triton.jit
def attend_group(
    q_ptr, kc_ptr, vc_ptr, ok_ptr, n, o_ptr, grp, scale, kc_head, kc_pos, vc_head, vc_pos,
    REP: tl.constexpr, REP_P: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Softmax attention of the REP query heads of key/value head `grp` (one query row, batch 1) over the first `n`
    cache positions, those the mask allows; q and the cache's newest position were written by other programs of
    the running launch, so they are read through L2 (.cg), not this SM's L1."""
    r = tl.arange(0, REP_P)
    d = tl.arange(0, D)
    heads = grp * REP + r
    real = r < REP
    q = tl.load(q_ptr + heads[:, None] * D + d[None, :], mask=real[:, None], other=0.0, cache_modifier=".cg")
    if not DOT:
        q = q.to(tl.float32) * scale
    m_i = tl.full((REP_P,), float("-inf"), tl.float32)
    l_i = tl.zeros((REP_P,), tl.float32)
    acc = tl.zeros((REP_P, D), tl.float32)
    m_i, l_i, acc = attend_positions(q, kc_ptr + grp * kc_head, vc_ptr + grp * vc_head, ok_ptr, 0, n, kc_pos,
                                     vc_pos, m_i, l_i, acc, scale, BLOCK, D, DOT, ".cg")  # fmt: skip
    out = acc / l_i[:, None]
    tl.store(o_ptr + heads[:, None] * D + d[None, :], out.to(o_ptr.dtype.element_ty), mask=real[:, None])


@triton.jit(do_not_specialize=["progs_q", "progs_qk"])
def qkv_rope_kernel(
    x_ptr, wq_ptr, wk_ptr, wv_ptr, sq_ptr, sk_ptr, sv_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, pos_ptr,
    g_ptr, eps, k_len, swq, swk, swv, progs_q, progs_qk, kc_head, kc_pos, vc_head, vc_pos, cache_len,
    ok_ptr, ext_ptr, o_ptr, sync_ptr, scale,
    HALF: tl.constexpr, PAIRS: tl.constexpr, BLOCK_K: tl.constexpr, INT8: tl.constexpr, NORM: tl.constexpr,
    ONE_PASS: tl.constexpr, ATTN: tl.constexpr = False, REP: tl.constexpr = 1, REP_P: tl.constexpr = 1,
    BLOCK_L: tl.constexpr = 128, DOT: tl.constexpr = False,
):  # fmt: skip
    pid = tl.program_id(0)
    per_head = HALF // PAIRS
    grp = 0
    if ATTN:
        # group-major: each key/value head's programs (its REP query heads', then its k's and v's) are numbered
        # together, so early groups finish, and attend, while later ones still stream their weights
        per_group = (REP + 2) * per_head
        grp = pid // per_group
        slot = pid % per_group
        if slot < REP * per_head:
            w_ptr, s_ptr, stride, which = wq_ptr, sq_ptr, swq, 0
            head = grp * REP + slot // per_head
            jl = slot % per_head
        elif slot < (REP + 1) * per_head:
            w_ptr, s_ptr, stride, which, head, jl = wk_ptr, sk_ptr, swk, 1, grp, slot - REP * per_head
        else:
            w_ptr, s_ptr, stride, which, head, jl = wv_ptr, sv_ptr, swv, 2, grp, slot - (REP + 1) * per_head
    else:
        # the first progs_q programs serve q's rows, then k's, then v's; `which` says whose
        if pid < progs_q:
            w_ptr, s_ptr, stride, local, which = wq_ptr, sq_ptr, swq, pid, 0
        elif pid < progs_qk:
            w_ptr, s_ptr, stride, local, which = wk_ptr, sk_ptr, swk, pid - progs_q, 1
        else:
            w_ptr, s_ptr, stride, local, which = wv_ptr, sv_ptr, swv, pid - progs_qk, 2
        head = local // per_head
        jl = local % per_head
    j = jl * PAIRS + tl.arange(0, PAIRS)  # dimensions in the head's first half
    rows_a = head * 2 * HALF + j
    rows_b = rows_a + HALF  # their RoPE partners
    out_ty = q_ptr.dtype.element_ty
    # the small operands of the epilogue are loaded before the weights stream, so their latency overlaps it instead of
    # following it (each load after the loop is one more memory round trip on the kernel's critical path)
    ca = tl.load(cos_ptr + j).to(tl.float32)
    cb = tl.load(cos_ptr + HALF + j).to(tl.float32)
    sa = tl.load(sin_ptr + j).to(tl.float32)  # rotate-half's minus is folded into this half of sin
    sb = tl.load(sin_ptr + HALF + j).to(tl.float32)
    pos = tl.load(pos_ptr)
    if ATTN:  # written by an earlier launch: loaded now, off the attending program's critical path
        n_attend = tl.minimum(tl.load(ext_ptr).to(tl.int32), cache_len)
    if INT8:
        scale_a = tl.load(s_ptr + rows_a).to(tl.float32)
        scale_b = tl.load(s_ptr + rows_b).to(tl.float32)
    else:
        scale_a = 1.0
        scale_b = 1.0
    if NORM and not ONE_PASS:  # every program takes the row's statistics itself (a few KB, from L2): no norm kernel
        inv_rms = row_inv_rms(x_ptr, k_len, eps, BLOCK_K)
    else:
        inv_rms = 1.0
    squares = tl.zeros((BLOCK_K,), tl.float32)
    acc_a = tl.zeros((PAIRS, BLOCK_K), tl.float32)
    acc_b = tl.zeros((PAIRS, BLOCK_K), tl.float32)
    for k0 in range(0, k_len, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_len
        # The weight tiles' loads go out before the row's tile is read and prepared. Written after it, sm_90 code
        # issued them only once the row tile had arrived and passed the barriers that lay it out for every row: two
        # memory round trips per loop step instead of one. H200, int8 1B step (2026-12-03, three processes each):
        # this kernel 132-134 us per step against 145, the gate/up kernel 226-228 against 246-247; bf16 unchanged
        wa = tl.load(w_ptr + rows_a[:, None] * stride + k[None, :], mask=k_ok[None, :], other=0)
        wb = tl.load(w_ptr + rows_b[:, None] * stride + k[None, :], mask=k_ok[None, :], other=0)
        if ONE_PASS:  # the statistics gathered alongside the products, 1/rms applied to the sums at the end
            raw = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            squares += raw * raw
            xv = (raw * tl.load(g_ptr + k, mask=k_ok, other=0.0).to(tl.float32))[None, :]
        else:
            xv = row_tile(x_ptr, g_ptr, q_ptr, k, k_ok, inv_rms, NORM)
        if INT8:
            acc_a += widen_int8(wa) * xv
            acc_b += widen_int8(wb) * xv
        else:
            acc_a += wa.to(tl.float32) * xv
            acc_b += wb.to(tl.float32) * xv
    ya = tl.sum(acc_a, axis=1)
    yb = tl.sum(acc_b, axis=1)
    if ONE_PASS:
        inv_rms = inv_rms_of(squares, k_len, eps)
        ya = ya * inv_rms
        yb = yb * inv_rms
    ya = ya.to(out_ty).to(tl.float32)  # rounded like the linear's output
    yb = yb.to(out_ty).to(tl.float32)
    if INT8:  # times the rows' scales, rounded again (int8_weight_only_linear)
        ya = (ya * scale_a).to(out_ty).to(tl.float32)
        yb = (yb * scale_b).to(out_ty).to(tl.float32)
    if which < 2:
        oa = ya * ca + yb * sa
        ob = yb * cb + ya * sb
    else:
        oa = ya
        ob = yb
    if which == 0:
        tl.store(q_ptr + rows_a, oa.to(out_ty))
        tl.store(q_ptr + rows_b, ob.to(out_ty))
    else:
        if which == 1:
            base = kc_ptr + head * kc_head + pos * kc_pos
        else:
            base = vc_ptr + head * vc_head + pos * vc_pos
        inside = (j * 0 + pos) < cache_len  # a position past the cache writes nothing (no stray store to memory)
        tl.store(base + j, oa.to(out_ty), mask=inside)
        tl.store(base + HALF + j, ob.to(out_ty), mask=inside)
    if ATTN:
        # The last program of a key/value head's group to finish attends for the group, in this launch: the
        # barrier orders every thread's stores before the counter's release, the counter's acquire orders the
        # attending program's reads after the other programs' stores. It leaves the counter at zero.
        tl.debug_barrier()
        done = tl.atomic_add(sync_ptr + grp, 1, sem="acq_rel", scope="gpu")
        if done == (REP + 2) * per_head - 1:
            attend_group(q_ptr, kc_ptr, vc_ptr, ok_ptr, n_attend, o_ptr, grp, scale, kc_head, kc_pos, vc_head,
                         vc_pos, REP, REP_P, 2 * HALF, BLOCK_L, DOT)  # fmt: skip
            tl.atomic_xchg(sync_ptr + grp, 0, sem="relaxed", scope="gpu")


@triton.jit
def gate_up_kernel(
    x_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, g_ptr, out_ptr, eps, n_rows, k_len, swg, swu,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INT8: tl.constexpr, NORM: tl.constexpr,
):  # fmt: skip
    out_ty = out_ptr.dtype.element_ty
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_rows
    if NORM:  # every program takes the row's statistics itself (a few KB, read from L2): no norm kernel
        inv_rms = row_inv_rms(x_ptr, k_len, eps, BLOCK_K)
    else:
        inv_rms = 1.0
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, k_len, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_len
        ok = n_ok[:, None] & k_ok[None, :]
        # the weight tiles' loads go out before the row's tile is prepared (see qkv_rope_kernel)
        wg = tl.load(wg_ptr + n[:, None] * swg + k[None, :], mask=ok, other=0)
        wu = tl.load(wu_ptr + n[:, None] * swu + k[None, :], mask=ok, other=0)
        xv = row_tile(x_ptr, g_ptr, out_ptr, k, k_ok, inv_rms, NORM)
        if INT8:
            acc_g += widen_int8(wg) * xv
            acc_u += widen_int8(wu) * xv
        else:
            acc_g += wg.to(tl.float32) * xv
            acc_u += wu.to(tl.float32) * xv
    gate = tl.sum(acc_g, axis=1).to(out_ty).to(tl.float32)  # rounded like each linear's output
    up = tl.sum(acc_u, axis=1).to(out_ty).to(tl.float32)
    if INT8:  # times the rows' scales, rounded again (int8_weight_only_linear)
        gate = (gate * tl.load(sg_ptr + n, mask=n_ok, other=0.0).to(tl.float32)).to(out_ty).to(tl.float32)
        up = (up * tl.load(su_ptr + n, mask=n_ok, other=0.0).to(tl.float32)).to(out_ty).to(tl.float32)
    tl.store(out_ptr + n, (gate * tl.sigmoid(gate) * up).to(out_ty), mask=n_ok)


@triton.jit(do_not_specialize=["m"])
def int8_mm_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, m, n, k_len, sx, sw, sy,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y = (x @ w.T rounded to y's dtype) * scale, rounded again: x (m, K) in y's dtype, w (n, K) int8 read once
    (llamaforge.kernels.int8_mm)."""
    out_ty = y_ptr.dtype.element_ty
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = rn < n
    m_ok = rm < m
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, k_len, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_len
        xt = tl.load(x_ptr + rm[:, None] * sx + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + rn[:, None] * sw + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        acc = tl.dot(xt, tl.trans(wt.to(out_ty)), acc)
    scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    y = (acc.to(out_ty).to(tl.float32) * scale[None, :]).to(out_ty)
    tl.store(y_ptr + rm[:, None] * sy + rn[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


# `length` stays a runtime integer: a cache of one position would otherwise become a constant of another type than
# the extent it is compared with
@triton.jit(do_not_specialize=["length"])
def decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, ok_ptr, ext_ptr, m_ptr, l_ptr, acc_ptr, o_ptr,
    scale, length,
    sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sok_b, so_b, so_h,
    KV_HEADS: tl.constexpr, REP: tl.constexpr, REP_P: tl.constexpr, D: tl.constexpr,
    BLOCK: tl.constexpr, SPLITS: tl.constexpr, EXTENT: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """One split of the cache for one (row, kv head) (llamaforge.kernels.decode_attention): the output directly with
    one split, else the split's softmax statistics for decode_attention_combine_kernel."""
    pid = tl.program_id(0)  # batch row x kv head
    split = tl.program_id(1)
    b = pid // KV_HEADS
    g = pid % KV_HEADS
    r = tl.arange(0, REP_P)
    d = tl.arange(0, D)
    heads = g * REP + r
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=(r < REP)[:, None], other=0.0)
    if not DOT:
        q = (q.to(tl.float32) * scale).to(tl.float32)  # scale may arrive as fp64 (inductor): keep fp32
    n = length + 0 * pid  # a tensor in both branches
    if EXTENT:
        n = tl.minimum(tl.load(ext_ptr + b).to(tl.int32), length)
    chunk = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK) * BLOCK
    start = split * chunk
    end = tl.minimum(start + chunk, n)
    m_i = tl.full((REP_P,), float("-inf"), tl.float32)
    l_i = tl.zeros((REP_P,), tl.float32)
    acc = tl.zeros((REP_P, D), tl.float32)
    m_i, l_i, acc = attend_positions(q, k_ptr + b * sk_b + g * sk_h, v_ptr + b * sv_b + g * sv_h, ok_ptr + b * sok_b,
                                     start, end, sk_l, sv_l, m_i, l_i, acc, scale, BLOCK, D, DOT, "")  # fmt: skip
    if SPLITS == 1:  # the whole length in one program: normalise and write the output directly
        out = acc / l_i[:, None]
        dst = o_ptr + b * so_b + heads[:, None] * so_h + d[None, :]
        tl.store(dst, out.to(o_ptr.dtype.element_ty), mask=(r < REP)[:, None])
    else:
        row = (pid * SPLITS + split) * REP_P + r
        tl.store(m_ptr + row, m_i)
        tl.store(l_ptr + row, l_i)
        tl.store(acc_ptr + row[:, None] * D + d[None, :], acc)


@triton.jit
def decode_attention_combine_kernel(
    m_ptr, l_ptr, acc_ptr, o_ptr, so_b, so_h,
    KV_HEADS: tl.constexpr, REP: tl.constexpr, REP_P: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    """The splits' statistics of one (row, kv head) combined into its query heads' outputs."""
    pid = tl.program_id(0)
    b = pid // KV_HEADS
    g = pid % KV_HEADS
    s = tl.arange(0, SPLITS)
    r = tl.arange(0, REP_P)
    d = tl.arange(0, D)
    row = (pid * SPLITS + s)[:, None] * REP_P + r[None, :]  # (SPLITS, REP_P)
    m = tl.load(m_ptr + row)
    total_l = tl.load(l_ptr + row)
    acc = tl.load(acc_ptr + row[:, :, None] * D + d[None, None, :])  # (SPLITS, REP_P, D)
    top = tl.max(m, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(m - top[None, :])  # a split that allowed nothing weighs 0
    total = tl.sum(total_l * w, axis=0)
    out = tl.sum(acc * w[:, :, None], axis=0) / total[:, None]
    heads = g * REP + r
    dst = o_ptr + b * so_b + heads[:, None] * so_h + d[None, :]
    tl.store(dst, out.to(o_ptr.dtype.element_ty), mask=(r < REP)[:, None])


@triton.jit
def residual_gemv_kernel(
    x_ptr, w_ptr, s_ptr, r_ptr, out_ptr, n_rows, k_len, sw,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INT8: tl.constexpr,
):  # fmt: skip
    """out = residual + x @ w.T for one row (llamaforge.kernels.residual_gemv): BLOCK_N rows of w per program, the
    linear's roundings (int8: times the rows' scales, rounded again), then the residual added and rounded once."""
    out_ty = out_ptr.dtype.element_ty
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_rows
    residual = tl.load(r_ptr + n, mask=n_ok, other=0.0).to(tl.float32)  # its latency overlaps the streaming
    if INT8:
        scale = tl.load(s_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, k_len, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_len
        w = tl.load(w_ptr + n[:, None] * sw + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        xv = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        if INT8:
            acc += widen_int8(w) * xv
        else:
            acc += w.to(tl.float32) * xv
    y = tl.sum(acc, axis=1).to(out_ty).to(tl.float32)  # rounded like the linear's output
    if INT8:
        y = (y * scale).to(out_ty).to(tl.float32)
    tl.store(out_ptr + n, (residual + y).to(out_ty), mask=n_ok)
