"""Many LoRA adapters on one NF4 base in one call: the general path (any M, for prefill and large M).

    y[m] = x[m] @ dequant(W)^T + bias + scales[i] * (x[m] @ a_bank[i]^T) @ v_bank[i],  i = index[m]
    (no low-rank term where index[m] < 0: a base-only row)

x [M, K]; a_bank [S, R, K], v_bank [S, R, N] (B^T per slot, ranks below R zero-padded); scales [S] fp32;
index [M], values in [-1, S): the caller guarantees it (nothing reads index on the host; a value out of
range reads another slot's memory or past the bank). The steps, no host read (CUDA-graph capturable):
0. decode (M <= 16, fp16/bf16 x, K % 32 == 0, aligned tensors): `nf4.kernels.gemv.launch_adapters`, the
   W stream shared by the rows and each row's A and B^T gathered in the same two launches; else:
1. the base, `nf4.kernels.matmul.nf4_matmul(x, W, bias=bias)` (its fused, GEMV or dequantize + GEMM path);
2. `torch.sort(index)`: row positions grouped by slot (SGMV-style segments), base-only rows first;
3. shrink: program (t, j, s) takes sorted positions [16 t, 16 t + 16), ranks [16 j, 16 j + 16), K slice s;
   for each distinct slot of its rows, one `tl.dot` [16, BK] x [BK, 16] per K step over that slot's rows
   (the other rows masked: not fetched) and a store of those rows: u[s, p, :] = scales[i] * x[row] @
   a_bank[i]^T, float32 [split, M, R];
4. expand: program (t, n) takes the same positions and BN columns; for each distinct slot of its rows,
   acc = sum_s u[s] @ v_bank[i][:, cols] (rank steps of 16), then that slot's rows of y are read, added
   to and written back in place. Base-only rows are never touched.

Why segmented and not a per-row gather (BGMV): a gather reads a slot's A and B once per row, R (K + N)
elements (16 x 8192 x 2 B = 256 KiB per row at r = 16, 4096^2, bf16) from L2, in matrix-vector products
(no tensor cores). Sorted, a 16-row tile reads them once per distinct slot it holds: with c rows per
adapter, min(c, 16) times fewer bytes, on tensor cores. The price: one sort, and at most
ceil(M / 16) + min(S, M) - 1 (tile, slot) pairs, each a dot padded to 16 rows. The slots of a tile are
walked by a loop (a tl.min over its 16 slot ids per step), so a tile of one slot costs one pass.

Cost, M = 512 rows (16 sequences x 32 tokens), K = N = 4096, bf16 x and bank, r = R = 16, on 132 SMs;
D distinct adapters (16, or 1). Counted from the code; nothing measured (no GPU).
- base (`nf4_matmul`, M = 512: its 128x64 tiles, 256 programs, or dequantize + cuBLAS, chosen by timing):
  W 8 MiB + 0.25 MiB absmax (double quant), x 4 MiB, y 4 MiB written; 2 M N K = 17.2 GFLOP.
- sort: 2 KiB of int32 in, 6 KiB out; 1-3 small launches.
- shrink: split = 4 (`split_for`): 32 tiles x 1 rank step x 4 = 128 programs of 16 K steps (BK = 64).
  32 (tile, slot) pairs for D = 16 as for D = 1 (32-row segments fill whole tiles: one slot per tile).
  x 4 MiB once (likely still in L2 after the base); A 32 pairs x 128 KiB = 4 MiB from L2, of which
  D x 128 KiB from DRAM (2 MiB at D = 16, 128 KiB at D = 1); u written: 4 x 512 x 16 x 4 B = 128 KiB.
  32 x 2 x 16 x 16 x 4096 = 67 MFLOP on tensor cores (0.4 % of the base).
- expand: 32 tiles x 64 column tiles = 2048 programs. y 4 MiB read + 4 MiB written (the base's output
  again: L2 hits while it stays resident, else 8 MiB of DRAM); V 32 x R N 2 B = 4 MiB from L2, D x 128
  KiB from DRAM; u re-read per column tile, 64 x 128 KiB = 8 MiB from L2. 2 x 67 MFLOP (hi + lo dots).
- extra over the base, D = 16: DRAM 4 MiB of A and V (+ up to 8 MiB of y); D = 1: 0.25 MiB (+ the same
  y); L2 ~20 MiB either way; 0.2 GFLOP (1.2 %); 4-6 more launches, a chain of 3 dependent ones after the
  base (sort -> shrink -> expand). Per program the dependent round trips are: slot and row ids, then the
  K loop (16 steps, 3 stages: ~6-8 waits) in the shrink; slot ids, then u / V, then y, then the store in
  the expand. D = 16 over D = 1 adds 3.75 MiB of DRAM (~1.1 us at 3.35 TB/s) and nothing else, so the
  16-adapter call should cost about the one-adapter call; what both add over the base is the y round
  trip and the three short launches (a few us each uncaptured), against an estimated base of 25-40 us.
  A per-row gather would instead read 512 x 256 KiB = 128 MiB of A and B from L2.

Numerics: low-rank products in float32 (fp32 operands: exact products, `ieee` dots; fp16/bf16 x and A:
exact products on tensor cores). On tensor cores u is split into hi + lo in v's dtype (two dots, ~16
bits of u for bf16, ~22 for fp16; fp16 needs |u| < 65504). In fp16/bf16 y is rounded twice: once by
the base, once after adding the term (at most half an ulp of |y| more than one rounding); fp32 y once
more in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nf4.kernels.common import INTERPRET, TL_DTYPES, LaunchConfig, cdiv, multiprocessors, ptr_type, round_to, to_f32

BM = 16  # sorted row positions per program: the smallest tensor-core tile
RK = 16  # ranks per dot
BK = 64  # columns of x and A per shrink step
BN = 64  # output columns per expand program
MAX_SPLIT = 4
"""Most K slices of the shrink: the expand sums them per column tile (split x 1 KiB per tile and rank step)."""
NUM_WARPS = 4
NO_SLOT = tl.constexpr(2**31 - 1)  # past every slot: the loops over a tile's distinct slots end on it


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr, SOFT_BF16: tl.constexpr):
    """acc + a @ b in fp32: exact fp32 (`DOT_F32`, or the interpreter, whose bf16 dots are wrong) or on
    tensor cores."""
    if DOT_F32 or SOFT_BF16:
        return tl.dot(to_f32(a, SOFT_BF16), to_f32(b, SOFT_BF16), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _distinct(slots_ptr, pos, in_m, slot):
    """Number of distinct slots >= 0 of the tile (its positions are sorted: a new slot starts each run)."""
    prev = tl.load(slots_ptr + pos - 1, mask=in_m & (tl.arange(0, pos.shape[0]) > 0), other=-2)
    return tl.sum(((slot != prev) & (slot >= 0)).to(tl.int32))


@triton.jit
def _next_slot(slot, after):
    """The smallest slot of the tile above `after` (NO_SLOT if none)."""
    return tl.min(tl.where(slot > after, slot, NO_SLOT))


@triton.jit(do_not_specialize=["M"])
def _shrink_kernel(
    x_ptr,
    a_ptr,
    scales_ptr,
    slots_ptr,
    order_ptr,
    u_ptr,
    M,
    K,
    R,
    k_per_split,
    BM: tl.constexpr,
    BK: tl.constexpr,
    DOT_F32: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    """u[s, p, ranks] = scales[i] * x[order[p], slice s] @ a_bank[i][ranks, slice s]^T for the tile's
    positions p with slot i = slots[p] >= 0; slots sorted (`_distinct` counts runs)."""
    pos = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    in_m = pos < M
    slot = tl.load(slots_ptr + pos, mask=in_m, other=-1)
    x_rows = x_ptr + tl.load(order_ptr + pos, mask=in_m, other=0)[:, None] * K
    rank = tl.program_id(1) * 16 + tl.arange(0, 16)
    in_r = rank < R
    pid_k = tl.program_id(2).to(tl.int64)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    cur = _next_slot(slot, -1)
    for _ in range(0, _distinct(slots_ptr, pos, in_m, slot)):
        rows = slot == cur
        a_cols = a_ptr + (cur.to(tl.int64) * R + rank)[None, :] * K  # A^T: [BK, 16] tiles
        acc = tl.zeros((BM, 16), dtype=tl.float32)
        for k0 in range(k_start, k_end, BK):
            offs_k = k0 + tl.arange(0, BK)
            in_k = offs_k < k_end
            x = tl.load(x_rows + offs_k[None, :], mask=rows[:, None] & in_k[None, :], other=0.0)
            a = tl.load(a_cols + offs_k[:, None], mask=in_k[:, None] & in_r[None, :], other=0.0)
            acc = _dot(x, a, acc, DOT_F32, SOFT_BF16)
        offs = (pid_k * M + pos)[:, None] * R + rank[None, :]
        tl.store(u_ptr + offs, acc * tl.load(scales_ptr + cur.to(tl.int64)), mask=rows[:, None] & in_r[None, :])
        cur = _next_slot(slot, cur)


@triton.jit(do_not_specialize=["M", "split"])
def _expand_kernel(
    u_ptr,
    v_ptr,
    slots_ptr,
    order_ptr,
    y_ptr,
    M,
    N,
    R,
    split,
    BM: tl.constexpr,
    BN: tl.constexpr,
    DOT_F32: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    """y[order[p], cols] += sum_s u[s, p] @ v_bank[i][:, cols] for the tile's sorted positions p with slot
    i = slots[p] >= 0, rounded once to y's dtype; rows of base-only positions are neither read nor written."""
    pos = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    in_m = pos < M
    slot = tl.load(slots_ptr + pos, mask=in_m, other=-1)
    cols = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    in_n = cols < N
    cur = _next_slot(slot, -1)
    for _ in range(0, _distinct(slots_ptr, pos, in_m, slot)):
        # NOTE: each slot's rows of y are updated inside the loop, their row ids and slots loaded again
        # there (L1 hits): a tile or ids held across the loop took a stack frame (ptxas, sm_80 and sm_90)
        rows = slot == cur
        v_rows = v_ptr + cur.to(tl.int64) * R * N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for r0 in range(0, R, 16):
            rank = r0 + tl.arange(0, 16)
            in_r = rank < R
            u = tl.zeros((BM, 16), dtype=tl.float32)
            for s in range(0, split):  # independent loads: in flight together
                offs = (s * M + pos)[:, None] * R + rank[None, :]
                u += tl.load(u_ptr + offs, mask=rows[:, None] & in_r[None, :], other=0.0)
            v_tile = v_rows + rank[:, None].to(tl.int64) * N + cols[None, :]
            v = tl.load(v_tile, mask=in_r[:, None] & in_n[None, :], other=0.0)  # ranks past R: 0, not NaN
            if DOT_F32:
                acc = _dot(u, v, acc, True, SOFT_BF16)
            else:  # u = hi + lo in v's dtype: two tensor-core dots keep ~2x v's significand bits of u
                hi = round_to(u, v.dtype, SOFT_BF16)
                lo = round_to(u - to_f32(hi, SOFT_BF16), v.dtype, SOFT_BF16)
                acc = _dot(hi, v, acc, False, SOFT_BF16)
                acc = _dot(lo, v, acc, False, SOFT_BF16)
        row = tl.load(order_ptr + pos, mask=in_m, other=0)
        tile = y_ptr + row[:, None] * N + cols[None, :]
        inside = (tl.load(slots_ptr + pos, mask=in_m, other=-1) == cur)[:, None] & in_n[None, :]
        y = to_f32(tl.load(tile, mask=inside, other=0.0), SOFT_BF16) + acc
        tl.store(tile, round_to(y, y_ptr.dtype.element_ty, SOFT_BF16), mask=inside)
        cur = _next_slot(slot, cur)


