"""Mixture-of-experts kernels in Triton: the routing metadata, the grouped GEMM, and the routed experts fused.

Routing. Each of T tokens picks k experts, ``expert_ids`` (T, k). The T*k assignments, flattened row-major (token
t's j-th choice is assignment a = t*k + j), are put in expert order, stably (one expert's assignments keep token
order):
    counts[e] = #{a : ids[a] == e}
    offs[e]   = counts[0] + ... + counts[e]        (inclusive ends: torch._grouped_mm's offsets; offs[-1] = T*k)
    slot[a]   = offs[e] - counts[e] + #{a' < a : ids[a'] == e},   e = ids[a]   (the sorted row assignment a takes)
    order[slot[a]] = a                             (the inverse: the assignment at each sorted row)
Two kernels, no atomics, so the order never depends on timing: one program per expert counts its assignments in a
scan over all of them (``_moe_count``), then one program per expert writes the slots of its own assignments, a running
prefix count over the same scan (``_moe_slots``; its start is the sum of the counts of the experts before it).

Grouped GEMM, torch._grouped_mm(mat_a, mat_b, offs=...)'s semantics: a (M, K) with its rows sorted by group,
b (G, K, N), offs (G,) int32 inclusive ends with offs[-1] == M:
    out[r] = a[r] @ b[g]                                  for offs[g-1] <= r < offs[g]   (offs[-1 - 1] := 0)
    da[r]  = dout[r] @ b[g]^T
    db[g]  = sum of a[r]^T dout[r] over the rows r of group g     (zero for an empty group)
Forward saves a, b and offs. The forward and da are one kernel (``_gmm``; da reads b transposed through its
strides). Its programs own BLOCK_M-row tiles that never cross a group: group g has cdiv(count_g, BLOCK_M) tiles,
and a program finds its tile's group from a prefix sum of the tile counts, computed from the offsets it loads.
No host sync: the grid is the upper bound cdiv(M, BLOCK_M) + G on the tiles, and the programs past the last tile
return at once. db (``_gmm_db``): one program per (group, K tile, N tile) sums its group's rows BLOCK_M at a time,
in order, so it is deterministic. Products accumulate in fp32; fp32 inputs multiply in IEEE fp32 (no TF32);
16-bit tiles go to tl.dot as they are (tensor cores), except under Triton's interpreter, whose 16-bit tl.dot is
wrong: there they are widened to fp32 first (``UPCAST``).

Experts, fused (``moe_experts``). x (T, H), ids and weights (T, k), SwiGLU experts w1, w3 (E, I, H), w2 (E, H, I)
(Linear layout). With the routing above, sorted row r is assignment order[r], of token t_r = order[r] // k, expert
g, weight w_r:
    gate_r = x[t_r] w1[g]^T,  up_r = x[t_r] w3[g]^T,  h_r = silu(gate_r) * up_r,  y_r = w_r * (h_r w2[g]^T)
    out[t] = sum over j of y[slot[t*k + j]]          (each token's k rows added in choice order: no atomics)
Three kernels make the forward: ``_gmm_swiglu`` reads each token row where it lies (``GATHER``: no copy of x in
expert order, T*k*H elements never written) through w1 and w3 at once (one load of the row tile for both) and
writes gate, up and h from its two accumulators; ``_gmm`` multiplies h by w2 and the routing weight (``SCALED``,
on the fp32 accumulator). The backward, with p_r = dout[t_r] w2[g] (``_gmm`` gathering dout's rows):
    d w_r  = <p_r, h_r>,   d h_r = w_r p_r  -> d gate_r, d up_r     (``_swiglu_weighted_bwd``, one row a program)
    dx[t]  = sum over j of (d gate w1[g] + d up w3[g])[slot[t*k + j]]   (``_gmm`` with ``DUAL``: both products,
                                                                         one tile, one write)
    dw1[g] = sum of x[t_r]^T d gate_r,  dw3[g] likewise,  dw2[g] = sum of (w_r h_r)^T dout[t_r]   (``_gmm_db``,
                                                                         gathering x's or dout's rows)
Saved for the backward, per assignment: gate and up (2 I elements), where the unfused ops keep x in expert order,
gate, up, h and the experts' outputs (2 H + 3 I): 4.2 times less at Qwen3-30B-A3B's shape (H 2048, I 768).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evo.kernels.triton_utils import OpaqueOp, interpreting

SCAN_BLOCK = 1024  # assignments per step of the routing scans


# grid: (experts,); program e counts the assignments to expert e
@triton.jit
def _moe_count(IDS, COUNTS, n, SCAN_BLOCK: tl.constexpr):
    e = tl.program_id(0)
    total = tl.zeros((), tl.int32)
    for start in range(0, n, SCAN_BLOCK):
        idx = start + tl.arange(0, SCAN_BLOCK)
        ids = tl.load(IDS + idx, mask=idx < n, other=-1)
        total += tl.sum((ids == e).to(tl.int32), axis=0)
    tl.store(COUNTS + e, total)


# grid: (experts,); program e writes slot[a] and order[slot[a]] for its assignments a, and offs[e]
@triton.jit
def _moe_slots(IDS, COUNTS, SLOTS, ORDER, OFFS, n, E, SCAN_BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    e = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    before = tl.load(COUNTS + experts, mask=experts < e, other=0)
    row = tl.sum(before, axis=0)  # the first sorted row of expert e
    for start in range(0, n, SCAN_BLOCK):
        idx = start + tl.arange(0, SCAN_BLOCK)
        mine = tl.load(IDS + idx, mask=idx < n, other=-1) == e
        rank = tl.cumsum(mine.to(tl.int32), axis=0)  # inclusive: the k-th of mine in this block has rank k
        slot = row + rank - 1
        tl.store(SLOTS + idx, slot.to(tl.int64), mask=mine)
        tl.store(ORDER + slot, idx.to(tl.int64), mask=mine)
        row += tl.sum(mine.to(tl.int32), axis=0)
    tl.store(OFFS + e, row)


def _routing(ids: torch.Tensor, num_experts: int):
    n = ids.numel()
    counts = torch.empty(num_experts, dtype=torch.int32, device=ids.device)
    offs = torch.empty_like(counts)
    slots = torch.empty(n, dtype=torch.int64, device=ids.device)
    order = torch.empty_like(slots)
    _moe_count[(num_experts,)](ids, counts, n, SCAN_BLOCK=SCAN_BLOCK)
    _moe_slots[(num_experts,)](ids, counts, slots, order, offs, n, num_experts, SCAN_BLOCK=SCAN_BLOCK,
                           BLOCK_E=triton.next_power_of_2(num_experts))
    return counts, offs, slots, order


@triton.jit
def _group_tile(OFFS, G, tile, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """(g, rows, row_end) of row tile ``tile``: its group (G when the tile is past the last), its BLOCK_M sorted
    rows and its group's end. Each group's tile count is taken from the offsets and prefix-summed; an empty group
    owns no tile."""
    groups = tl.arange(0, BLOCK_G)
    ends = tl.load(OFFS + groups, mask=groups < G, other=0)
    starts = tl.load(OFFS + groups - 1, mask=(groups > 0) & (groups < G), other=0)
    tiles = tl.where(groups < G, tl.cdiv(ends - starts, BLOCK_M), 0)
    tiles_end = tl.cumsum(tiles, axis=0)
    g = tl.sum((tiles_end <= tile).to(tl.int32), axis=0)
    first_tile = tl.sum(tl.where(groups == g, tiles_end - tiles, 0), axis=0)
    row_end = tl.sum(tl.where(groups == g, ends, 0), axis=0)
    rows = tl.sum(tl.where(groups == g, starts, 0), axis=0) + (tile - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    return g, rows, row_end


@triton.jit
def _row_pointers(A, ROWS, rows, row_end, stride_am, GATHER: tl.constexpr):
    """The row pointers of operand A for sorted rows ``rows``: A's own rows, or (GATHER) the rows ROWS names."""
    if GATHER:
        src = tl.load(ROWS + rows, mask=rows < row_end, other=0)
    else:
        src = rows.to(tl.int64)
    return A + src * stride_am


