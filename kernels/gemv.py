"""NF4 decode kernel (M <= 16) at the memory-bandwidth limit, and its epilogue.

    y[M, N] = x[M, K] @ W[N, K]^T + u[M, r] @ v[r, N] + bias[N]
    W[n, k] = NF4[code(n*K + k)] * absmax[(n*K + k) // blocksize]      (bitsandbytes' layout, `nf4.format`)

Program (s, i) owns BN rows of W and K-slice s and writes fp32 partial[s, M, N] (no atomics); the epilogue
sums the slices, adds u @ v and bias, rounds once. A step is one `tl.dot` [BN, BK] x [BK, 16] (x padded to
16 rows) within one absmax block per row, so absmax scales the dot's result. Paths:
- register table (`lut_applies`): W in tensor-core fragment order, PRMT lookups (`nf4.kernels.lut`), the
  reduction permuted to match (`_lut_dot`), the next step prefetched in registers;
- pair table (other K % 32 == 0): a gather from `activation_pair_table` per byte. NOTE: ~3.4x the L1
  budget on the register-table shapes (benchmarks/results/README.md, issue 17);
- general (K % 32 != 0): each element decoded as `nf4.dequantize` does; not tuned.
Given A (`fuses_a`), the first ceil(r/16) row tiles compute u = x @ A^T in exact fp32 (`_lora_a_slice`).

Adapter bank (`launch_adapters`): the same compiled kernels, a runtime flag (has_index). Row m's
x @ a_bank[index[m]]^T: M ceil(R/16) row tiles per slice, one row and 16 ranks each (`_lora_a_row`); its
B^T and scale gathered by the epilogue, 8 ranks a step (`_lora_rows`). Cost at 8192^2, M = 16, 16 distinct
adapters of R = 16, bf16 x, float32 bank, split 8, against one adapter (a model: nothing measured):
- bytes: A 16 x 16 x 8192 x 4 = 8.4 MB, B^T as much (one adapter: 0.52 MB each): +15.7 MB, +3.8 us at 4.1 TB/s;
- programs: 8 x (16 + 64) = 640 streaming (520), each low-rank one 8 steps of an 8 KB tile of A; 128 epilogue;
- chain: the epilogue waits 4 round trips as with one adapter (the slices' sum with the slots' load in
  flight; 2 steps of 8 gathered [16, 64] tiles of B^T, 32 KB a program, with u's sums; the store);
- predicted: `memory_us` terms plus those bytes 16.1 -> 19.9 us (1.24x; a bf16 bank 1.12x); the per-pipe
  model (benchmarks/static/today.py) 23.0 -> 21.5 us (its one-adapter x @ A^T programs are L1-bound).

Numerics: fp32 accumulation, one rounding; fp16/bf16 NF4 values times an fp32 absmax (the error of
`nf4.dequantize`'s rounding). Under the interpreter (`SOFT_BF16`) dots run on fp32 operands and PRMT is
a table gather (tests/test_lookup.py compares them).
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nf4.kernels.common import (
    INTERPRET,
    TL_DTYPES,
    LaunchConfig,
    cdiv,
    multiprocessors,
    nested_pointers,
    ptr_type,
    round_to,
    to_f32,
)
from nf4.kernels.dequantize import decode_absmax
from nf4.kernels.lut import PAIR_ASM, lut_words, pair_lookup

BM = 16  # rows of x per program: M <= 16 padded to the smallest tensor-core tile
BK = 32  # smallest reduction step: 16 bytes of each W row, in one absmax block (blocksize >= 32)
MAX_M = 16
NUM_WARPS = 4
LUT_BN = 128  # rows of W per program on the register-table path (two 64-row tensor-core tiles)
LUT_BN_V2 = 64
"""LUT_BN with mma.sync (sm_80). NOTE: 128 rows spill there (tests/test_compile.py)."""
LUT_BK = 256  # codes per row per loop step there: 4 blocks of 64, 128 bytes
LUT_CHUNKS = 4  # steps per program at most there (its absmax is decoded before the loop: 4 x [BN, 4])
EPILOGUE_BN = 64
A_BK = tl.constexpr(128)
"""Columns of A per step on sm_90's register-table path; half elsewhere (128: stack on sm_80, tests/test_compile.py)."""
SPLITS_PER_STEP = tl.constexpr(8)  # split-K slices the epilogue sums per loop step (loads in flight)


def block_n(dtype: torch.dtype, aligned: bool = True) -> int:
    """Rows of W per program: 256 fp16/bf16, 16 fp32 (FMA dot), 32 on the general path. NOTE: larger
    ones spill or take stack (tests/test_compile.py)."""
    if not aligned:
        return 32
    return 16 if dtype == torch.float32 else 256


# --------------------------------------------------------------------------------------------------
# jit helpers


@triton.jit
def _absmax(absmax_ptr, nested_absmax_ptr, nested_offset_ptr, nested_code_ptr, block, mask, DOUBLE_QUANT: tl.constexpr):
    """float32 absmax of blocks `block`, double quantization decoded; `mask` None: all exist."""
    if mask is None:
        mask = tl.full(block.shape, True, tl.int1)
    return decode_absmax(absmax_ptr, nested_absmax_ptr, nested_offset_ptr, nested_code_ptr, block, mask, DOUBLE_QUANT)


@triton.jit
def _dot(w, x, DOT_F32: tl.constexpr, SOFT_BF16: tl.constexpr):
    """w [BN, BK] @ x[16, BK]^T in fp32: tensor cores, or exact (fp32 data, interpreter)."""
    if DOT_F32:
        return tl.dot(to_f32(w, SOFT_BF16), tl.trans(to_f32(x, SOFT_BF16)), input_precision="ieee")
    else:
        return tl.dot(w, tl.trans(x))


