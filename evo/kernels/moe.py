"""Mixture-of-experts kernels in Triton: the routing metadata and the grouped GEMM.

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


# grid: (cdiv(M, BLOCK_M) + G, cdiv(N, BLOCK_N)); a program owns one BLOCK_M x BLOCK_N tile of one group's rows
@triton.jit
def _gmm(A, B, OFFS, OUT, M, N, K, G, stride_am, stride_ak, stride_bg, stride_bk, stride_bn, stride_om, stride_on,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
         PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    tile = tl.program_id(0)
    # the group of this row tile: groups' tile counts, prefix-summed; empty groups own no tile
    groups = tl.arange(0, BLOCK_G)
    ends = tl.load(OFFS + groups, mask=groups < G, other=0)
    starts = tl.load(OFFS + groups - 1, mask=(groups > 0) & (groups < G), other=0)
    tiles = tl.where(groups < G, tl.cdiv(ends - starts, BLOCK_M), 0)
    tiles_end = tl.cumsum(tiles, axis=0)
    g = tl.sum((tiles_end <= tile).to(tl.int32), axis=0)
    if g >= G:  # past the last tile
        return
    first_tile = tl.sum(tl.where(groups == g, tiles_end - tiles, 0), axis=0)
    row_end = tl.sum(tl.where(groups == g, ends, 0), axis=0)
    rows = tl.sum(tl.where(groups == g, starts, 0), axis=0) + (tile - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows.to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = B + g.to(tl.int64) * stride_bg + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rows[:, None] < row_end) & (ks[None, :] < K - k), other=0.0)
        b = tl.load(b_ptrs, mask=(ks[:, None] < K - k) & (cols[None, :] < N), other=0.0)
        if UPCAST:  # Triton's interpreter gets 16-bit tl.dot wrong
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    out_ptrs = OUT + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=(rows[:, None] < row_end) & (cols[None, :] < N))


# grid: (G, cdiv(K, BLOCK_K), cdiv(N, BLOCK_N)); db[g] tile = sum over group g's rows of a^T dout, in row order
@triton.jit
def _gmm_db(A, DOUT, OFFS, DB, N, K, stride_am, stride_ak, stride_dm, stride_dn, stride_bg, stride_bk, stride_bn,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
            UPCAST: tl.constexpr):
    g = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_end = tl.load(OFFS + g)
    row_start = tl.load(OFFS + g - 1, mask=g > 0, other=0)
    acc = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        a_t = tl.load(A + ks[:, None] * stride_ak + rows.to(tl.int64)[None, :] * stride_am,
                      mask=(ks[:, None] < K) & (rows[None, :] < row_end), other=0.0)
        d = tl.load(DOUT + rows.to(tl.int64)[:, None] * stride_dm + cols[None, :] * stride_dn,
                    mask=(rows[:, None] < row_end) & (cols[None, :] < N), other=0.0)
        if UPCAST:
            a_t, d = a_t.to(tl.float32), d.to(tl.float32)
        acc = tl.dot(a_t, d, acc, input_precision=PRECISION)
    db_ptrs = DB + g.to(tl.int64) * stride_bg + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    tl.store(db_ptrs, acc.to(DB.dtype.element_ty), mask=(ks[:, None] < K) & (cols[None, :] < N))


def _tiles(dtype: torch.dtype) -> dict:
    """Tile sizes and launch options: small under the interpreter (it runs tl.dot at about 1 GFLOP/s), Hopper-sized
    otherwise."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1, UPCAST=True)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3, UPCAST=False)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4, UPCAST=False)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _forward(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    (m, k), (g, _, n) = a.shape, b.shape
    out = torch.empty(m, n, dtype=a.dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    tiles = _tiles(a.dtype)
    grid = (triton.cdiv(m, tiles["BLOCK_M"]) + g, triton.cdiv(n, tiles["BLOCK_N"]))
    _gmm[grid](a, b, offs, out, m, n, k, g, a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
               out.stride(0), out.stride(1), BLOCK_G=triton.next_power_of_2(g), PRECISION=_precision(a.dtype),
               **tiles)
    return out


def _db(a: torch.Tensor, dout: torch.Tensor, offs: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """db in b's own layout (b is often a Linear-style weight seen transposed): autograd then keeps it as the
    weight's gradient without a copy."""
    k, n = a.shape[1], dout.shape[1]
    groups = b.shape[0]
    db = torch.empty_like(b)
    tiles = _tiles(a.dtype)
    grid = (groups, triton.cdiv(k, tiles["BLOCK_K"]), triton.cdiv(n, tiles["BLOCK_N"]))
    _gmm_db[grid](a, dout, offs, db, n, k, a.stride(0), a.stride(1), dout.stride(0), dout.stride(1), db.stride(0),
                  db.stride(1), db.stride(2), PRECISION=_precision(a.dtype), **tiles)
    return db


_routing_op = OpaqueOp("moe_routing", "(Tensor ids, int num_experts) -> (Tensor, Tensor, Tensor, Tensor)", _routing,
                       lambda ids, e: (ids.new_empty(e, dtype=torch.int32), ids.new_empty(e, dtype=torch.int32),
                                       ids.new_empty(ids.numel(), dtype=torch.int64),
                                       ids.new_empty(ids.numel(), dtype=torch.int64)))
_forward_op = OpaqueOp("grouped_mm_fwd", "(Tensor a, Tensor b, Tensor offs) -> Tensor", _forward,
                       lambda a, b, offs: a.new_empty(a.shape[0], b.shape[2]))
_db_op = OpaqueOp("grouped_mm_db", "(Tensor a, Tensor dout, Tensor offs, Tensor b) -> Tensor", _db,
                  lambda a, dout, offs, b: torch.empty_like(b))


class GroupedMMFunction(torch.autograd.Function):
    """grouped_mm with its backward; ``offs`` is trusted here (``grouped_mm`` checks it)."""

    @staticmethod
    def forward(ctx, a, b, offs):
        ctx.save_for_backward(a, b, offs)
        return _forward_op(a, b, offs)

    @staticmethod
    def backward(ctx, dout):
        a, b, offs = ctx.saved_tensors
        da = _forward_op(dout, b.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
        db = _db_op(a, dout, offs, b) if ctx.needs_input_grad[1] else None
        return da, db, None


def moe_routing(expert_ids: torch.Tensor, num_experts: int):
    """(counts, offs, slots, order) of ``expert_ids`` (T, k): see the module docstring."""
    return _routing_op(expert_ids.reshape(-1).contiguous(), num_experts)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a (M, K) rows sorted by group, b (G, K, N), offs (G,) int32 inclusive ends -> (M, N); checked by the caller
    (evo.kernels.grouped_mm)."""
    return GroupedMMFunction.apply(a, b, offs)