# grid: (cdiv(M, BLOCK_M) + G, cdiv(N, BLOCK_N)); a program owns one BLOCK_M x BLOCK_N tile of one group's rows.
# Options (constexpr): GATHER reads A's row ROWS[r] for sorted row r (the tokens, never copied into expert order);
# DUAL adds a second product A2 @ B2 into the same tile (A2, B2 strided as A, B); SCALED multiplies row r by
# SCALE[r] (fp32) before the store (the routing weights, on the accumulator).
@triton.jit
def _gmm(A, A2, ROWS, B, B2, OFFS, SCALE, OUT, M, N, K, G, stride_am, stride_ak, stride_bg, stride_bk, stride_bn,
         stride_om, stride_on, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
         BLOCK_G: tl.constexpr, GATHER: tl.constexpr, DUAL: tl.constexpr, SCALED: tl.constexpr,
         PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    g, rows, row_end = _group_tile(OFFS, G, tl.program_id(0), BLOCK_M, BLOCK_G)
    if g >= G:  # past the last tile
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    in_rows = rows[:, None] < row_end
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for pair in tl.static_range(2 if DUAL else 1):
        a_ptrs = _row_pointers(A2 if pair else A, ROWS, rows, row_end, stride_am, GATHER)[:, None] + \
            ks[None, :] * stride_ak
        b_ptrs = (B2 if pair else B) + g.to(tl.int64) * stride_bg + ks[:, None] * stride_bk + cols[None, :] * stride_bn
        for k in range(0, K, BLOCK_K):
            a = tl.load(a_ptrs, mask=in_rows & (ks[None, :] < K - k), other=0.0)
            b = tl.load(b_ptrs, mask=(ks[:, None] < K - k) & (cols[None, :] < N), other=0.0)
            if UPCAST:  # Triton's interpreter gets 16-bit tl.dot wrong
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
    if SCALED:
        acc *= tl.load(SCALE + rows, mask=rows < row_end, other=0.0)[:, None]
    out_ptrs = OUT + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=in_rows & (cols[None, :] < N))