def _bank_dtypes(dtype: torch.dtype) -> list[torch.dtype]:
    """The bank dtypes compiled for activations of `dtype`: its own and float32."""
    return list(dict.fromkeys((dtype, torch.float32)))


def adapter_configs() -> list[LaunchConfig]:
    """Every compiled variant the adapter kernels can launch: x dtype x bank dtype (its own or float32),
    shrink and expand."""
    out = []
    for dtype, bank in ((d, b) for d in TL_DTYPES for b in _bank_dtypes(d)):
        x, w = ptr_type(dtype), ptr_type(bank)
        dot_f32 = torch.float32 in (dtype, bank)
        name = f"{x[1:]},bank={w[1:]}"
        index = {"slots_ptr": "*i32", "order_ptr": "*i64"}
        out.append(
            LaunchConfig(
                name=f"adapters_shrink[{name}]",
                kernel=_shrink_kernel,
                signature={"x_ptr": x, "a_ptr": w, "scales_ptr": "*fp32", **index, "u_ptr": "*fp32"}
                | {"M": "i32", "K": "i32", "R": "i32", "k_per_split": "i32"},
                constexprs={"BM": BM, "BK": BK, "DOT_F32": dot_f32, "SOFT_BF16": False},
                options={"num_warps": NUM_WARPS, "num_stages": 3, "enable_fp_fusion": False},
            )
        )
        out.append(
            LaunchConfig(
                name=f"adapters_expand[{name}]",
                kernel=_expand_kernel,
                signature={"u_ptr": "*fp32", "v_ptr": w, **index, "y_ptr": x}
                | {"M": "i32", "N": "i32", "R": "i32", "split": "i32"},
                constexprs={"BM": BM, "BN": BN, "DOT_F32": bank == torch.float32, "SOFT_BF16": False},
                options={"num_warps": NUM_WARPS, "enable_fp_fusion": False},
            )
        )
    return out


