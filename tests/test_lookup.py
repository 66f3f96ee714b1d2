"""The register-resident NF4 tables (`nf4.kernels.lut`): inline PTX does not run under the interpreter, so
the assembly text is executed here by a small numpy emulator of the four PTX instructions it uses, over
every byte value in every position of a word, against the tables it replaces (the decode kernel's pair
words, dequantize's float32 values); and the interpreter's twins (a gather from those tables) are
compared with the emulated assembly bit for bit on the same words."""

import re

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from nf4.codebook import NF4_CODE
from nf4.kernels import gemv, lut
from nf4.kernels.common import float32_pair_table

DTYPES = (torch.bfloat16, torch.float16)


def _u32(v) -> np.ndarray:
    return np.asarray(v, dtype=np.uint64) & 0xFFFFFFFF


def prmt(a, b, c) -> np.ndarray:
    """PTX `prmt.b32 d, a, b, c` (default mode): byte i of d is byte c[4i+2 : 4i] of {b, a} (a = bytes 0-3),
    or that byte's sign replicated when bit 4i+3 of c is set."""
    a, b, c = _u32(a), _u32(b), _u32(c)
    source = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = np.zeros(np.broadcast(a, b, c).shape, dtype=np.uint64)
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = np.choose((sel & 7).astype(np.int64), source)
        byte = np.where(sel & 8, np.where(byte & 0x80, 0xFF, 0), byte)
        out |= byte.astype(np.uint64) << np.uint64(8 * i)
    return out


def lop3(a, b, c, lut) -> np.ndarray:
    """PTX `lop3.b32 d, a, b, c, lut`: bit j of d is bit (a_j << 2 | b_j << 1 | c_j) of lut."""
    a, b, c = _u32(a), _u32(b), _u32(c)
    out = np.zeros(np.broadcast(a, b, c).shape, dtype=np.uint64)
    for j in range(32):
        index = (((a >> j) & 1) << 2) | (((b >> j) & 1) << 1) | ((c >> j) & 1)
        out |= ((np.uint64(lut) >> index) & 1) << np.uint64(j)
    return out


def emulate(asm: str, word: np.ndarray, registers: list[int], outputs: int = 4) -> list[np.ndarray]:
    """Run the PTX text `asm` on `word` ($outputs) with the registers after it = `registers`; returns
    $0 .. $(outputs - 1). Knows exactly the instructions the lookups emit (any other fails the test)."""
    env = {f"${outputs}": _u32(word)}
    env.update({f"${outputs + 1 + i}": _u32(v) for i, v in enumerate(registers)})

    def value(tok):
        return _u32(int(tok, 16)) if tok.startswith("0x") else env[tok]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        d, *src = [a.strip() for a in args.split(",")]
        if op == "and.b32":
            env[d] = value(src[0]) & value(src[1])
        elif op == "shr.b32":
            env[d] = value(src[0]) >> np.uint64(int(src[1]))
        elif op == "mul.hi.u32":  # the high word of the 64-bit product (a shift right, on the FMA pipe)
            env[d] = (value(src[0]) * value(src[1])) >> np.uint64(32)
        elif op == "lop3.b32":
            env[d] = lop3(value(src[0]), value(src[1]), value(src[2]), int(src[3], 16))
        elif op == "prmt.b32":
            env[d] = prmt(value(src[0]), value(src[1]), value(src[2]))
        else:
            pytest.fail(f"unknown instruction in the lookup assembly: {line}")
    return [env[f"${i}"] for i in range(outputs)]


def table(dtype) -> np.ndarray:
    """The decode kernel's pair table (int32 pair words) as unsigned values."""
    return gemv.activation_pair_table(dtype).numpy().astype(np.int64) & 0xFFFFFFFF


def registers(dtype) -> list[int]:
    return lut.lut_words(dtype)[: lut.registers(dtype)]