# grid: (cdiv(M, BLOCK_M) + G, cdiv(N, BLOCK_N)); the experts' first layer, SwiGLU in the epilogue: one program
# multiplies its (gathered) token rows by both w1 and w3 tiles of its expert (two accumulators, A loaded once) and
# writes gate, up and h = silu(gate) * up, h computed from the rounded gate and up (as the unfused ops would)
@triton.jit
def _gmm_swiglu(A, ROWS, B1, B3, OFFS, GATE, UP, H, M, N, K, G, stride_am, stride_ak, stride_bg, stride_bk, stride_bn,
                stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_G: tl.constexpr, GATHER: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    g, rows, row_end = _group_tile(OFFS, G, tl.program_id(0), BLOCK_M, BLOCK_G)
    if g >= G:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    in_rows = rows[:, None] < row_end
    a_ptrs = _row_pointers(A, ROWS, rows, row_end, stride_am, GATHER)[:, None] + ks[None, :] * stride_ak
    b_offs = g.to(tl.int64) * stride_bg + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=in_rows & (ks[None, :] < K - k), other=0.0)
        b_mask = (ks[:, None] < K - k) & (cols[None, :] < N)
        b1 = tl.load(B1 + b_offs, mask=b_mask, other=0.0)
        b3 = tl.load(B3 + b_offs, mask=b_mask, other=0.0)
        if UPCAST:
            a, b1, b3 = a.to(tl.float32), b1.to(tl.float32), b3.to(tl.float32)
        acc_gate = tl.dot(a, b1, acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(a, b3, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_offs += BLOCK_K * stride_bk
    gate = acc_gate.to(GATE.dtype.element_ty)
    up = acc_up.to(UP.dtype.element_ty)
    gf = gate.to(tl.float32)
    h = gf * tl.sigmoid(gf) * up.to(tl.float32)
    offs = rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    mask = in_rows & (cols[None, :] < N)
    tl.store(GATE + offs, gate, mask=mask)
    tl.store(UP + offs, up, mask=mask)
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


# grid: (G, cdiv(K, BLOCK_K), cdiv(N, BLOCK_N)); db[g] tile = sum over group g's rows of a^T dout, in row order;
# GATHER_A / GATHER_D read a's / dout's row ROWS[r] for sorted row r
@triton.jit
def _gmm_db(A, DOUT, ROWS, OFFS, DB, N, K, stride_am, stride_ak, stride_dm, stride_dn, stride_bg, stride_bk,
            stride_bn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATHER_A: tl.constexpr,
            GATHER_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    g = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_end = tl.load(OFFS + g)
    row_start = tl.load(OFFS + g - 1, mask=g > 0, other=0)
    acc = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        in_rows = rows < row_end
        a_rows = _row_pointers(A, ROWS, rows, row_end, stride_am, GATHER_A)
        d_rows = _row_pointers(DOUT, ROWS, rows, row_end, stride_dm, GATHER_D)
        a_t = tl.load(a_rows[None, :] + ks[:, None] * stride_ak, mask=(ks[:, None] < K) & in_rows[None, :], other=0.0)
        d = tl.load(d_rows[:, None] + cols[None, :] * stride_dn, mask=in_rows[:, None] & (cols[None, :] < N),
                    other=0.0)
        if UPCAST:
            a_t, d = a_t.to(tl.float32), d.to(tl.float32)
        acc = tl.dot(a_t, d, acc, input_precision=PRECISION)
    db_ptrs = DB + g.to(tl.int64) * stride_bg + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    tl.store(db_ptrs, acc.to(DB.dtype.element_ty), mask=(ks[:, None] < K) & (cols[None, :] < N))


# grid: (M,); one sorted row per program, its whole width (BLOCK_N >= N): the SwiGLU backward with the routing
# weight. In: p = dout[token] @ w2[g] (the unweighted gradient of h), gate, up, the row's weight w. Out:
# d_gate, d_up of w * p; d_w = <p, h> (h = silu(gate) * up rounded as the forward stored it); and w * h, dW2's
# left operand
@triton.jit
def _swiglu_weighted_bwd(P, GATE, UP, WS, DGATE, DUP, DW, HW, N, stride, BLOCK_N: tl.constexpr):
    r = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    offs = r.to(tl.int64) * stride + cols
    p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(WS + r)
    s = tl.sigmoid(gate)
    h = (gate * s * up).to(HW.dtype.element_ty).to(tl.float32)
    tl.store(DW + r, tl.sum(p * h, axis=0))
    dh = w * p
    tl.store(DUP + offs, (dh * gate * s).to(DUP.dtype.element_ty), mask=mask)
    tl.store(DGATE + offs, (dh * up * s * (1.0 + gate * (1.0 - s))).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(HW + offs, (w * h).to(HW.dtype.element_ty), mask=mask)


def _tiles(dtype: torch.dtype, dual: bool = False) -> dict:
    """Tile sizes and launch options: small under the interpreter (it runs tl.dot at about 1 GFLOP/s), Hopper-sized
    otherwise; ``dual`` (two accumulators: the SwiGLU GEMM) halves BLOCK_N to keep the registers of one."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1, UPCAST=True)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32 if dual else 64, BLOCK_K=32, num_warps=4, num_stages=3, UPCAST=False)
    return dict(BLOCK_M=128, BLOCK_N=64 if dual else 128, BLOCK_K=64, num_warps=8, num_stages=4, UPCAST=False)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _forward(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, rows: torch.Tensor | None = None,
             scale: torch.Tensor | None = None, a2: torch.Tensor | None = None,
             b2: torch.Tensor | None = None) -> torch.Tensor:
    """out (offs[-1], N): a @ b by groups (a's rows through ``rows`` when given), plus a2 @ b2 when given (strided
    as a and b), each row times ``scale`` when given."""
    m = a.shape[0] if rows is None else rows.shape[0]
    k, (g, _, n) = a.shape[1], b.shape
    out = torch.empty(m, n, dtype=a.dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    if a2 is not None and (a2.stride() != a.stride() or b2.stride() != b.stride()):
        raise ValueError("grouped GEMM's second pair must be strided as its first")
    tiles = _tiles(a.dtype)
    grid = (triton.cdiv(m, tiles["BLOCK_M"]) + g, triton.cdiv(n, tiles["BLOCK_N"]))
    _gmm[grid](a, a if a2 is None else a2, offs if rows is None else rows, b, b if b2 is None else b2, offs,
               offs if scale is None else scale, out, m, n, k, g, a.stride(0), a.stride(1), b.stride(0),
               b.stride(1), b.stride(2), out.stride(0), out.stride(1), BLOCK_G=triton.next_power_of_2(g),
               GATHER=rows is not None, DUAL=a2 is not None, SCALED=scale is not None,
               PRECISION=_precision(a.dtype), **tiles)
    return out


def _db(a: torch.Tensor, dout: torch.Tensor, offs: torch.Tensor, b: torch.Tensor, rows: torch.Tensor | None = None,
        gather_a: bool = False) -> torch.Tensor:
    """db in b's own layout (b is often a Linear-style weight seen transposed): autograd then keeps it as the
    weight's gradient without a copy. With ``rows``, a's rows (gather_a) or dout's are read through it."""
    k, n = a.shape[1], dout.shape[1]
    groups = b.shape[0]
    db = torch.empty_like(b)
    tiles = _tiles(a.dtype)
    grid = (groups, triton.cdiv(k, tiles["BLOCK_K"]), triton.cdiv(n, tiles["BLOCK_N"]))
    _gmm_db[grid](a, dout, offs if rows is None else rows, offs, db, n, k, a.stride(0), a.stride(1), dout.stride(0),
                  dout.stride(1), db.stride(0), db.stride(1), db.stride(2), GATHER_A=rows is not None and gather_a,
                  GATHER_D=rows is not None and not gather_a, PRECISION=_precision(a.dtype), **tiles)
    return db


def _swiglu_forward(x: torch.Tensor, rows: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, offs: torch.Tensor):
    """(gate, up, h), each (len(rows), I): token rows[r] of x through its group's w1 and w3 ((G, I, H), Linear
    layout), and silu(gate) * up."""
    m, (g, n, k) = rows.shape[0], w1.shape
    gate, up, h = (torch.empty(m, n, dtype=x.dtype, device=x.device) for _ in range(3))
    if m == 0 or n == 0:
        return gate, up, h
    if w1.stride() != w3.stride():
        raise ValueError("moe_experts needs w1 and w3 strided alike")
    b1, b3 = w1.transpose(1, 2), w3.transpose(1, 2)
    tiles = _tiles(x.dtype, dual=True)
    grid = (triton.cdiv(m, tiles["BLOCK_M"]) + g, triton.cdiv(n, tiles["BLOCK_N"]))
    _gmm_swiglu[grid](x, rows, b1, b3, offs, gate, up, h, m, n, k, g, x.stride(0), x.stride(1), b1.stride(0),
                      b1.stride(1), b1.stride(2), gate.stride(0), BLOCK_G=triton.next_power_of_2(g), GATHER=True,
                      PRECISION=_precision(x.dtype), **tiles)
    return gate, up, h


def _swiglu_backward(p: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, ws: torch.Tensor):
    """(d_gate, d_up, d_w, w * h) of each sorted row: the kernel's comment."""
    m, n = p.shape
    dgate, dup, hw = torch.empty_like(gate), torch.empty_like(up), torch.empty_like(gate)
    dw = torch.empty(m, dtype=torch.float32, device=p.device)
    if m:
        _swiglu_weighted_bwd[(m,)](p, gate, up, ws, dgate, dup, dw, hw, n, p.stride(0),
                                   BLOCK_N=triton.next_power_of_2(n))
    return dgate, dup, dw, hw


_routing_op = OpaqueOp("moe_routing", "(Tensor ids, int num_experts) -> (Tensor, Tensor, Tensor, Tensor)", _routing,
                       lambda ids, e: (ids.new_empty(e, dtype=torch.int32), ids.new_empty(e, dtype=torch.int32),
                                       ids.new_empty(ids.numel(), dtype=torch.int64),
                                       ids.new_empty(ids.numel(), dtype=torch.int64)))
_forward_op = OpaqueOp(
    "grouped_mm_fwd", "(Tensor a, Tensor b, Tensor offs, Tensor? rows, Tensor? scale, Tensor? a2, Tensor? b2) -> Tensor",
    _forward, lambda a, b, offs, rows, scale, a2, b2: a.new_empty(a.shape[0] if rows is None else rows.shape[0],
                                                                   b.shape[2]))
_db_op = OpaqueOp("grouped_mm_db", "(Tensor a, Tensor dout, Tensor offs, Tensor b, Tensor? rows, bool gather_a) -> Tensor",
                  _db, lambda a, dout, offs, b, rows, gather_a: torch.empty_like(b))
_swiglu_forward_op = OpaqueOp(
    "moe_swiglu_fwd", "(Tensor x, Tensor rows, Tensor w1, Tensor w3, Tensor offs) -> (Tensor, Tensor, Tensor)",
    _swiglu_forward, lambda x, rows, w1, w3, offs: tuple(x.new_empty(rows.shape[0], w1.shape[1]) for _ in range(3)))
_swiglu_backward_op = OpaqueOp(
    "moe_swiglu_bwd", "(Tensor p, Tensor gate, Tensor up, Tensor ws) -> (Tensor, Tensor, Tensor, Tensor)",
    _swiglu_backward, lambda p, gate, up, ws: (torch.empty_like(gate), torch.empty_like(up),
                                               ws.new_empty(ws.shape), torch.empty_like(gate)))


class GroupedMMFunction(torch.autograd.Function):
    """grouped_mm with its backward; ``offs`` is trusted here (``grouped_mm`` checks it)."""

    @staticmethod
    def forward(ctx, a, b, offs):
        ctx.save_for_backward(a, b, offs)
        return _forward_op(a, b, offs, None, None, None, None)

    @staticmethod
    def backward(ctx, dout):
        a, b, offs = ctx.saved_tensors
        da = _forward_op(dout, b.transpose(1, 2), offs, None, None, None, None) if ctx.needs_input_grad[0] else None
        db = _db_op(a, dout, offs, b, None, False) if ctx.needs_input_grad[1] else None
        return da, db, None


class MoEExpertsFunction(torch.autograd.Function):
    """moe_experts, fused (the module docstring's "Experts"). Saves x, the weights, the routing, gate and up: no
    token copy in expert order and no expert output."""

    @staticmethod
    def forward(ctx, x, expert_ids, weights, w1, w3, w2):
        tokens, k = expert_ids.shape
        _, offs, slots, order = moe_routing(expert_ids, w1.shape[0])
        rows = order // k  # the token of each sorted row
        ws = weights.reshape(-1).float()[order]  # the routing weight of each sorted row
        gate, up, h = _swiglu_forward_op(x, rows, w1, w3, offs)
        y = _forward_op(h, w2.transpose(1, 2), offs, None, ws, None, None)  # weighted, in expert order
        ctx.save_for_backward(x, w1, w3, w2, offs, slots, rows, ws, gate, up)
        ctx.k, ctx.weights_dtype = k, weights.dtype
        return y[slots].view(tokens, k, y.shape[-1]).sum(1)

    @staticmethod
    def backward(ctx, dout):
        x, w1, w3, w2, offs, slots, rows, ws, gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        p = _forward_op(dout, w2, offs, rows, None, None, None)  # dout[token] @ w2[g]: h's gradient, unweighted
        dgate, dup, dw, hw = _swiglu_backward_op(p, gate, up, ws)
        dx_sorted = _forward_op(dgate, w1, offs, None, None, dup, w3)  # dgate @ w1 + dup @ w3
        dx = dx_sorted[slots].view(dout.shape[0], ctx.k, x.shape[1]).sum(1)  # each token's k rows, in choice order
        # each written in its weight's layout (as b = weight^T), handed back as the weight
        dw1 = _db_op(x, dgate, offs, w1.transpose(1, 2), rows, True).transpose(1, 2)
        dw3 = _db_op(x, dup, offs, w3.transpose(1, 2), rows, True).transpose(1, 2)
        dw2 = _db_op(hw, dout, offs, w2.transpose(1, 2), rows, False).transpose(1, 2)
        dweights = dw[slots].view(dout.shape[0], ctx.k).to(ctx.weights_dtype)
        return dx, None, dweights, dw1, dw3, dw2


def moe_routing(expert_ids: torch.Tensor, num_experts: int):
    """(counts, offs, slots, order) of ``expert_ids`` (T, k): see the module docstring."""
    return _routing_op(expert_ids.reshape(-1).contiguous(), num_experts)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a (M, K) rows sorted by group, b (G, K, N), offs (G,) int32 inclusive ends -> (M, N); checked by the caller
    (evo.kernels.grouped_mm)."""
    return GroupedMMFunction.apply(a, b, offs)


def moe_experts(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor,
                w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The routed experts' output (T, H): see evo.kernels.moe_experts (which checks the arguments)."""
    return MoEExpertsFunction.apply(x.contiguous(), expert_ids, weights, w1, w3, w2)