def split_for(m: int, k: int, r: int, device: torch.device) -> int:
    """K slices of the shrink: about one program per SM, each at least 4 BK steps, at most MAX_SPLIT."""
    if device.type != "cuda":
        return 1
    programs = cdiv(m, BM) * cdiv(r, RK)
    return max(1, min(cdiv(multiprocessors(device), programs), k // (4 * BK), MAX_SPLIT))


def add_adapter_rows_(
    y: torch.Tensor,
    x: torch.Tensor,
    a_bank: torch.Tensor,
    v_bank: torch.Tensor,
    scales: torch.Tensor,
    index: torch.Tensor,
    split: int | None = None,
) -> torch.Tensor:
    """y[m] += scales[i] * (x[m] @ a_bank[i]^T) @ v_bank[i], i = index[m] >= 0, in place; returns y.

    Inputs as `nf4_matmul_adapters` checks them (x and y contiguous, index int32); split: K slices of the
    shrink (tests; default `split_for`)."""
    m, k = x.shape
    s, r, _ = a_bank.shape
    n = v_bank.shape[2]
    if m == 0 or s == 0 or r == 0:
        return y
    if split is None:
        split = split_for(m, k, r, x.device)
    k_per_split = cdiv(cdiv(k, split), BK) * BK
    split = cdiv(k, k_per_split)
    slots, order = torch.sort(index, stable=True)
    u = torch.empty((split, m, r), dtype=torch.float32, device=x.device)
    _shrink_kernel[(cdiv(m, BM), cdiv(r, RK), split)](
        x,
        a_bank,
        scales,
        slots,
        order,
        u,
        m,
        k,
        r,
        k_per_split,
        BM=BM,
        BK=BK,
        DOT_F32=torch.float32 in (x.dtype, a_bank.dtype),
        SOFT_BF16=INTERPRET,
        num_warps=NUM_WARPS,
        num_stages=3,
        enable_fp_fusion=False,
    )
    _expand_kernel[(cdiv(m, BM), cdiv(n, BN))](
        u,
        v_bank,
        slots,
        order,
        y,
        m,
        n,
        r,
        split,
        BM=BM,
        BN=BN,
        DOT_F32=v_bank.dtype == torch.float32,
        SOFT_BF16=INTERPRET,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
    return y


def _check(x, weight, a_bank, v_bank, scales, index, bias) -> None:
    """Shapes, dtypes, layouts and devices of `nf4_matmul_adapters`'s inputs (never their values)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [M, K], got {getattr(x, 'shape', type(x))}")
    if x.dtype not in TL_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}; convert it first")
    if len(weight.shape) != 2:
        raise ValueError(f"weight must be a 2-D NF4Tensor [N, K], got shape {list(weight.shape)}")
    n, k = weight.shape
    m = x.shape[0]
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} columns but the weight has K = {k}: expected x of shape [M, {k}]")
    tensors = {"a_bank": a_bank, "v_bank": v_bank, "scales": scales, "index": index}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if a_bank.dim() != 3 or a_bank.shape[2] != k:
        raise ValueError(f"a_bank must be [S, R, K] with K = {k}, got {list(a_bank.shape)}")
    s, r, _ = a_bank.shape
    if tuple(v_bank.shape) != (s, r, n):
        raise ValueError(f"v_bank must be [S, R, N] = [{s}, {r}, {n}] (B^T per slot), got {list(v_bank.shape)}")
    if tuple(scales.shape) != (s,):
        raise ValueError(f"scales must be [S] = [{s}], got {list(scales.shape)}")
    if tuple(index.shape) != (m,):
        raise ValueError(f"index must be [M] = [{m}] (one slot per row of x, -1 for none), got {list(index.shape)}")
    for name in ("a_bank", "v_bank"):
        if tensors[name].dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{name} must be float32 or x's dtype ({x.dtype}), got {tensors[name].dtype}")
        if not tensors[name].is_contiguous():
            raise ValueError(f"{name} must be contiguous (a copy per call would move the whole bank)")
    if scales.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got {scales.dtype}")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"index must be int32 or int64, got {index.dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,):
            raise ValueError(f"bias must be a tensor [N] = [{n}] or None, got {getattr(bias, 'shape', type(bias))}")
        if bias.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"bias must be float32 or x's dtype ({x.dtype}), got {bias.dtype}")
        tensors["bias"] = bias
    tensors["weight"] = weight
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"x is on {x.device} but {name} is on {t.device}; move them to one device")


def nf4_matmul_adapters(
    x: torch.Tensor,
    weight,
    a_bank: torch.Tensor,
    v_bank: torch.Tensor,
    scales: torch.Tensor,
    index: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    split: int | None = None,
) -> torch.Tensor:
    """`x @ dequant(weight)^T + bias`, then row m's adapter `scales[i] * (x[m] @ a_bank[i]^T) @ v_bank[i]`
    (i = index[m]; none where i < 0) added in place; no host read.

    x [M, K] fp32/fp16/bf16; weight an NF4Tensor [N, K]; a_bank [S, R, K] and v_bank [S, R, N] float32 or
    x's dtype, contiguous; scales [S] float32; index [M] int32 or int64 with values in [-1, S) (not
    checked: that needs a host read); bias [N] float32 or x's dtype, or None. Returns [M, N], x's dtype."""
    _check(x, weight, a_bank, v_bank, scales, index, bias)
    from nf4.kernels import gemv
    from nf4.kernels.matmul import gemv_applies, nf4_matmul

    x = x.contiguous()
    if (
        gemv_applies(x, weight, False, None)
        and gemv.adapters_fuse(x.dtype, x.shape[1])
        and min(a_bank.shape[:2]) >= 1
        and all(t.data_ptr() % 16 == 0 for t in (a_bank, v_bank))
    ):  # decode: the W stream shared by the rows, each row's A and B^T gathered in the same two launches
        return gemv.launch_adapters(x, weight, a_bank, v_bank, scales, index, bias, split)
    y = nf4_matmul(x, weight, bias=bias)
    return add_adapter_rows_(y, x, a_bank, v_bank, scales, index.to(torch.int32), split)