def words_with(byte: np.ndarray, position: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Words holding `byte` at `position` and random bytes elsewhere; also their bytes [n, 4]."""
    others = rng.integers(0, 256, size=(byte.size, 4)).astype(np.uint64)
    others[:, position] = byte
    return sum(others[:, i] << np.uint64(8 * i) for i in range(4)), others.astype(np.int64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pair_lookup_gives_the_pair_table_for_every_byte_in_every_position(dtype):
    rng = np.random.default_rng(0)
    pairs = table(dtype)
    for position in range(4):
        word, bytes_ = words_with(np.arange(256, dtype=np.uint64), position, rng)
        out = emulate(lut.pair_lookup_asm(dtype), word, registers(dtype))
        for i in range(4):  # output i is the pair word of byte i, whatever the other bytes are
            assert np.array_equal(out[i], pairs[bytes_[:, i]]), (position, i)


def test_value_lookup_gives_the_nf4_values_for_every_byte_in_every_position():
    rng = np.random.default_rng(1)
    bits = NF4_CODE.view(torch.int32).numpy().astype(np.int64) & 0xFFFFFFFF
    for position in range(4):
        word, bytes_ = words_with(np.arange(256, dtype=np.uint64), position, rng)
        out = emulate(lut.value_lookup_asm(), word, registers(torch.float32), outputs=8)
        for i in range(4):  # outputs 2i, 2i + 1: byte i's high code (the even element), then its low code
            assert np.array_equal(out[2 * i], bits[bytes_[:, i] >> 4]), (position, i)
            assert np.array_equal(out[2 * i + 1], bits[bytes_[:, i] & 15]), (position, i)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float32], ids=str)
def test_lookup_asm_shape(dtype):
    """Per word of 4 bytes: 21 instructions, 16 of them PRMT, for the pair words; 45, 40 PRMT, for float32
    values (the counts the docstrings and the model assume); the register operands are exactly the
    words `lut_words` puts first, and its copies repeat them."""
    asm = lut.value_lookup_asm() if dtype == torch.float32 else lut.pair_lookup_asm(dtype)
    body = [line for line in asm.splitlines() if line.strip() not in ("{", "}") and not line.strip().startswith(".reg")]
    prmt = sum(line.strip().startswith("prmt") for line in body)
    assert (len(body), prmt) == ((45, 40) if dtype == torch.float32 else (21, 16))
    outputs = 8 if dtype == torch.float32 else 4
    used = {int(m) for m in re.findall(r"\$(\d+)", asm)}
    assert used == set(range(outputs + 1 + lut.registers(dtype)))
    words, stride = lut.lut_words(dtype), lut.LUT_STRIDE.value
    assert len(words) == stride * lut.LUT_COPIES.value
    assert all(words[c * stride : (c + 1) * stride] == words[:stride] for c in range(lut.LUT_COPIES.value))


@triton.jit
def _pair_twin_kernel(words_ptr, pairs_ptr, out_ptr):
    offs = tl.arange(0, 16)[:, None, None] * 8 + tl.arange(0, 4)[None, :, None] * 2 + tl.arange(0, 2)[None, None, :]
    p0, p1, p2, p3 = lut.pair_lookup(tl.load(words_ptr + offs), pairs_ptr, "")
    tl.store(out_ptr + offs * 4, p0)
    tl.store(out_ptr + offs * 4 + 1, p1)
    tl.store(out_ptr + offs * 4 + 2, p2)
    tl.store(out_ptr + offs * 4 + 3, p3)


@triton.jit
def _value_twin_kernel(words_ptr, pairs_ptr, out_ptr):
    offs = tl.arange(0, 16)[:, None, None] * 8 + tl.arange(0, 4)[None, :, None] * 2 + tl.arange(0, 2)[None, None, :]
    v0, v1, v2, v3, v4, v5, v6, v7 = lut.value_lookup(tl.load(words_ptr + offs), pairs_ptr, pairs_ptr, "")
    tl.store(out_ptr + offs * 8, v0)
    tl.store(out_ptr + offs * 8 + 1, v1)
    tl.store(out_ptr + offs * 8 + 2, v2)
    tl.store(out_ptr + offs * 8 + 3, v3)
    tl.store(out_ptr + offs * 8 + 4, v4)
    tl.store(out_ptr + offs * 8 + 5, v5)
    tl.store(out_ptr + offs * 8 + 6, v6)
    tl.store(out_ptr + offs * 8 + 7, v7)


def random_words(seed: int) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31 - 1, (128,), dtype=torch.int32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pair_twin_equals_the_assembly_bit_for_bit(dtype):
    """`pair_lookup` as the interpreter runs it (ASM = "") on 128 random words against the emulated assembly,
    with the decode kernel's table (the register words after the 256 pair entries, where it reads them)."""
    words = random_words(1)
    pairs = gemv._constants(torch.device("cpu"), dtype)["pairs"]
    out = torch.empty(128 * 4, dtype=torch.int32)
    _pair_twin_kernel[(1,)](words, pairs, out)
    twin = out.numpy().astype(np.int64).reshape(128, 4) & 0xFFFFFFFF
    word = (words.numpy().astype(np.int64) & 0xFFFFFFFF).astype(np.uint64)
    asm = emulate(lut.pair_lookup_asm(dtype), word, registers(dtype))
    assert np.array_equal(twin, np.stack([a.astype(np.int64) for a in asm], 1))
    stored = pairs[256:].numpy().astype(np.int64) & 0xFFFFFFFF
    assert np.array_equal(stored, np.array(lut.lut_words(dtype)))


def test_value_twin_equals_the_assembly_bit_for_bit():
    """`value_lookup` as the interpreter runs it (a gather from dequantize's int64 pair table) against the
    emulated assembly, and the register words dequantize passes (`value_lut`) are `lut_words`."""
    from nf4.kernels.dequantize import value_lut

    words = random_words(2)
    out = torch.empty(128 * 8, dtype=torch.float32)
    _value_twin_kernel[(1,)](words, float32_pair_table(NF4_CODE), out)
    twin = out.view(torch.int32).numpy().astype(np.int64).reshape(128, 8) & 0xFFFFFFFF
    word = (words.numpy().astype(np.int64) & 0xFFFFFFFF).astype(np.uint64)
    asm = emulate(lut.value_lookup_asm(), word, registers(torch.float32), outputs=8)
    assert np.array_equal(twin, np.stack([a.astype(np.int64) for a in asm], 1))
    stored = value_lut(torch.device("cpu")).numpy().astype(np.int64) & 0xFFFFFFFF
    assert np.array_equal(stored, np.array(lut.lut_words(torch.float32)))
