"""Register-resident NF4 tables: 4 packed bytes -> their NF4 values by PRMT, no memory access.

`pair_lookup_asm(dtype)` gives pair words (both codes in fp16 / bf16, the even code low: the decode
kernel's operand), `value_lookup_asm()` float32 values (dequantize's). The 16 values are split into byte
planes (`byte_planes`); per plane, selector S (nibble & 7) picks entries from words (w0, w1) and (w2, w3), one
PRMT each, and selector T (byte index + 4 * nibble bit 3) picks between them; PRMTs then interleave the
planes. Words 1 and 3 are PRMT immediates, 0 and 2 registers (`lut_words`). Shifts are `mul.hi.u32`: IMAD.HI
runs on the idle FMA pipe, not the ALU pipe PRMT fills.
NOTE: lanes load the register words from different addresses (`LUT_COPIES`): loaded uniformly, ptxas copies
them back from uniform registers before every PRMT, over the issue budget
(tests/test_gemv.py::test_inner_loop_fits_the_issue_and_l1_budgets).
Under the interpreter the lookups gather from the pair tables; tests/test_lookup.py emulates the PTX.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LUT_COPIES = tl.constexpr(4)
"""Copies of the register words (a lane reads the copy of its position along one dimension)."""
LUT_STRIDE = tl.constexpr(16)
"""int32 words per copy (the register words, then padding)."""


def byte_planes(values: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """The 16 `values` as byte planes: plane p, word q holds byte p of values 4q .. 4q + 3."""
    width = values.element_size()
    bits = values.view({2: torch.int16, 4: torch.int32}[width]).to(torch.int64) & ((1 << (8 * width)) - 1)
    planes = []
    for p in range(width):
        b = [(int(v) >> (8 * p)) & 0xFF for v in bits]
        planes.append(tuple(b[4 * q] | b[4 * q + 1] << 8 | b[4 * q + 2] << 16 | b[4 * q + 3] << 24 for q in range(4)))
    return planes


def nf4_values(dtype: torch.dtype) -> torch.Tensor:
    from nf4.codebook import NF4_CODE

    return NF4_CODE.to(dtype)


def lut_words(dtype: torch.dtype) -> list[int]:
    """The register words for `dtype`: LUT_COPIES copies of words 0, 2 of each plane, the mask, zeros."""
    words = [w for plane in byte_planes(nf4_values(dtype)) for w in (plane[0], plane[2])] + [0x44444444]
    return (words + [0] * (LUT_STRIDE.value - len(words))) * LUT_COPIES.value


def registers(dtype: torch.dtype) -> int:
    """Register words the lookup takes (2 per byte plane and the mask)."""
    return 2 * nf4_values(dtype).element_size() + 1


def _selectors(src: str, mask: str) -> list[str]:
    return [
        f"and.b32 S, {src}, 0x77777777;",
        f"mul.hi.u32 T, {src}, 0x80000000;",
        f"lop3.b32 T, T, {mask}, 0x32103210, 0xEA;",  # (T & 0x44444444) | 0x32103210
        "mul.hi.u32 s1, S, 0x10000;",
        "mul.hi.u32 t1, T, 0x10000;",
    ]


def _plane(out: str, plane: tuple[int, ...], reg0: str, reg2: str, s: str, t: str) -> list[str]:
    """`out` = byte p of the 4 codes' values (plane p), by selectors s, t."""
    return [
        f"prmt.b32 a, {reg0}, 0x{plane[1]:08X}, {s};",
        f"prmt.b32 b, {reg2}, 0x{plane[3]:08X}, {s};",
        f"prmt.b32 {out}, a, b, {t};",
    ]


def pair_lookup_asm(dtype: torch.dtype) -> str:
    """PTX for `tl.inline_asm_elementwise(pack=1)`: word $4 -> pair words $0..$3
    (value[b >> 4] | value[b & 15] << 16 per byte b); $5.. hold `lut_words(dtype)`."""
    lo, hi = byte_planes(nf4_values(dtype))
    out = ["{", ".reg .b32 S, T, s1, t1, a, b, hs, ls;", *_selectors("$4", "$9")]
    for half, (s, t) in enumerate((("S", "T"), ("s1", "t1"))):
        out += _plane("ls", lo, "$5", "$6", s, t) + _plane("hs", hi, "$7", "$8", s, t)
        # bytes (ls, hs) of codes (lo0, hi0, lo1, hi1): word = [ls[1], hs[1], ls[0], hs[0]] (byte 0), then byte 1
        out += [f"prmt.b32 ${2 * half}, ls, hs, 0x4051;", f"prmt.b32 ${2 * half + 1}, ls, hs, 0x6273;"]
    return "\n".join(out + ["}"])