@triton.jit(do_not_specialize=["M", "N", "has_index"])
def _nf4_gemv_kernel(
    # pointers
    x_ptr,
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_offset_ptr,
    nested_code_ptr,
    pairs_ptr,
    code_ptr,
    partial_ptr,
    a_ptr,
    index_ptr,
    # sizes
    M,
    N,
    K,
    KB,
    stride_xm,
    log2_bs,
    n_blocks,
    k_per_split,
    kb_per_split,
    r,
    stride_as,
    stride_ar,
    stride_ak,
    has_index,
    # meta-parameters
    ALIGNED: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    CODE_F32: tl.constexpr,
    DOT_F32: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    HAS_A: tl.constexpr,
    LUT: tl.constexpr,
    ASM: tl.constexpr,
    MMA_V2: tl.constexpr,
):
    """partial[s, :, rows] = x[:, slice s] @ dequant(W)[rows, slice s]^T; with HAS_A, row tiles
    i < ceil(r / 16) compute x[:, slice s] @ A[16 i .. 16 i + 16, slice s]^T; with has_index (a runtime
    flag: one compiled kernel), row tiles i < M ceil(r / 16) compute row m = i // ceil(r / 16) of it with
    A = a_bank[index[m]] (`_lora_a_row`)."""
    offs_m = tl.arange(0, 16)
    in_m = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    # programs start with grid axis 0 fastest: the low-rank programs (the first row tiles) run in the
    # first wave, their chain of loads under W's stream
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    r_tiles = (r + 15) // 16
    if HAS_A:
        # has_index 0 or 1; with an index, a rank tile per row. NOTE: written as a select of M, sm_80's
        # "ones" compile of the pair-table path spilled a register (tests/test_compile.py)
        a_tiles = r_tiles + has_index * (M - 1) * r_tiles
        is_a = pid_n < a_tiles
        pid_n = tl.where(is_a, pid_n, pid_n - a_tiles)
    else:
        is_a = False
    pid_k = pid_k.to(tl.int64)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if is_a:
        if has_index:
            _lora_a_row(x_ptr, stride_xm, index_ptr, a_ptr, partial_ptr, pid_k, pid_n // r_tiles,
                        16 * (pid_n % r_tiles), k_start, k_end, M, N, r, stride_as, stride_ar,
                        A_BK if LUT and not MMA_V2 else A_BK // 2, SOFT_BF16)  # fmt: skip
        else:
            _lora_a_slice(x_rows, in_m, a_ptr, partial_ptr, pid_k, 16 * pid_n, k_start, k_end, M, N, r,
                          stride_ar, stride_ak, A_BK if LUT and not MMA_V2 else A_BK // 2, SOFT_BF16)  # fmt: skip
    elif LUT:
        _w_slice_lut(x_rows, in_m, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_offset_ptr, nested_code_ptr,
                     pairs_ptr, partial_ptr, pid_n.to(tl.int64), pid_k, M, N, KB, KB // 128, kb_per_split // 128,
                     DOUBLE_QUANT, BN, ASM, MMA_V2, DOT_F32, SOFT_BF16)  # fmt: skip
    else:
        _w_slice(x_rows, in_m, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_offset_ptr, nested_code_ptr,
                 pairs_ptr, code_ptr, partial_ptr, pid_n.to(tl.int64), pid_k, k_start, k_end, M, N, K, KB, log2_bs,
                 n_blocks, kb_per_split, ALIGNED, DOUBLE_QUANT, BN, BK, CODE_F32, DOT_F32, SOFT_BF16)  # fmt: skip


@triton.jit
def _lora_a_slice(x_rows, in_m, a_ptr, partial_ptr, pid_k, j0, k_start, k_end, M, N, r, stride_ar, stride_ak,
                  STEP: tl.constexpr, SOFT_BF16: tl.constexpr):  # fmt: skip
    """xa[pid_k][:, j0 .. j0 + 16] = x[:, slice] @ A[j0 .. j0 + 16, slice]^T, exact fp32; a step's loads
    in flight together, the dot batched over 16-column groups."""
    xa_ptr = partial_ptr + tl.num_programs(0).to(tl.int64) * M * N
    offs_m = tl.arange(0, 16)
    rank = j0 + tl.arange(0, 16)
    in_j = rank < r
    a_rows = a_ptr + rank.to(tl.int64)[:, None] * stride_ar
    G: tl.constexpr = STEP // 16
    acc = tl.zeros((16, 16), dtype=tl.float32)  # [ranks, rows of x]
    for k0 in tl.range(k_start, k_end, STEP, num_stages=1):  # loads in flight together, no pipeliner
        offs_k = k0 + tl.arange(0, STEP)
        in_k = offs_k < k_end
        a = tl.load(a_rows + offs_k[None, :] * stride_ak, mask=in_j[:, None] & in_k[None, :], other=0.0)
        x = tl.load(x_rows + offs_k[None, :], mask=in_m[:, None] & in_k[None, :], other=0.0)
        a3 = tl.permute(tl.reshape(to_f32(a, SOFT_BF16), (16, G, 16)), (1, 0, 2))  # [group, rank, column]
        x3 = tl.permute(tl.reshape(to_f32(x, SOFT_BF16), (16, G, 16)), (1, 2, 0))  # [group, column, row]
        acc += tl.sum(tl.dot(a3, x3, input_precision="ieee"), axis=0)
    offs = (pid_k * M + offs_m[None, :]) * r + rank[:, None]
    tl.store(xa_ptr + offs, acc, mask=in_m[None, :] & in_j[:, None])


@triton.jit
def _lora_a_row(x_ptr, stride_xm, index_ptr, a_ptr, partial_ptr, pid_k, row, j0, k_start, k_end, M, N, r,
                stride_as, stride_ar, STEP: tl.constexpr, SOFT_BF16: tl.constexpr):  # fmt: skip
    """xa[pid_k][row, j0 .. j0 + 16] = x[row, slice] @ a_bank[index[row]][j0 .. j0 + 16, slice]^T, exact
    fp32; 0 without a read of A where index[row] < 0. The same [16, STEP] tile of A per step as
    `_lora_a_slice`, one row of x; products summed in place, reduced once after the loop."""
    xa_ptr = partial_ptr + tl.num_programs(0).to(tl.int64) * M * N
    row = row.to(tl.int64)
    slot = tl.load(index_ptr + row)
    k_stop = tl.where(slot >= 0, k_end, k_start)  # a base-only row: an empty loop, u = 0
    rank = j0 + tl.arange(0, 16)
    in_j = rank < r
    a_rows = a_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_as + rank.to(tl.int64)[:, None] * stride_ar
    x_row = x_ptr + row * stride_xm
    acc = tl.zeros((16, STEP), dtype=tl.float32)  # [ranks, columns]
    for k0 in tl.range(k_start, k_stop, STEP, num_stages=1):  # loads in flight together, no pipeliner
        offs_k = k0 + tl.arange(0, STEP)
        in_k = offs_k < k_end
        a = tl.load(a_rows + offs_k[None, :], mask=in_j[:, None] & in_k[None, :], other=0.0)  # contiguous rows
        x = tl.load(x_row + offs_k, mask=in_k, other=0.0)
        acc += to_f32(a, SOFT_BF16) * to_f32(x, SOFT_BF16)[None, :]
    offs = (pid_k * M + row) * r + rank
    tl.store(xa_ptr + offs, tl.sum(acc, axis=1), mask=in_j)


@triton.jit
def _w_slice(x_rows, in_m, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_offset_ptr, nested_code_ptr,
             pairs_ptr, code_ptr, partial_ptr, pid_n, pid_k, k_start, k_end, M, N, K, KB, log2_bs, n_blocks,
             kb_per_split, ALIGNED: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             CODE_F32: tl.constexpr, DOT_F32: tl.constexpr, SOFT_BF16: tl.constexpr):  # fmt: skip
    """partial[pid_k] = x[:, slice] @ dequant(W)[rows, slice]^T: the pair-table and general paths."""
    offs_m = tl.arange(0, 16)
    offs_n = pid_n * BN + tl.arange(0, BN)
    in_n = offs_n < N
    act = x_rows.dtype.element_ty
    acc = tl.zeros((BN, 16), dtype=tl.float32)  # transposed: W is the dot's A operand
    if ALIGNED:
        # K % 32 == 0: byte offsets of a step are row * KB + kb0 + [0, 16), with KB, the loop's start
        # (pid_k * kb_per_split) and step multiples of 16: what lets Triton emit 16-byte loads. Rows past
        # N read row N - 1 (their sums are never stored), so the loads need no mask.
        HALF: tl.constexpr = BK // 2
        rows = tl.minimum(offs_n, N - 1)
        row_bytes = packed_ptr + (rows * KB)[:, None] + tl.arange(0, HALF)[None, :]
        first_code = rows * K  # flat index of each row's first code
        kb_start = pid_k * kb_per_split
        kb_end = tl.minimum(kb_start + kb_per_split, KB)
        for kb0 in range(kb_start, kb_end, HALF):
            byte = tl.load(row_bytes + kb0)
            entry = tl.load(pairs_ptr + byte.to(tl.int32))
            if CODE_F32:
                even = (entry & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
                odd = (entry >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
            else:
                even = (entry & 0xFFFF).to(tl.uint16).to(act, bitcast=True)
                odd = ((entry >> 16) & 0xFFFF).to(tl.uint16).to(act, bitcast=True)
            w = tl.reshape(tl.join(even, odd), (BN, BK))  # [BN, BK] codes in natural order
            x = tl.load(x_rows + 2 * kb0 + tl.arange(0, BK)[None, :], mask=in_m[:, None], other=0.0)
            block = (first_code + 2 * kb0) >> log2_bs
            scale = _absmax(
                absmax_ptr, nested_absmax_ptr, nested_offset_ptr, nested_code_ptr, block, None, DOUBLE_QUANT
            )
            acc += _dot(w, x, DOT_F32, SOFT_BF16) * scale[:, None]
    else:
        for k0 in range(k_start, k_end, BK):
            offs_k = k0 + tl.arange(0, BK)
            in_k = offs_k < k_end
            f = offs_n[:, None] * K + offs_k[None, :]  # flat code index, int64
            valid = in_n[:, None] & in_k[None, :]
            byte = tl.load(packed_ptr + (f >> 1), mask=valid, other=0x77).to(tl.int32)
            nibble = tl.where((f & 1) == 0, byte >> 4, byte & 15)
            scale = _absmax(
                absmax_ptr,
                nested_absmax_ptr,
                nested_offset_ptr,
                nested_code_ptr,
                f >> log2_bs,
                valid & ((f >> log2_bs) < n_blocks),
                DOUBLE_QUANT,
            )
            w = round_to(tl.load(code_ptr + nibble) * scale, act, SOFT_BF16)  # as nf4.dequantize rounds it
            x = tl.load(x_rows + offs_k[None, :], mask=in_m[:, None] & in_k[None, :], other=0.0)
            acc += _dot(w, x, DOT_F32, SOFT_BF16)
    offs = (pid_k * M + offs_m[None, :]) * N + offs_n[:, None]
    tl.store(partial_ptr + offs, acc, mask=in_m[None, :] & in_n[:, None])


@triton.jit
def _w_slice_lut(x_rows, in_m, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_offset_ptr, nested_code_ptr,
                 pairs_ptr, partial_ptr, pid_n, pid_k, M, N, KB, KC, chunks_per_split, DOUBLE_QUANT: tl.constexpr,
                 BN: tl.constexpr, ASM: tl.constexpr, MMA_V2: tl.constexpr, DOT_F32: tl.constexpr,
                 SOFT_BF16: tl.constexpr):  # fmt: skip
    """partial[pid_k] = x[:, slice] @ dequant(W)[rows, slice]^T on the register-table path."""
    act = x_rows.dtype.element_ty
    # Fragment order: flat f = (((i*2 + h)*4 + w)*8 + g)*4 + t covers dot row 64i + 16w + 8h + g and the
    # 8 bytes [8t, 8t + 8) of its 32-byte block, the bytes thread (w, g, t) of the tensor-core operand
    # holds (wgmma / mma.sync A fragment; `_lut_dot` permutes the reduction order to match).
    f = tl.arange(0, 4 * BN)
    frag_row = 64 * (f // 256) + 16 * ((f // 32) % 4) + 8 * ((f // 128) % 2) + (f // 4) % 8
    frag_rows = tl.minimum(pid_n * BN + frag_row, N - 1)  # rows past N read row N - 1 (never stored)
    words = packed_ptr.to(tl.pointer_type(tl.int32))  # W read as int32 words: no byte shuffling in registers
    KW = KB // 4  # words per row (K % 256 == 0; a multiple of 4 where KB is known to be one of 16)
    w_ptrs = words + (frag_rows * KW + 2 * (f % 4))[:, None] + tl.arange(0, 2)[None, :]
    c_start = pid_k * chunks_per_split
    c_end = tl.minimum(c_start + chunks_per_split, KC)
    # absmax of the program's (at most LUT_CHUNKS = 4) chunks, decoded once: no gather from memory in the loop
    rows = tl.minimum(pid_n * BN + tl.arange(0, BN), N - 1)
    chunk0 = rows * KC + c_start  # the program's first chunk of each row, counted over the whole tensor
    ab = (absmax_ptr, nested_absmax_ptr, nested_offset_ptr, nested_code_ptr)
    a0 = _chunk_absmax(*ab, chunk0, 0, c_end - c_start, DOUBLE_QUANT)
    a1 = _chunk_absmax(*ab, chunk0, 1, c_end - c_start, DOUBLE_QUANT)
    a2 = _chunk_absmax(*ab, chunk0, 2, c_end - c_start, DOUBLE_QUANT)
    a3 = _chunk_absmax(*ab, chunk0, 3, c_end - c_start, DOUBLE_QUANT)
    acc = tl.zeros((BN, 16), dtype=tl.float32)  # transposed: W is the dot's A operand
    # W one chunk ahead (registers, no pipeliner): its loads are in flight during the compute
    w0n, w1n, w2n, w3n = _chunk_loads(w_ptrs, c_start, c_end)
    for c in range(c_start, c_end):
        w0, w1, w2, w3 = w0n, w1n, w2n, w3n
        w0n, w1n, w2n, w3n = _chunk_loads(w_ptrs, c + 1, c_end)
        local = c - c_start
        scale = tl.where(local == 0, a0, tl.where(local == 1, a1, tl.where(local == 2, a2, a3)))
        s02, s13 = tl.split(tl.reshape(scale, (BN, 2, 2)))
        s0, s2 = tl.split(s02)
        s1, s3 = tl.split(s13)
        x_ptrs = x_rows + 256 * c + tl.arange(0, 64)[None, :]
        acc += _lut_dot(w0, x_ptrs, in_m, pairs_ptr, act, BN, ASM, MMA_V2, DOT_F32, SOFT_BF16) * s0[:, None]
        acc += _lut_dot(w1, x_ptrs + 64, in_m, pairs_ptr, act, BN, ASM, MMA_V2, DOT_F32, SOFT_BF16) * s1[:, None]
        acc += _lut_dot(w2, x_ptrs + 128, in_m, pairs_ptr, act, BN, ASM, MMA_V2, DOT_F32, SOFT_BF16) * s2[:, None]
        acc += _lut_dot(w3, x_ptrs + 192, in_m, pairs_ptr, act, BN, ASM, MMA_V2, DOT_F32, SOFT_BF16) * s3[:, None]
    offs_m = tl.arange(0, 16)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs = (pid_k * M + offs_m[None, :]) * N + offs_n[:, None]
    tl.store(partial_ptr + offs, acc, mask=in_m[None, :] & (offs_n < N)[:, None])


@triton.jit
def _chunk_loads(w_ptrs, c, c_end):
    """Chunk c's 4 blocks of every row; nothing read past c_end (a tensor mask, for the interpreter)."""
    w_in = tl.full(w_ptrs.shape, c, tl.int32) < c_end
    w0 = tl.load(w_ptrs + 32 * c, mask=w_in, other=0)
    w1 = tl.load(w_ptrs + (32 * c + 8), mask=w_in, other=0)
    w2 = tl.load(w_ptrs + (32 * c + 16), mask=w_in, other=0)
    w3 = tl.load(w_ptrs + (32 * c + 24), mask=w_in, other=0)
    return w0, w1, w2, w3


@triton.jit
def _chunk_absmax(absmax_ptr, nested_absmax_ptr, nested_offset_ptr, nested_code_ptr, chunk0, local, chunks,
                  DOUBLE_QUANT: tl.constexpr):  # fmt: skip
    """float32 absmax [BN, 4] of chunk chunk0 + local of each row; 0 where local >= chunks."""
    chunk = chunk0 + local
    valid = tl.full(chunk.shape, local, tl.int32) < chunks
    block = (4 * chunk)[:, None] + tl.arange(0, 4)[None, :]
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=valid[:, None], other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + chunk // 64, mask=valid, other=0.0)  # block // 256
        return tl.where(
            valid[:, None], tl.load(nested_code_ptr + q) * nested[:, None] + tl.load(nested_offset_ptr), 0.0
        )
    else:
        return tl.load(absmax_ptr + block, mask=valid[:, None], other=0.0)


@triton.jit
def _lut_dot(word, x_ptrs, in_m, pairs_ptr, act: tl.constexpr, BN: tl.constexpr, ASM: tl.constexpr,
             MMA_V2: tl.constexpr, DOT_F32: tl.constexpr, SOFT_BF16: tl.constexpr):  # fmt: skip
    """One 64-code block: words [4 BN, 2] -> [BN, 64] values in `act`, dotted with x permuted alike."""
    p0, p1, p2, p3 = pair_lookup(tl.reshape(word, (BN, 4, 2)), pairs_ptr, ASM)
    # join appends the new axis last: [..., a, s] holds byte 2a + s of the word, so j = 4 * word + byte
    pair = tl.reshape(tl.join(tl.join(p0, p2), tl.join(p1, p3)), (BN, 4, 8))
    # fragment order (i, h, w, g) -> dot row 64i + 16w + 8h + g; then byte 8t + j of a block -> dot pair
    pair = tl.reshape(tl.permute(tl.reshape(pair, (BN // 64, 2, 4, 8, 4, 8)), (0, 2, 1, 3, 4, 5)), (BN, 4, 8))
    if MMA_V2:  # byte 8t + 2 jh + jl -> dot pair 8 jh + 2t + jl
        pair = tl.reshape(tl.permute(tl.reshape(pair, (BN, 4, 4, 2)), (0, 2, 1, 3)), (BN, 32))
    else:  # byte 8t + j -> dot pair 4j + t
        pair = tl.reshape(tl.permute(pair, (0, 2, 1)), (BN, 32))
    even = pair.to(tl.int16).to(act, bitcast=True)
    odd = (pair >> 16).to(tl.int16).to(act, bitcast=True)
    w = tl.reshape(tl.join(even, odd), (BN, 64))
    x = tl.load(x_ptrs, mask=in_m[:, None], other=0.0)  # [16, 64] in memory order
    if MMA_V2:  # column 2 (8t + 2 jh + jl) + e -> 2 (8 jh + 2t + jl) + e
        x = tl.reshape(tl.permute(tl.reshape(x, (16, 4, 4, 2, 2)), (0, 2, 1, 3, 4)), (16, 64))
    else:  # column 2 (8t + j) + e -> 2 (4j + t) + e
        x = tl.reshape(tl.permute(tl.reshape(x, (16, 4, 8, 2)), (0, 2, 1, 3)), (16, 64))
    return _dot(w, x, DOT_F32, SOFT_BF16)


@triton.jit
def _sum_slices(ptr, tile, mask, split, stride_split):
    """sum over s < split of ptr[s * stride_split + tile], SPLITS_PER_STEP loads per step; int64 offsets
    without `.to()` (stride_split is i32, or a plain int if 1)."""
    total = tl.zeros(tile.shape, dtype=tl.float32)
    stride64 = tl.zeros((), tl.int64) + stride_split
    slice_off = tl.zeros((), tl.int64)  # a scalar, not a tensor of pointers: no layout change in the loop
    for s0 in range(0, split, SPLITS_PER_STEP):
        part = tl.zeros(tile.shape, dtype=tl.float32)
        for t in tl.static_range(SPLITS_PER_STEP):
            in_split = tl.full(tile.shape, s0 + t, tl.int32) < split  # a tensor: the interpreter rejects a bool
            part += tl.load(ptr + (slice_off + t * stride64) + tile, mask=mask & in_split, other=0.0)
        total += part
        slice_off += SPLITS_PER_STEP * stride64
    return total


@triton.jit(do_not_specialize=["M", "has_bias", "has_index"])
def _nf4_gemv_epilogue_kernel(
    partial_ptr,
    u_ptr,
    v_ptr,
    bias_ptr,
    index_ptr,
    scales_ptr,
    out_ptr,
    M,
    N,
    r,
    split,
    stride_split,
    stride_um,
    stride_ur,
    stride_vs,
    stride_vr,
    stride_vn,
    has_bias,
    has_index,
    lora_scale,
    BN: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    FUSED_U: tl.constexpr,
):
    """out = sum_s partial[s] + (u @ v) * lora_scale + bias, rounded once (u from partial's tail with FUSED_U;
    with FUSED_U and has_index, row m's v and scale are v_bank[index[m]] and scales[index[m]], `_lora_rows`).
    Latency-bound: SPLITS_PER_STEP slices and 16 ranks per step (`epilogue_round_trips`,
    tests/test_gemv.py::test_epilogue_keeps_the_split_loads_in_flight). N stays specialised: 16-byte loads."""
    offs_m = tl.arange(0, 16)
    offs_n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    in_m = offs_m < M
    in_n = offs_n < N
    inside = in_m[:, None] & in_n[None, :]
    tile = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    # the rows' slots (no load without an index): issued before the slices' sum, which hides their round trip
    indexed = tl.full(in_m.shape, has_index, tl.int32) != 0  # a tensor: the interpreter rejects a bool
    slot = tl.load(index_ptr + offs_m.to(tl.int64), mask=in_m & indexed, other=-1)
    acc = _sum_slices(partial_ptr, tile, inside, split, stride_split)
    xa_ptr = partial_ptr + (tl.zeros((), tl.int64) + split) * stride_split  # FUSED_U: u's slices follow W's
    if FUSED_U:
        if has_index:  # uniform per launch: one branch per program, outside the split loop
            lora = _lora_rows(xa_ptr, slot, scales_ptr, v_ptr, offs_m, in_m, offs_n, in_n, M, r, split, stride_vs,
                              stride_vr, SOFT_BF16)  # fmt: skip
        else:
            lora = _lora_shared(xa_ptr, u_ptr, v_ptr, offs_m, in_m, offs_n, in_n, M, r, split, stride_um,
                                stride_ur, stride_vr, stride_vn, lora_scale, BN, SOFT_BF16, FUSED_U)  # fmt: skip
    else:
        lora = _lora_shared(xa_ptr, u_ptr, v_ptr, offs_m, in_m, offs_n, in_n, M, r, split, stride_um, stride_ur,
                            stride_vr, stride_vn, lora_scale, BN, SOFT_BF16, FUSED_U)  # fmt: skip
    acc += lora
    if has_bias:
        acc += to_f32(tl.load(bias_ptr + offs_n, mask=in_n, other=0.0), SOFT_BF16)[None, :]
    tl.store(out_ptr + tile, round_to(acc, out_ptr.dtype.element_ty, SOFT_BF16), mask=inside)


@triton.jit
def _lora_shared(xa_ptr, u_ptr, v_ptr, offs_m, in_m, offs_n, in_n, M, r, split, stride_um, stride_ur, stride_vr,
                 stride_vn, lora_scale, BN: tl.constexpr, SOFT_BF16: tl.constexpr, FUSED_U: tl.constexpr):  # fmt: skip
    """(u @ v) * lora_scale [16, BN], v shared by the rows: 16 ranks per step."""
    offs_r = tl.arange(0, 16)
    v_ptrs = v_ptr + offs_r.to(tl.int64)[:, None] * stride_vr + offs_n[None, :] * stride_vn
    lora = tl.zeros((16, BN), dtype=tl.float32)  # its own accumulator: the dot's layout stays out of the sums
    xa_tile = offs_m.to(tl.int64)[:, None] * r + offs_r[None, :]
    u_ptrs = u_ptr + offs_m.to(tl.int64)[:, None] * stride_um + offs_r[None, :] * stride_ur
    for r0 in range(0, r, 16):
        in_r = offs_r < r - r0
        if FUSED_U:
            u = _sum_slices(xa_ptr + r0, xa_tile, in_m[:, None] & in_r[None, :], split, M * r)
        else:
            u = to_f32(tl.load(u_ptrs, mask=in_m[:, None] & in_r[None, :], other=0.0), SOFT_BF16)
            u_ptrs += 16 * stride_ur
        v = to_f32(tl.load(v_ptrs, mask=in_r[:, None] & in_n[None, :], other=0.0), SOFT_BF16)
        lora = tl.dot(u, v, lora, input_precision="ieee")
        v_ptrs += 16 * stride_vr
    return lora * lora_scale


GATHER_RANKS = 8
"""Ranks per step of `_lora_rows` (its literal 8): 8 gathered [16, EPILOGUE_BN] tiles of v in flight, 64
registers a thread in float32. NOTE: 16 took stack on sm_90 for unaligned tensors (tests/test_compile.py)."""


@triton.jit
def _lora_rows(xa_ptr, slot, scales_ptr, v_ptr, offs_m, in_m, offs_n, in_n, M, r, split, stride_vs, stride_vr,
               SOFT_BF16: tl.constexpr):  # fmt: skip
    """scales[i] * u[m] @ v_bank[i] per row m, i = index[m] (0 where i < 0: no read of v), [16, BN] fp32.
    Per GATHER_RANKS ranks: the gathered [16, BN] tiles of v issued first (no dependence between them), then u
    summed over the slices as `_lora_shared` does, split into its columns in registers, and FMA'd."""
    live = in_m & (slot >= 0)
    slot = tl.maximum(slot, 0).to(tl.int64)
    offs_r = tl.arange(0, 8)
    v_ptrs = v_ptr + slot[:, None] * stride_vs + offs_n[None, :]  # a bank's rows are contiguous: vector loads
    xa_tile = offs_m.to(tl.int64)[:, None] * r + offs_r[None, :]
    lora = tl.zeros((16, offs_n.shape[0]), dtype=tl.float32)
    for r0 in range(0, r, 8):
        left = r - r0
        v0 = _gathered_v(v_ptrs, 0, left, stride_vr, live, in_n, SOFT_BF16)
        v1 = _gathered_v(v_ptrs, 1, left, stride_vr, live, in_n, SOFT_BF16)
        v2 = _gathered_v(v_ptrs, 2, left, stride_vr, live, in_n, SOFT_BF16)
        v3 = _gathered_v(v_ptrs, 3, left, stride_vr, live, in_n, SOFT_BF16)
        v4 = _gathered_v(v_ptrs, 4, left, stride_vr, live, in_n, SOFT_BF16)
        v5 = _gathered_v(v_ptrs, 5, left, stride_vr, live, in_n, SOFT_BF16)
        v6 = _gathered_v(v_ptrs, 6, left, stride_vr, live, in_n, SOFT_BF16)
        v7 = _gathered_v(v_ptrs, 7, left, stride_vr, live, in_n, SOFT_BF16)
        # base-only rows' u is 0 (`_lora_a_row`): the mask needs no slot
        u = _sum_slices(xa_ptr + r0, xa_tile, in_m[:, None] & (offs_r < left)[None, :], split, M * r)
        # u's columns: rank 2i + b of a [16, 2c] tile is column i of its b-th half (`_halves`)
        e, o = _halves(u)
        ee, eo = _halves(e)
        oe, oo = _halves(o)
        u0, u4 = tl.split(ee)  # [16, 2] -> two [16]
        u2, u6 = tl.split(eo)
        u1, u5 = tl.split(oe)
        u3, u7 = tl.split(oo)
        lora += u0[:, None] * v0
        lora += u1[:, None] * v1
        lora += u2[:, None] * v2
        lora += u3[:, None] * v3
        lora += u4[:, None] * v4
        lora += u5[:, None] * v5
        lora += u6[:, None] * v6
        lora += u7[:, None] * v7
        v_ptrs += 8 * stride_vr
    return lora * tl.load(scales_ptr + slot, mask=live, other=0.0)[:, None]


@triton.jit
def _halves(t):
    """[rows, 2c] -> its columns 2i and 2i + 1, each [rows, c]."""
    return tl.split(tl.reshape(t, (t.shape[0], t.shape[1] // 2, 2)))


@triton.jit
def _gathered_v(v_ptrs, j: tl.constexpr, left, stride_vr, live, in_n, SOFT_BF16: tl.constexpr):
    """Rank j of the step of v_bank[index[m]] for each row m, [16, BN] fp32 (0 past the `left` ranks remaining)."""
    in_r = tl.full(live.shape, j, tl.int32) < left  # a tensor: the interpreter rejects a bool
    inside = (live & in_r)[:, None] & in_n[None, :]
    return to_f32(tl.load(v_ptrs + j * stride_vr, mask=inside, other=0.0), SOFT_BF16)


# --------------------------------------------------------------------------------------------------
# configurations (for the ahead-of-time report)


def _main_signature(dtype: torch.dtype, double_quant: bool, a_dtype: torch.dtype) -> dict[str, str]:
    return {
        "x_ptr": ptr_type(dtype),
        "packed_ptr": "*u8",
        "absmax_ptr": "*u8" if double_quant else "*fp32",
        "nested_absmax_ptr": "*fp32",
        "nested_offset_ptr": "*fp32",
        "nested_code_ptr": "*fp32",
        "pairs_ptr": "*i64" if dtype == torch.float32 else "*i32",
        "code_ptr": "*fp32",
        "partial_ptr": "*fp32",
        "a_ptr": ptr_type(a_dtype),
        "index_ptr": "*i32",
        "M": "i32",
        "N": "i32",
        "K": "i64",
        "KB": "i64",
        "stride_xm": "i64",
        "log2_bs": "i32",
        "n_blocks": "i64",
        "k_per_split": "i64",
        "kb_per_split": "i64",
        "r": "i32",
        "stride_as": "i64",
        "stride_ar": "i64",
        "stride_ak": "i64",
        "has_index": "i32",
    }


def lut_applies(dtype: torch.dtype, k: int, blocksize: int) -> bool:
    """The register-table path: fp16/bf16, blocksize 64 (transformers' default), K % 256 == 0."""
    return dtype in (torch.float16, torch.bfloat16) and blocksize == 64 and k % LUT_BK == 0


def step_k(k: int, blocksize: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Reduction elements per step: LUT_BK (`lut_applies`); 64 where blocksize >= 64 and K % 64 == 0 (half
    the per-byte overhead of 32); else 32."""
    if lut_applies(dtype, k, blocksize):
        return LUT_BK
    return 64 if blocksize >= 64 and k % 64 == 0 else BK


def mma_v2(device: torch.device) -> bool:
    """Whether the dot uses mma.sync (sm_80 / sm_89), not wgmma. NOTE: triton 3.6 picks mma.sync on
    sm_90 for 8 rows: keep 16."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9


def fuses_a(dtype: torch.dtype, aligned: bool) -> bool:
    """Whether the streaming kernel computes x @ A^T: fp16/bf16, aligned. NOTE: `HAS_A` compiles it in
    only there; everywhere it gave stack frames (tests/test_compile.py)."""
    return aligned and dtype != torch.float32


def _main_constexprs(
    dtype: torch.dtype,
    aligned: bool,
    double_quant: bool,
    soft_bf16: bool,
    bk: int,
    has_a: bool = False,
    mma_v2: bool = False,
) -> dict:
    lut = bk == LUT_BK
    return dict(
        HAS_A=has_a,
        ALIGNED=aligned,
        DOUBLE_QUANT=double_quant,
        BN=(LUT_BN_V2 if mma_v2 else LUT_BN) if lut else block_n(dtype, aligned),
        BK=bk,
        CODE_F32=dtype == torch.float32,
        DOT_F32=soft_bf16 or dtype == torch.float32,
        SOFT_BF16=soft_bf16,
        LUT=lut,
        ASM=PAIR_ASM[dtype] if lut and not soft_bf16 else "",
        MMA_V2=lut and mma_v2,
    )


# NOTE: fp fusion on (the other kernels turn it off): `acc += partial * absmax` is one FFMA; the fused
# absmax decode may differ from `nf4.dequantize` by 1 ulp of a float32 absmax, inside tests/test_gemv.py's
# tolerance.
_OPTIONS = {"num_warps": NUM_WARPS, "num_stages": 3, "enable_fp_fusion": True}


def _options(aligned: bool, dtype: torch.dtype, bk: int) -> dict:
    """Compile options: 3 stages on the 64-column pair-table path, 1 where the kernel prefetches itself
    or fp32, else 2. NOTE: others took stack (tests/test_compile.py)."""
    if bk == LUT_BK or (dtype == torch.float32 and aligned):
        stages = 1  # the register-table path prefetches W into registers itself (no shared memory)
    else:
        stages = 3 if aligned and bk == 64 else 2
    return {**_OPTIONS, "num_stages": stages}


def _epilogue_signature(dtype: torch.dtype, v_dtype: torch.dtype, bias_dtype: torch.dtype) -> dict[str, str]:
    act = ptr_type(dtype)
    return {
        "partial_ptr": "*fp32",
        "u_ptr": act,
        "v_ptr": ptr_type(v_dtype),
        "bias_ptr": ptr_type(bias_dtype),
        "index_ptr": "*i32",
        "scales_ptr": "*fp32",
        "out_ptr": act,
        "M": "i32",
        "N": "i32",
        "r": "i32",
        "split": "i32",
        "stride_split": "i64",
        "stride_um": "i64",
        "stride_ur": "i64",
        "stride_vs": "i64",
        "stride_vr": "i64",
        "stride_vn": "i64",
        "has_bias": "i32",
        "has_index": "i32",
        "lora_scale": "fp32",
    }


def gemv_configs() -> list[LaunchConfig]:
    """Every compiled variant `nf4_gemv` can launch on a GPU."""
    out = []
    for dtype in TL_DTYPES:
        dname = ptr_type(dtype)[1:]
        lut = ((True, LUT_BK, False), (True, LUT_BK, True)) if dtype != torch.float32 else ()
        for aligned, bk, mma_v2 in lut + ((True, 64, False), (True, 32, False), (False, 32, False)):
            # without the low-rank program (x stands in for A), and for fp16/bf16 on the aligned path with
            # it (`fuses_a`): A in x's dtype or float32 (the default adapter dtype)
            a_dtypes = [None] + (list(dict.fromkeys((dtype, torch.float32))) if fuses_a(dtype, aligned) else [])
            for double_quant, a_dtype in itertools.product((False, True), a_dtypes):
                a_name = "" if a_dtype is None else f",A={ptr_type(a_dtype)[1:]}"
                constexprs = _main_constexprs(dtype, aligned, double_quant, False, bk, a_dtype is not None, mma_v2)
                mma_name = (",mma=v2" if mma_v2 else ",mma=v3") if bk == LUT_BK else ""
                out.append(
                    LaunchConfig(
                        name=f"nf4_gemv[{dname},aligned={int(aligned)},dq={int(double_quant)},"
                        f"BN={constexprs['BN']},BK={bk}{mma_name}{a_name}]",
                        kernel=_nf4_gemv_kernel,
                        signature=_main_signature(dtype, double_quant, a_dtype or dtype),
                        constexprs=constexprs,
                        options=_options(aligned, dtype, bk),
                        aligned_only=True,
                        archs=((80,) if mma_v2 else (90,)) if bk == LUT_BK else (),
                    )
                )
        # u = x_d @ A^T comes in x's dtype (or as the streaming kernel's float32 slices, `fused_u`); B^T and
        # the bias in x's dtype or float32 (the adapter's and the layer's own dtypes, read as they are)
        fused_u = (False, True) if fuses_a(dtype, True) else (False,)
        for v_dtype, bias_dtype, fused in itertools.product(*[dict.fromkeys((dtype, torch.float32))] * 2, fused_u):
            out.append(
                LaunchConfig(
                    name=f"nf4_gemv[epilogue,{dname},v={ptr_type(v_dtype)[1:]},bias={ptr_type(bias_dtype)[1:]},"
                    f"BN={EPILOGUE_BN}{',fused_u' if fused else ''}]",
                    kernel=_nf4_gemv_epilogue_kernel,
                    signature=_epilogue_signature(dtype, v_dtype, bias_dtype),
                    constexprs={"BN": EPILOGUE_BN, "SOFT_BF16": False, "FUSED_U": fused},
                    options={"num_warps": NUM_WARPS, "enable_fp_fusion": True},
                )
            )
    return out


# --------------------------------------------------------------------------------------------------
# launcher


def activation_pair_table(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """Byte b -> (NF4[b >> 4], NF4[b & 15]): int32 of two fp16/bf16 halves (the even code low), or int64
    of two float32 words for fp32."""
    from nf4.codebook import NF4_CODE

    byte = torch.arange(256)
    if dtype == torch.float32:
        bits = NF4_CODE.to(torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        table = bits[byte >> 4] | (bits[byte & 15] << 32)
    else:
        bits = NF4_CODE.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
        table = (bits[byte >> 4] | (bits[byte & 15] << 16)).to(torch.int64)
        table = torch.where(table >= 2**31, table - 2**32, table).to(torch.int32)
    return table.to(device)


@functools.cache
def _constants(device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Per-(device, dtype) constants: pair table and PRMT words, NF4 table, a stand-in pointer."""
    from nf4.codebook import NF4_CODE

    pairs = activation_pair_table(dtype, device)
    if dtype != torch.float32:  # the register words of `pair_lookup` after the 256 pair entries
        words = torch.tensor(lut_words(dtype), dtype=torch.int64)
        pairs = torch.cat([pairs, torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).to(device)])
    return {
        "pairs": pairs,
        "code": NF4_CODE.to(device=device, dtype=torch.float32),
        "none_f32": torch.empty(0, device=device),
        "none_i32": torch.empty(0, dtype=torch.int32, device=device),
    }


# --------------------------------------------------------------------------------------------------
# cost model: chooses split-K here, predicts GPU time in `benchmarks/static/sass.py` (H200 figures)

BANDWIDTH = 4.1e12
"""bytes/s: the H200's copy bandwidth (benchmarks/results/2026-11-29-h200/README.md)."""
H200_SMS = 132
LAUNCH_US = 2.0
"""Assumed GPU time per kernel of a graph replay besides its work."""
L2_ROUND_TRIP_US = 0.3
"""Assumed time of a dependent load that hits L2."""
DRAM_LATENCY_US = 1.0
"""Loaded DRAM latency with margin: per Little's law, in flight per SM = BANDWIDTH / SMs x this."""
MIN_STEPS = 4
"""Each program walks at least this many steps."""
MODEL_RANK = 16
"""The adapter rank the split choice assumes."""


def epilogue_round_trips(split: int, r: int, fused_u: bool = True) -> int:
    """Dependent L2 round trips of the epilogue (see `_nf4_gemv_epilogue_kernel`)."""
    steps = cdiv(split, SPLITS_PER_STEP.value)
    return steps + cdiv(r, 16) * (1 + steps * fused_u) + 1


LUT_RESIDENT = 2
"""Register-table programs per H200 SM: ~175 registers x 128 threads each, of 65536."""


def in_flight_bytes(bn: int, bk: int, stages: int) -> int:
    """Bytes of W a program has in flight: `stages - 1` steps, at least one."""
    return bn * bk // 2 * max(1, stages - 1)


def model_us(n, k, m=1, r=MODEL_RANK, split=1, sms=H200_SMS, blocksize=64, double_quant=True, issue_us=0.0, bk=None):
    """Predicted GPU time (us, CUDA-graph replay) of a bf16 decode call with a float32 adapter:
    max(memory, issue_us) + fixed (`memory_us`; `issue_us` from benchmarks/static/sass.py)."""
    t_mem, fixed = memory_us(n, k, m, r, split, sms, blocksize, double_quant, bk)
    return max(t_mem, issue_us) + fixed


def memory_us(n, k, m=1, r=MODEL_RANK, split=1, sms=H200_SMS, blocksize=64, double_quant=True, bk=None):
    """(memory, fixed) time (us) of a decode call:

        bytes  = n*k/2 + n*k/blocksize * (1 + 4/256 with double quant, else 4)     codes, absmax
               + 2*m*k + 4*r*(k + n) + 2*m*n + 2*n + 8*split*m*(n + r)             x, A, B, out, bias, partials
        eff    = min(1, resident programs per SM * in_flight_bytes / (BANDWIDTH / H200_SMS * DRAM_LATENCY_US))
        memory = bytes / (BANDWIDTH * eff)
        fixed  = epilogue_round_trips(split, r) * L2_ROUND_TRIP_US + 2 * LAUNCH_US

    Not modelled: the tail of an uneven wave."""
    bk = bk or step_k(k, blocksize)
    lut = bk == LUT_BK
    bn = LUT_BN if lut else block_n(torch.bfloat16)
    absmax = n * k / blocksize * ((1 + 4 / 256) if double_quant else 4)
    other = 2 * m * k + 4 * r * (k + n) + 2 * m * n + 2 * n + 8 * split * m * (n + r)
    programs = cdiv(n, bn) * split
    resident = min(programs / sms, LUT_RESIDENT) if lut else programs / sms
    need = BANDWIDTH / H200_SMS * DRAM_LATENCY_US * 1e-6
    eff = min(1.0, resident * in_flight_bytes(bn, bk, _options(True, torch.bfloat16, bk)["num_stages"]) / need)
    t_mem = (n * k / 2 + absmax + other) / (BANDWIDTH * eff) * 1e6
    return t_mem, epilogue_round_trips(split, r) * L2_ROUND_TRIP_US + 2 * LAUNCH_US


def effective_split(k: int, split: int, bk: int) -> int:
    """The split-K factor a launch really gets: slices are whole steps."""
    return cdiv(k, cdiv(cdiv(k, split), bk) * bk)


@functools.lru_cache(maxsize=4096)
def choose_split(n: int, k: int, m: int, bk: int, sms: int) -> int:
    """The split-K factor `model_us` predicts fastest (the smallest among equals)
    (tests/test_gemv.py::test_split_choice_keeps_w_in_flight_and_partial_sums_small)."""
    best = (float("inf"), 1)
    for split in split_candidates(k, bk):
        best = min(best, (model_us(n, k, m, split=split, sms=sms, bk=bk), split))
    return best[1]


def split_candidates(k: int, bk: int) -> list[int]:
    """Split-K factors of whole-step slices, >= MIN_STEPS steps (register table: 1 .. LUT_CHUNKS)."""
    if bk == LUT_BK:
        return sorted({effective_split(k, s, bk) for s in range(cdiv(k, LUT_CHUNKS * bk), k // bk + 1)})
    return sorted({effective_split(k, s, bk) for s in range(1, max(1, k // (bk * MIN_STEPS)) + 1)})


def split_for(n: int, k: int, m: int, bk: int, device: torch.device) -> int:
    """Split-K factor of a launch: `choose_split` on CUDA, 1 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 1
    return choose_split(n, k, m, bk, multiprocessors(device))


def nf4_gemv(
    x: torch.Tensor,
    weight,
    *,
    u: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    split: int | None = None,
    a: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ dequant(weight)^T + (u @ v) * lora_scale + bias` for M <= 16, in two launches, no host read.

    x [M, K] fp32/fp16/bf16; weight [N, K]; u [M, r] and v [r, N] (or A [r, K] as `a`: u = x @ a^T in the
    kernel), bias [N]: any strides and float dtypes, or None. split: split-K (tests). Returns [M, N], x's dtype."""
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
    if m > MAX_M:
        raise ValueError(f"nf4_gemv takes at most {MAX_M} rows, got M = {m}; use nf4.kernels.matmul.nf4_matmul")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the weight is on {weight.device}; move one of them")
    if u is not None and a is not None:
        raise ValueError("pass u [M, r] or a [r, K] (u = x @ a^T), not both")
    lhs = u if a is None else a
    if (lhs is None) != (v is None):
        raise ValueError("pass both u [M, r] (or a [r, K]) and v [r, N] for the low-rank term, or neither")
    if a is not None and (a.dim() != 2 or v.dim() != 2 or a.shape[1] != k or v.shape != (a.shape[0], n)):
        raise ValueError(f"expected a [r, {k}] and v [r, {n}], got a {list(a.shape)} and v {list(v.shape)}")
    if u is not None and (u.dim() != 2 or v.dim() != 2 or u.shape[0] != m or v.shape != (u.shape[1], n)):
        raise ValueError(f"expected u [{m}, r] and v [r, {n}], got u {list(u.shape)} and v {list(v.shape)}")
    if a is not None and a.dtype not in TL_DTYPES:
        raise TypeError(f"a must be float32, float16 or bfloat16, got {a.dtype}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"expected bias of shape [{n}], got {list(bias.shape)}")

    return launch(x, weight, u, v, bias, lora_scale, split, a)


class _Plan(NamedTuple):
    """A launch's shape-, dtype- and device-dependent parts (cached)."""

    grid: tuple[int, int]
    epilogue_grid: tuple[int]
    split: int
    scalars: tuple[int, ...]  # log2_bs, n_blocks, k_per_split, kb_per_split (after M, N, K, KB, stride_xm)
    meta: dict  # constexprs and compile options of the streaming kernel
    epilogue_meta: dict


@functools.lru_cache(maxsize=4096)
def _plan(m, n, k, dtype, device, blocksize, double_quant, split, a_tiles) -> _Plan:
    interpret = INTERPRET or device.type != "cuda"
    aligned = k % BK == 0
    bk = step_k(k, blocksize, dtype) if aligned else BK
    bn = (LUT_BN_V2 if mma_v2(device) else LUT_BN) if bk == LUT_BK else block_n(dtype, aligned)
    if split is None:
        split = split_for(n, k, m, bk, device)
    if bk == LUT_BK:  # a slice decodes the absmax of at most LUT_CHUNKS chunks before its loop
        split = max(split, cdiv(k, LUT_CHUNKS * bk))
    k_per_split = cdiv(cdiv(k, split), bk) * bk
    split = cdiv(k, k_per_split)
    return _Plan(
        grid=(split, a_tiles + cdiv(n, bn)),  # with A: ceil(r / 16) more row tiles first, the low-rank programs
        epilogue_grid=(cdiv(n, EPILOGUE_BN),),
        split=split,
        scalars=(blocksize.bit_length() - 1, cdiv(n * k, blocksize), k_per_split, k_per_split // 2),
        meta={
            **_main_constexprs(dtype, aligned, double_quant, interpret, bk, bool(a_tiles), mma_v2(device)),
            **_options(aligned, dtype, bk),
        },
        epilogue_meta=dict(BN=EPILOGUE_BN, SOFT_BF16=interpret, num_warps=NUM_WARPS, enable_fp_fusion=True),
    )


def launch(x, weight, u, v, bias, lora_scale, split=None, a=None) -> torch.Tensor:
    """`nf4_gemv` without its argument checks (for `nf4.kernels.matmul`, whose callers checked them)."""
    return _launch(x, weight, u, v, bias, lora_scale, split, a)


def adapters_fuse(x_dtype: torch.dtype, k: int) -> bool:
    """Whether `launch_adapters` applies: fp16/bf16 x, K % 32 == 0 (`fuses_a`: the compiled kernels with
    the low-rank programs)."""
    return fuses_a(x_dtype, k % BK == 0)


def launch_adapters(x, weight, a_bank, v_bank, scales, index, bias, split=None) -> torch.Tensor:
    """y[m] = x[m] @ dequant(W)^T + bias + scales[i] * (x[m] @ a_bank[i]^T) @ v_bank[i], i = index[m] (the
    last term 0 where i < 0), for M <= 16, in the two launches of `nf4_gemv` and no host read.

    x [M, K] fp16/bf16 with K % 32 == 0 (`adapters_fuse`); a_bank [S, R, K] and v_bank [S, R, N] (B^T per
    slot, ranks below R zero-padded), R >= 1, float32 or x's dtype; scales [S] float32; index [M] int32 or
    int64 with values in [-1, S): the caller guarantees the range (nothing on the device checks it, and no
    value is read back). Row m's x @ A^T are ceil(R / 16) more programs per K-slice (`_lora_a_row`), its
    v and scale gathered in the epilogue (`_lora_rows`). Returns [M, N] in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    if not adapters_fuse(x.dtype, k) or m > MAX_M:
        raise ValueError(
            f"launch_adapters takes fp16/bf16 x with K % {BK} == 0 and M <= {MAX_M}, got {x.dtype}, K = {k}, "
            f"M = {m}; check adapters_fuse first and route other cases to the unfused path"
        )
    if a_bank.dim() != 3 or v_bank.dim() != 3 or a_bank.shape[2] != k or v_bank.shape[2] != n:
        raise ValueError(f"expected a_bank [S, R, {k}] and v_bank [S, R, {n}], got {list(a_bank.shape)} and "
                         f"{list(v_bank.shape)}")  # fmt: skip
    if a_bank.shape[:2] != v_bank.shape[:2] or 0 in a_bank.shape[:2]:
        raise ValueError(f"a_bank and v_bank must share S >= 1 and R >= 1, got {list(a_bank.shape)} and "
                         f"{list(v_bank.shape)}")  # fmt: skip
    for name, t in (("a_bank", a_bank), ("v_bank", v_bank)):
        if t.dtype not in (torch.float32, x.dtype):
            raise TypeError(f"{name} must be float32 or x's dtype {x.dtype}, got {t.dtype}")
    if tuple(scales.shape) != (a_bank.shape[0],) or scales.dtype != torch.float32:
        raise ValueError(f"expected scales float32 [{a_bank.shape[0]}], got {scales.dtype} {list(scales.shape)}")
    if tuple(index.shape) != (m,) or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expected index int32 or int64 [{m}], got {index.dtype} {list(index.shape)}")
    # contiguous rows (the kernels read a bank's rows with unit stride); no copy where they already are
    bank = (index.to(torch.int32).contiguous(), scales.contiguous())
    return _launch(x, weight, None, v_bank.contiguous(), bias, 1.0, split, a_bank.contiguous(), bank)


def _launch(x, weight, u, v, bias, lora_scale, split=None, a=None, bank=None) -> torch.Tensor:
    """Both launches; `bank` (index int32 [M], scales [S]): a and v are a_bank [S, R, K] and v_bank [S, R, N]."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    constants = _constants(x.device, x.dtype)
    if bank is not None:  # a_bank[index[m]] for row m: strides of one slot, the slot's stride apart
        index, scales = bank
        a_slot, v_slot = a, v
        a, v = a[0], v[0]  # one slot: R and the strides within a slot
        index_args = (index, a_slot.stride(0), 1)
    else:
        index, scales, a_slot, v_slot = constants["none_i32"], constants["none_f32"], None, None
        index_args = (index, 0, 0)
    fused = a is not None and a.shape[0] > 0 and fuses_a(x.dtype, k % BK == 0)
    if a is not None and not fused:
        u = x @ a.to(x.dtype).t()
    r = a.shape[0] if fused else u.shape[1] if u is not None else 0
    # low-rank programs per slice: 16 ranks each, for all rows (shared A) or for each row (bank)
    a_tiles = cdiv(r, 16) * (m if bank is not None else 1) if fused else 0
    plan = _plan(m, n, k, x.dtype, x.device, weight.blocksize, weight.double_quant, split, a_tiles)
    # W's partial sums [split, M, N], then (fused) x @ A^T's [split, M, r]: one allocation
    partial = torch.empty(plan.split * m * (n + r * fused), dtype=torch.float32, device=x.device)
    nested = nested_pointers(weight)
    a_args = (a_slot if bank is not None else a, r, a.stride(0), a.stride(1)) if fused else (x, 0, 0, 0)
    _nf4_gemv_kernel[plan.grid](
        x,
        weight.packed,
        weight.absmax,
        *nested,
        constants["pairs"],
        constants["code"],
        partial,
        a_args[0],
        index_args[0],
        m,
        n,
        k,
        k // 2,
        x.stride(0),
        *plan.scalars,
        a_args[1],
        index_args[1],
        *a_args[2:],
        index_args[2],
        **plan.meta,
    )
    if fused:
        u, strides = x, (0, 0, v_slot.stride(0) if bank is not None else 0, v.stride(0), v.stride(1))
    elif r:
        strides = (u.stride(0), u.stride(1), 0, v.stride(0), v.stride(1))
    else:
        u = v = x  # never read: r = 0
        strides = (0, 0, 0, 0, 0)
    _nf4_gemv_epilogue_kernel[plan.epilogue_grid](
        partial,
        u,
        v_slot if bank is not None else v,
        bias if bias is not None else constants["none_f32"],
        index,
        scales,
        out,
        m,
        n,
        r,
        plan.split,
        m * n,
        *strides,
        int(bias is not None),
        int(bank is not None),
        float(lora_scale),
        FUSED_U=fused,
        **plan.epilogue_meta,
    )
    return out