def value_lookup_asm() -> str:
    """PTX for `tl.inline_asm_elementwise(pack=1)`: word $8 -> float32 NF4 values $0..$7 (byte 0's high
    code first); $9.. hold `lut_words(float32)`."""
    planes = byte_planes(nf4_values(torch.float32))
    out = ["{", ".reg .b32 S, T, s1, t1, a, b, x0, x1, x2, x3, y, z;", *_selectors("$8", "$17")]
    for half, (s, t) in enumerate((("S", "T"), ("s1", "t1"))):
        for p, plane in enumerate(planes):
            out += _plane(f"x{p}", plane, f"${9 + 2 * p}", f"${10 + 2 * p}", s, t)
        # x_p holds byte p of codes (lo0, hi0, lo1, hi1); two PRMTs gather a code's 4 bytes from the planes
        for pair, sel in ((0, "0x5140"), (1, "0x7362")):  # codes (lo0, hi0), then (lo1, hi1)
            base = 4 * half + 2 * pair
            out += [
                f"prmt.b32 y, x0, x1, {sel};",
                f"prmt.b32 z, x2, x3, {sel};",
                f"prmt.b32 ${base}, y, z, 0x7632;",  # the high code: the even element
                f"prmt.b32 ${base + 1}, y, z, 0x5410;",
            ]
    return "\n".join(out + ["}"])


PAIR_ASM = {torch.bfloat16: pair_lookup_asm(torch.bfloat16), torch.float16: pair_lookup_asm(torch.float16)}
VALUE_ASM = value_lookup_asm()
_PAIR_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 4 + ["r"] * (1 + registers(torch.bfloat16))))
_VALUE_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 8 + ["r"] * (1 + registers(torch.float32))))


@triton.jit
def pair_lookup(word, table_ptr, ASM: tl.constexpr):
    """Pair words (`nf4.kernels.gemv.activation_pair_table`) of the 4 bytes of each int32 `word` [R, C, W],
    C along lanes: PRMT with ASM (register words at table_ptr + 256), else a table gather."""
    if ASM == "":
        p0 = tl.load(table_ptr + (word & 0xFF))
        p1 = tl.load(table_ptr + ((word >> 8) & 0xFF))
        p2 = tl.load(table_ptr + ((word >> 16) & 0xFF))
        p3 = tl.load(table_ptr + ((word >> 24) & 0xFF))
        return p0, p1, p2, p3
    else:
        copy = table_ptr + 256 + LUT_STRIDE * (tl.arange(0, word.shape[1]) % LUT_COPIES)[None, :, None]
        return tl.inline_asm_elementwise(
            ASM,
            _PAIR_CONSTRAINTS,
            [word, tl.load(copy), tl.load(copy + 1), tl.load(copy + 2), tl.load(copy + 3), tl.load(copy + 4)],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True,
            pack=1,
        )


@triton.jit
def value_lookup(word, pairs_ptr, lut_ptr, ASM: tl.constexpr):
    """float32 NF4 values of the 8 codes of each int32 `word` [R, C, W], high code first: PRMT with ASM
    (register words at lut_ptr), else a gather from `pairs_ptr` (`float32_pair_table`)."""
    if ASM == "":
        e0 = tl.load(pairs_ptr + (word & 0xFF))
        e1 = tl.load(pairs_ptr + ((word >> 8) & 0xFF))
        e2 = tl.load(pairs_ptr + ((word >> 16) & 0xFF))
        e3 = tl.load(pairs_ptr + ((word >> 24) & 0xFF))
        return (_low(e0), _high(e0), _low(e1), _high(e1), _low(e2), _high(e2), _low(e3), _high(e3))
    else:
        c = lut_ptr + LUT_STRIDE * (tl.arange(0, word.shape[1]) % LUT_COPIES)[None, :, None]
        return tl.inline_asm_elementwise(
            ASM,
            _VALUE_CONSTRAINTS,
            [
                word,
                tl.load(c),
                tl.load(c + 1),
                tl.load(c + 2),
                tl.load(c + 3),
                tl.load(c + 4),
                tl.load(c + 5),
                tl.load(c + 6),
                tl.load(c + 7),
                tl.load(c + 8),
            ],  # fmt: skip
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=True,
            pack=1,
        )


@triton.jit
def _low(entry):
    return (entry & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)


@triton.jit
def _high(entry):
    return (entry >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
