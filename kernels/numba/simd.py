"""Integer dot products in LLVM IR, one code generator per instruction set, for `int8dot.py`.

Instruction sets ("isa"), best first, with the CPU features each needs:

- `avx512amx`: `avx512vnni`'s code, and AMX tiles (`amx-tile`, `amx-int8`) for experts of 8 tokens or more with
  rows across lanes (`amx.py`), where Linux grants them (`amx_permitted`).
- `avx512vnni`: `vpdpbusd` on 512-bit registers (64 u8 x s8 products into 16 int32 lanes).
- `avxvnni`: the VEX `vpdpbusd` on 256-bit registers (Alder Lake and later, Zen 5).
- `avx2`: `vpmaddubsw` (pairs into int16) then `vpmaddwd` by ones (int32 lanes of 4 bytes).
- `float`: no intrinsics; `int8dot.py` falls back to float32 kernels.

The instruction set is a compile-time fact: a `Simd` token (isa, weight format, group size, scale dtype)
is passed to the kernels as their first argument, and its Numba type selects the code `span_dots` emits, so each
backend is its own specialization of the same `@njit` source, cached like any other, with no branch on
hardware at run time. Compiling an instruction the target CPU lacks aborts the process inside LLVM:
`choose_isa` checks the features of the CPU Numba compiles for before any token is made.

Canonical arithmetic (the same bits from every isa; `int8dot.py` has the formats):

- A weight row is cut in spans: 64 bytes for the formats of nibbles (128 elements), `max(64, g)` bytes
  for INT8 and UINT8. MXFP4's nibbles are first looked up into unsigned bytes (`LOOKUP`), then multiplied
  as INT4's are; IQ4NL's are looked up into INT8's bytes (`IQ4_LOOKUP`), then multiplied as INT8's are.
- Integer lane `i` (0..15) of a span is exact: the sum, over the weight bytes `4i..4i+3` of the span (and
  `64 + 4i..` when an INT8 span has 128 bytes), of `(code - offset) * xq` for every element those bytes
  hold (both nibbles for INT4). The kernels compute `code * xq` with unsigned codes and start each lane at
  `bias = -offset * (sum of the lane's xq)`, precomputed per token.
- `S = sw[k] * a[k]` (float32) for the lane's group `k`; `acc[i] = fma(float(lane), S, acc[i])`, spans in
  order, accumulators starting at +0.
- One row result: `v8 = acc[0:8] + acc[8:16]`, `v4 = v8[0:4] + v8[4:8]`, `v2 = v4[0:2] + v4[2:4]`,
  `v2[0] + v2[1]`.

Lanes are exact in float32 (|lane| < 2^24), so these float operations fix the result bit for bit.

Affine formats (UINT4, UINT8: llama.cpp's Q4_1, Q5_1, Q4_K, Q5_K repacked without loss): `w = s * code - m`
per group, offset 0, float32 `s` and `m`. Their scale rows hold, per span, the span's `gps` scales then its
`gps` mins (zero past the row); the activations' `ascale` holds, per span, the `gps` activation scales `a`
then `gps` products `a * X` (float32), X the sum of the group's `xq`. Besides the lanes, each token keeps a
float32 vector `mins[q] = fma(m[q], (a X)[q], mins[q])` over the spans; its sum (`m2 = mins[0:2] + mins[2:4]`
for 4 groups a span, then `m2[0] + m2[1]`) is subtracted from the row result.

Rows across lanes (INT4_LANES, INT8_LANES: the CPU experts' INT4 and INT8, `int8dot.to_lanes`): the rows of a
matrix go `LANE_ROWS` = 16 to a block, and integer lane `r` holds row `r` of the block, so a block's 16 results
come out of the lanes with no sum across them and a span's scale arithmetic is shared by 16 rows. A block's codes
are 64-byte chunks in input order, each 4 bytes for every row: INT4 `8 c + j` in the low nibble and `8 c + 4 + j`
in the high nibble of row r's byte `4 r + j` of chunk c (8 inputs a chunk); INT8 input `4 c + j` in byte
`4 r + j` (4 a chunk). The activations' bytes `xq` in input order are broadcast to every lane, 4 at a time. Its
scales are group by group, the 16 rows' scales of a group side by side. Per row and token, with `bias[k] =
-offset * (sum of group k's xq)` (INT8 on `avx2` has none: its lanes come out exact without it):

- `isum[k] = bias[k] + sum over the group of code * xq` (int32, exact);
- `acc = fma(float(isum[k]), sw[k] * a[k], acc)`, groups in order, `acc` starting at +0: the row's result.

The same float32 operations in every lane on every isa, so the same bits; a token's result does not depend on
the tokens tiled with it (up to `LANE_TILE`). Rows across lanes read one stream a block, need no float work per
row and span for one token (a group's for 16 rows at once) and let tiles of 8 tokens keep the multiply-adds busy
(one thread, a 2,816 x 2,048 INT4 g64 matrix in cache: 69 % of the int8 peak at 8 tokens, where rows one by one
reached 21-28 % in `bench experts`; 84 % with two blocks a pass, `PAIR_TOKENS`).

Rows of blocks (Q4_0, Q8_0, Q6_K, Q4_K, IQ4_XS: a GGUF file's weights read in place from its memory map): a row is
llama.cpp's blocks as the file holds them, and `scales` is the weight array itself. Q4_0 and Q8_0: blocks of 32
inputs, each its fp16 scale and then its codes (16 bytes of INT4's nibbles, or 32 signed bytes, read as INT8's
`q + 128`); the arithmetic is INT4's or INT8's with group 32 and fp16 scales, bit for bit: only the loads differ, a
span's codes gathered from its blocks and its scales from their first bytes. Q6_K: blocks of 256 inputs (`ql` 128
bytes of low nibbles, `qh` 64 bytes of 2-bit high parts, 16 int8 scales, the fp16 `d`); a span's 6-bit codes `q` are
put together from `ql` and `qh` and read as INT8's `q + 96` (`q - 32 + 128`), its scales are `d * sc` in float32
(exact): INT8 with group 16 and float32 scales, bit for bit, reading 0.82 bytes a weight instead of 1.25. Q4_K:
blocks of 256 inputs (fp16 `d` and `dmin`, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles, each 32-byte
chunk holding 64 inputs, the first 32 in its low nibbles); a span (half a block) has its nibbles rearranged into
INT4's order in registers and its scales `d * sc` and mins `dmin * m` computed (exact): UINT4 with group 32, bit for
bit, reading 0.5625 bytes a weight instead of 0.75. IQ4_XS: blocks of 256 inputs (fp16 `d`, the 6-bit scales' high 2
and low 4 bits, 128 bytes of nibbles in INT4's order); a span's scales are `d * (ls - 32)` (exact): IQ4NL with group
32, bit for bit, reading 0.53 bytes a weight instead of 0.625.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import llvmlite.binding as llvm
from hetero_moe.kernels.numba.int4 import SCALE_BF16, SCALE_FP16
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import NativeValue, intrinsic, models, overload_attribute, register_model, unbox

AMX_FEATURES = ("amx-tile", "amx-int8")  # besides AVX-512 VNNI's; and Linux's grant (`amx_permitted`)
ISAS: dict[str, tuple[str, ...]] = {  # best first; the LLVM feature names each one needs
    "avx512amx": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", *AMX_FEATURES),
    "avx512vnni": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni"),
    "avxvnni": ("avx2", "fma", "f16c", "avxvnni"),
    "avx2": ("avx2", "fma", "f16c"),
    "float": (),
}
INT4 = 4
INT8 = 8
MXFP4 = 2  # gpt-oss's e2m1 codes, two to a byte like INT4, looked up into `c + 12` (see `LOOKUP`)
IQ4NL = 3  # llama.cpp's IQ4_NL codes, nibbles in INT4's order, looked up into INT8's bytes (see `IQ4_LOOKUP`)
UINT4 = 5  # affine: nibbles in INT4's order, `w = s * code - m` (see "Affine formats" above)
UINT8 = 9  # affine: bytes 0..127 in INT8's order, `w = s * code - m`
Q4_0 = 6  # INT4 read from llama.cpp's Q4_0 rows as a GGUF file holds them (see "Rows of blocks" above)
Q8_0 = 10  # INT8 read from Q8_0 rows
Q6_K = 11  # INT8 (group 16, float32 scales) read from Q6_K rows
Q4_K = 12  # UINT4 (group 32, float32 scales and mins) read from Q4_K rows
IQ4_XS = 13  # IQ4NL (group 32, float32 scales) read from IQ4_XS rows
INT4_LANES = 14  # INT4 with rows across lanes (see "Rows across lanes" above)
INT8_LANES = 15  # INT8 with rows across lanes
LANES = {INT4_LANES: INT4, INT8_LANES: INT8}  # format -> the format of its codes
FORMATS = {INT4: "int4", INT8: "int8", MXFP4: "mxfp4", IQ4NL: "iq4nl", UINT4: "uint4", UINT8: "uint8"}
FORMATS |= {Q4_0: "q4_0", Q8_0: "q8_0", Q6_K: "q6_k", Q4_K: "q4_k", IQ4_XS: "iq4_xs"}
FORMATS |= {INT4_LANES: "int4_lanes", INT8_LANES: "int8_lanes"}
# format -> (its codes' format, block bytes, code bytes: a block's codes in that format)
BLOCK_ROWS = {
    Q4_0: (INT4, 18, 16),
    Q8_0: (INT8, 34, 32),
    Q6_K: (INT8, 210, 256),
    Q4_K: (UINT4, 144, 128),
    IQ4_XS: (IQ4NL, 136, 128),
}
SUPER_BLOCKS = (Q6_K, Q4_K, IQ4_XS)  # blocks of 256 inputs, whole spans each: a block's spans run in one pass
NIBBLES = (INT4, MXFP4, IQ4NL, UINT4)  # formats of two codes a byte
AFFINE = (UINT4, UINT8)
OFFSETS = {INT4: 8, INT8: 128, MXFP4: 12, IQ4NL: 128, UINT4: 0, UINT8: 0}  # w = s * (code - offset) [- m]
SCALE_E8M0 = 2  # MXFP4's scales: one byte a block of 32, the power of two 2^(s - 127)
SCALE_F32 = 3  # float32 scales (and, in the affine formats, float32 mins)
SCALES = {SCALE_BF16: "bf16", SCALE_FP16: "fp16", SCALE_E8M0: "e8m0", SCALE_F32: "f32"}
GROUPS = (32, 64, 128)
INT8_GROUPS = (16, *GROUPS)
# an e2m1 nibble -> `c + 12`, c twice its value (-12..12): an unsigned byte for the integer dot products
LOOKUP = tuple(c + 12 for c in (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12))
# an IQ4_NL nibble -> its value k (llama.cpp's `kvalues_iq4nl`) as INT8's byte `k + 128`
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
IQ4_LOOKUP = tuple(k + 128 for k in IQ4_VALUES)
TILE = 4  # most tokens one `span_dots` call multiplies with a weight row
# Weight bytes ahead to prefetch, into L2 (prefetcht1), not L1: L1 is left to the activations every row reads
# again. The hardware prefetcher alone left ~35 % idle on Zen 3; on Zen 4 (A/B in one process, one token's
# experts from DRAM) L2 instead of L1 streamed 1.12x faster and 8 KB ahead instead of 4 KB 1.12x more for
# INT4 (1.04x INT8; 2 and 12 KB were slower).
PREFETCH = 8192
PREFETCH_LOCALITY = 2
# rows one `span_dots` loop takes side by side, by tokens (1 to TILE): a span's activations are loaded once
# for them all (and its weights once for the tokens). Tiles of 2 to 4 tokens ran 1.2x faster with 2 rows
# (Zen 4: 256-bit load ports, which the activations kept busy); one token kept one row, as two or four
# interleaved rows of one page slowed its stream from DRAM.
ROW_BLOCK = {1: 1, 2: 2, 3: 2, 4: 2}
# Short rows (at most SHORT_ROW bytes, one after another: W_UK's and W_UV's per head) go SHORT_BLOCK at a time
# for one token too: their block is one contiguous stream, and each row's own setup and sum are most of its work.
SHORT_ROW = 256
SHORT_BLOCK = 4
LANE_ROWS = 16  # rows of a block of rows across lanes, one an int32 lane
LANE_TILE = 8  # most tokens one `span_dots` call multiplies with rows across lanes
AMX_TILE = 16  # tokens of one A tile of `amx.amx_dots` (a call takes up to `amx.AMX_TOKENS`): a C tile's 16 rows
# Linux's arch_prctl (x86-64 syscall 158), its request for an extended state component, and AMX's tile data
SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18
# Tokens a pass of two blocks of rows across lanes takes (`cached_span_dots`). A tile of 8 tokens and one block is
# bound by loads, not by multiply-adds: each dot product also loads its 4 bytes of a token, and Zen 5 loads about
# two a cycle for the two dot products it can start. With two blocks each load feeds two dot products, and rows in
# cache need no prefetches (one thread, 8 tokens, rows in L1 or L2: INT8 g32 0.57 -> 0.77 of the int8 peak, INT4 g64
# 0.71 -> 0.84). Rows from DRAM run slower so (INT4 g64, 2 threads, 4 tokens: 34 against 42 GB/s): the first tile
# of tokens, which reads the rows from memory, goes through `span_dots`, one block a pass.
PAIR_TOKENS = 4
# Most tokens for which 8-lane isas run both halves of a block of rows across lanes in one pass, every 64-byte line
# read whole, where more tokens run one half after the other (their registers hold one half's accumulators).
BOTH_HALVES = 2
# Inputs a 64-byte chunk of rows across lanes holds for each of its rows
LANE_CHUNK = {INT4_LANES: 8, INT8_LANES: 4}

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F32 = ir.FloatType()


def target_features() -> frozenset[str]:
    """CPU features of the target Numba compiles for: NUMBA_CPU_FEATURES when set (its `+` entries),
    else the host's (none of the `avx*` ones when NUMBA_ENABLE_AVX is off), as Numba itself does."""
    if config.CPU_FEATURES is not None:
        return frozenset(f[1:] for f in config.CPU_FEATURES.split(",") if f.startswith("+"))
    features = {name for name, on in llvm.get_host_cpu_features().items() if on}
    if not config.ENABLE_AVX:
        features = {name for name in features if not name.startswith("avx")}
    return frozenset(features)


@functools.cache
def amx_permitted() -> bool:
    """Whether Linux lets this process use AMX's tile registers: asked once, `arch_prctl(ARCH_REQ_XCOMP_PERM,
    XFEATURE_XTILEDATA)` (Linux 5.16 on, x86-64). An AMX instruction without the grant kills the process."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0


def choose_isa(name: str | None = None, features: frozenset[str] | None = None) -> str:
    """The best instruction set `features` (default: `target_features()`, with AMX only where `amx_permitted`)
    allow, or `name` if given and allowed; a ValueError names an unknown set or the features a forced one lacks."""
    have = target_features() if features is None else features
    if features is None and not (set(AMX_FEATURES) <= have and amx_permitted()):
        have = have - set(AMX_FEATURES)
    if name is None:
        return next(isa for isa, needs in ISAS.items() if set(needs) <= have)
    if name not in ISAS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(ISAS)}")
    missing = [f for f in ISAS[name] if f not in have]
    if missing:
        raise ValueError(
            f"backend {name!r} needs CPU features this CPU lacks (or, for AMX, the OS does not grant): "
            f"{', '.join(missing)}"
        )
    return name


def spans(fmt: int, g: int) -> tuple[int, int, int]:
    """(weight code bytes, input elements, groups) of one span of a row."""
    if fmt in LANES:  # one group
        return (g // 2 if LANES[fmt] == INT4 else g), g, 1
    fmt = BLOCK_ROWS.get(fmt, (fmt,))[0]
    if fmt in NIBBLES:
        return 64, 128, 128 // g
    return max(64, g), max(64, g), max(64, g) // g


@functools.cache
def codegen_version() -> str:
    """Hash of this folder's sources, part of every token's Numba type: cached kernels compiled from an older code
    generator, or calling older kernels, no longer match. Numba checks only the timestamp of the file a cached
    function is defined in, and a kernel that calls another (`latent.decode` calls `int8dot`'s) holds the
    callee's code too."""
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


class SimdType(types.Dummy):
    def __init__(self, isa: str, fmt: int, g: int, kind: int) -> None:
        self.isa, self.fmt, self.g, self.kind = isa, fmt, g, kind
        super().__init__(name=f"Simd({isa}, {FORMATS[fmt]}, g={g}, {SCALES[kind]}, {codegen_version()})")


@dataclass(frozen=True)
class Simd:
    """Compile-time token: instruction set, weight format, group size and scale kind (`VALID`). Make it
    through `choose_isa` (or a test that only compiles): running code for an instruction set the CPU lacks
    crashes."""

    isa: str
    fmt: int
    g: int
    kind: int = SCALE_BF16

    def __post_init__(self) -> None:
        groups, kinds = VALID.get(self.fmt, ((), ()))
        if self.g not in groups or self.kind not in kinds or self.isa not in CODEGEN:
            raise ValueError(f"no integer kernels for {self}")

    @functools.cached_property
    def _numba_type_(self) -> SimdType:  # once: every kernel call types its arguments
        return SimdType(self.isa, self.fmt, self.g, self.kind)


VALID = {  # format -> (group sizes, scale kinds)
    INT4: (GROUPS, (SCALE_BF16, SCALE_FP16)),
    INT8: (INT8_GROUPS, (SCALE_BF16, SCALE_FP16, SCALE_F32)),
    MXFP4: ((32,), (SCALE_E8M0,)),
    IQ4NL: ((32,), (SCALE_FP16, SCALE_F32)),
    UINT4: ((32,), (SCALE_F32,)),
    UINT8: ((32,), (SCALE_F32,)),
    Q4_0: ((32,), (SCALE_FP16,)),
    Q8_0: ((32,), (SCALE_FP16,)),
    Q6_K: ((16,), (SCALE_F32,)),
    Q4_K: ((32,), (SCALE_F32,)),
    IQ4_XS: ((32,), (SCALE_F32,)),
    INT4_LANES: (GROUPS, (SCALE_BF16, SCALE_FP16)),
    INT8_LANES: (GROUPS, (SCALE_BF16, SCALE_FP16)),
}

register_model(SimdType)(models.OpaqueModel)


@overload_attribute(SimdType, "span")
def _span(simd):
    """`simd.span` in jitted code: the constant `spans(fmt, g)`."""
    shape = spans(simd.fmt, simd.g)
    return lambda simd: shape


@overload_attribute(SimdType, "block_bytes")
def _block_bytes(simd):
    """`simd.block_bytes` in jitted code: bytes of one block of a row of blocks, else 0."""
    size = BLOCK_ROWS.get(simd.fmt, (0, 0))[1]
    return lambda simd: size


@overload_attribute(SimdType, "lanes")
def _lanes(simd):
    """`simd.lanes` in jitted code: whether rows lie across lanes (`LANES`)."""
    lanes = simd.fmt in LANES
    return lambda simd: lanes


def uses_amx(simd: SimdType) -> bool:
    """Whether tiles of tokens of `simd` go to AMX (`amx.py`): rows across lanes on `avx512amx`."""
    return simd.isa == "avx512amx" and simd.fmt in LANES


@overload_attribute(SimdType, "tile")
def _tile(simd):
    """`simd.tile` in jitted code: the most tokens one `span_dots` call takes (`TILE`, `LANE_TILE`), or on AMX one A
    tile of `amx.amx_dots` (`AMX_TILE`)."""
    most = (AMX_TILE if uses_amx(simd) else LANE_TILE) if simd.fmt in LANES else TILE
    return lambda simd: most


@overload_attribute(SimdType, "amx")
def _amx(simd):
    """`simd.amx` in jitted code: `uses_amx`."""
    amx = uses_amx(simd)
    return lambda simd: amx


@overload_attribute(SimdType, "affine")
def _affine(simd):
    """`simd.affine` in jitted code: whether scale rows hold (scales, mins) per span."""
    affine = simd.fmt in AFFINE
    return lambda simd: affine


@unbox(SimdType)
def _unbox_simd(typ, obj, c):
    return NativeValue(c.context.get_dummy_value())


def _declare(builder: ir.IRBuilder, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _splat(t: ir.Type, n: int, value) -> ir.Constant:
    return ir.Constant(_vec(t, n), [value] * n)


class Isa:
    """Integer lanes of one instruction set: `width` int32 lanes per register of `width * 4` bytes."""

    width = 8
    int8_bias = True  # INT8 lanes start at the activations' bias (else they come out exact without it)

    @property
    def vbytes(self) -> int:
        return 4 * self.width

    def nibbles(self, b: ir.IRBuilder, w: ir.Value) -> tuple[ir.Value, ir.Value]:
        n = self.vbytes
        return b.and_(w, _splat(I8, n, 15)), b.and_(b.lshr(w, _splat(I8, n, 4)), _splat(I8, n, 15))

    def int4_lanes(self, b, lo, hi, xlo, xhi, bias):
        raise NotImplementedError

    def unpack_int8(self, b: ir.IRBuilder, w: ir.Value) -> tuple[ir.Value, ...]:
        raise NotImplementedError

    def int8_lanes(self, b, weights, xs, bias):
        raise NotImplementedError

    def uint8_lanes(self, b, weights, xs, bias):
        """Lanes of unsigned codes 0..127 (UINT8) times `xs`, from `bias`."""
        raise NotImplementedError

    def opaque(self, b: ir.IRBuilder, v: ir.Value) -> ir.Value:
        """`v`, as a value the compiler cannot know (`dot_rounds`): where the accumulator is an operand of the
        product (`vpdpbusd`), no product can be hoisted out of a loop, and `v` is returned as it is."""
        return v


class Avx2(Isa):
    """`vpmaddubsw` then `vpmaddwd` by ones. The int16 step must not saturate. INT4: nibble products (at
    most 15 * 127, four to an int16) are safe. INT8: `q = u - 128` multiplies as `|q| * sign(x, q)`
    (`vpsignb`), at most 128 * 127 two to an int16, so the lanes hold `(u - 128) * x` without a bias."""

    int8_bias = False

    def _maddubs(self, b, u, s):
        fn = _declare(b, "llvm.x86.avx2.pmadd.ub.sw", _vec(I16, 16), [_vec(I8, 32), _vec(I8, 32)])
        return b.call(fn, [u, s])

    def _maddwd(self, b, v, factor):
        fn = _declare(b, "llvm.x86.avx2.pmadd.wd", _vec(I32, 8), [_vec(I16, 16), _vec(I16, 16)])
        return b.call(fn, [v, _splat(I16, 16, factor)])

    def int4_lanes(self, b, lo, hi, xlo, xhi, bias):
        pairs = b.add(self._maddubs(b, lo, xlo), self._maddubs(b, hi, xhi))
        return b.add(self._maddwd(b, pairs, 1), bias)

    def unpack_int8(self, b, w):
        q = b.xor(w, _splat(I8, 32, -128))  # u - 128 as signed bytes
        fn = _declare(b, "llvm.abs.v32i8", _vec(I8, 32), [_vec(I8, 32), ir.IntType(1)])
        return b.call(fn, [q, ir.Constant(ir.IntType(1), 0)]), q  # |q| (128 for u = 0, read unsigned)

    def int8_lanes(self, b, weights, xs, bias):
        sign = _declare(b, "llvm.x86.avx2.psign.b", _vec(I8, 32), [_vec(I8, 32), _vec(I8, 32)])
        lanes = None
        for (magnitude, q), x in zip(weights, xs, strict=True):
            part = self._maddwd(b, self._maddubs(b, magnitude, b.call(sign, [x, q])), 1)
            lanes = part if lanes is None else b.add(lanes, part)
        return lanes

    def uint8_lanes(self, b, weights, xs, bias):  # codes below 128: a pair is at most 2 * 127 * 127
        for w, x in zip(weights, xs, strict=True):
            bias = b.add(bias, self._maddwd(b, self._maddubs(b, w, x), 1))
        return bias

    def opaque(self, b, v):
        """`v` through an empty asm: the accumulator is no operand of the products, and without it the products of
        `dot_rounds`' loop-invariant operands left the loop (a 'peak' of 50,000 G a second on Zen 3)."""
        return b.asm(ir.FunctionType(v.type, [v.type]), "", "=x,0", [v], side_effect=True)


class Vnni(Isa):
    """`vpdpbusd`: 4 u8 x s8 products added to each int32 lane, exact."""

    def __init__(self, width: int) -> None:
        self.width = width

    def _dpbusd(self, b, acc, u, s):
        n = self.width
        name = f"llvm.x86.avx512.vpdpbusd.{32 * n}"
        if llvm.llvm_version_info >= (22,):  # byte vectors since LLVM 22; int32 vectors before
            fn = _declare(b, name, _vec(I32, n), [_vec(I32, n), _vec(I8, 4 * n), _vec(I8, 4 * n)])
            return b.call(fn, [acc, u, s])
        wide = _vec(I32, n)
        fn = _declare(b, name, wide, [wide, wide, wide])
        return b.call(fn, [acc, b.bitcast(u, wide), b.bitcast(s, wide)])

    def int4_lanes(self, b, lo, hi, xlo, xhi, bias):
        return self._dpbusd(b, self._dpbusd(b, bias, lo, xlo), hi, xhi)

    def unpack_int8(self, b, w):
        return (w,)

    def int8_lanes(self, b, weights, xs, bias):
        return self.uint8_lanes(b, [w for (w,) in weights], xs, bias)

    def uint8_lanes(self, b, weights, xs, bias):
        for w, x in zip(weights, xs, strict=True):
            bias = self._dpbusd(b, bias, w, x)
        return bias


class VnniEmulated(Vnni):
    """`vpdpbusd` spelled in plain IR, which LLVM lowers for any CPU: the VNNI code paths, runnable here
    for tests (slow; never chosen by `choose_isa`)."""

    def _dpbusd(self, b, acc, u, s):
        n = self.width
        wide = _vec(I32, 4 * n)
        products = b.mul(b.zext(u, wide), b.sext(s, wide))
        for c in range(4):
            acc = b.add(acc, b.shuffle_vector(products, products, ir.Constant(_vec(I32, n), list(range(c, 4 * n, 4)))))
        return acc


CODEGEN = {  # plus the emulated VNNI sets, for tests on CPUs without VNNI
    "avx512amx": Vnni(16),  # `avx512vnni`'s code, and AMX tiles for many tokens of rows across lanes (`amx.py`)
    "avx512vnni": Vnni(16),
    "avxvnni": Vnni(8),
    "avx2": Avx2(),
    "avx512vnni-emulated": VnniEmulated(16),
    "avxvnni-emulated": VnniEmulated(8),
}


def _broadcast(b: ir.IRBuilder, value: ir.Value, n: int) -> ir.Value:
    """`<n>` copies of a run-time scalar."""
    vtype = _vec(value.type, n)
    one = b.insert_element(ir.Constant(vtype, None), value, ir.Constant(I32, 0))
    return b.shuffle_vector(one, ir.Constant(vtype, None), ir.Constant(_vec(I32, n), [0] * n))


def _block_start(b: ir.IRBuilder, s: ir.Value, spans: int, block_bytes: int) -> ir.Value:
    """Byte offset in its row of the block of span `s`, in a row of blocks of `spans` spans each."""
    return b.mul(b.udiv(s, ir.Constant(I64, spans)), ir.Constant(I64, block_bytes))


def _block_fields(b: ir.IRBuilder, row: ir.Value, s: ir.Value, spans: int, block_bytes: int):
    """`at(offset, type)`: the field at byte `offset` of the block of span `s` in a row of blocks of `spans` spans."""
    block = _block_start(b, s, spans, block_bytes)

    def at(offset: int, vtype: ir.Type) -> ir.Value:
        return b.load(b.bitcast(b.gep(row, [b.add(block, ir.Constant(I64, offset))]), vtype.as_pointer()), align=1)

    return at


class _Loads:
    """Unaligned loads at byte offsets from byte pointers, and the masked weight loads of a tail span."""

    def __init__(self, builder: ir.IRBuilder, w: ir.Value, row_bytes: ir.Value) -> None:
        self.b, self.w, self.row_bytes = builder, w, row_bytes

    def load(self, base: ir.Value, offset: ir.Value, vtype: ir.Type, align: int = 1) -> ir.Value:
        b = self.b
        return b.load(b.bitcast(b.gep(base, [offset]), vtype.as_pointer()), align=align)

    def weights(self, offset: ir.Value, nbytes: int, tail: bool) -> ir.Value:
        """`nbytes` weight bytes from row byte `offset`; in the tail span, bytes past the row read as 0
        (masked loads of whole dwords: rows are a multiple of 16 bytes)."""
        if not tail:
            return self.load(self.w, offset, _vec(I8, nbytes))
        b = self.b
        fn = _declare(b, "llvm.x86.avx2.maskload.d.256", _vec(I32, 8), [I8.as_pointer(), _vec(I32, 8)])
        pieces = []
        for k in range(nbytes // 32):
            start = b.add(offset, ir.Constant(I64, 32 * k))
            left = b.trunc(b.sub(self.row_bytes, start), I32)  # bytes of the row from this piece on
            room = b.shuffle_vector(
                b.insert_element(ir.Constant(_vec(I32, 8), None), left, ir.Constant(I32, 0)),
                ir.Constant(_vec(I32, 8), None),
                ir.Constant(_vec(I32, 8), [0] * 8),
            )
            inside = b.icmp_signed(">", room, ir.Constant(_vec(I32, 8), [4 * d for d in range(8)]))
            pieces.append(b.bitcast(b.call(fn, [b.gep(self.w, [start]), b.sext(inside, _vec(I32, 8))]), _vec(I8, 32)))
        if len(pieces) == 1:
            return pieces[0]
        return b.shuffle_vector(pieces[0], pieces[1], ir.Constant(_vec(I32, 64), list(range(64))))


class _BlockLoads(_Loads):
    """`_Loads` of a row of blocks: `weights` takes offsets into the row's codes, as if they were contiguous,
    and gathers them from the blocks (codes of blocks past the row are read from block 0: their scales are
    zero)."""

    def __init__(self, builder: ir.IRBuilder, w: ir.Value, row_bytes: ir.Value, fmt: int) -> None:
        super().__init__(builder, w, row_bytes)
        _, self.block, self.codes = BLOCK_ROWS[fmt]
        self.signed = fmt == Q8_0
        self.blocks = builder.udiv(row_bytes, ir.Constant(I64, self.block))

    def weights(self, offset: ir.Value, nbytes: int, tail: bool) -> ir.Value:
        b = self.b
        first = b.udiv(offset, ir.Constant(I64, self.codes))
        count = nbytes // self.codes  # blocks of this load
        if not tail and count > 1:  # two loads of `nbytes` inside the blocks, then one shuffle picks the codes
            base = b.mul(first, ir.Constant(I64, self.block))
            head = self.load(self.w, b.add(base, ir.Constant(I64, 2)), _vec(I8, nbytes))
            back = count * self.block - nbytes  # where the second load starts, from the first block
            tail_load = self.load(self.w, b.add(base, ir.Constant(I64, back)), _vec(I8, nbytes))
            picks = []
            for i in range(count):
                at = i * self.block + 2  # block i's codes, from the first block
                start = at - 2 if at - 2 + self.codes <= nbytes else nbytes + at - back
                picks += range(start, start + self.codes)
            codes = b.shuffle_vector(head, tail_load, ir.Constant(_vec(I32, nbytes), picks))
            return b.xor(codes, _splat(I8, nbytes, -128)) if self.signed else codes
        pieces = []
        for i in range(nbytes // self.codes):
            k = b.add(first, ir.Constant(I64, i))
            at = b.add(b.mul(k, ir.Constant(I64, self.block)), ir.Constant(I64, 2))
            if tail:
                at = b.select(b.icmp_unsigned("<", k, self.blocks), at, ir.Constant(I64, 2))
            pieces.append(self.load(self.w, at, _vec(I8, self.codes)))
        while len(pieces) > 1:  # concatenate pairwise
            n = 2 * pieces[0].type.count
            pieces = [
                b.shuffle_vector(x, y, ir.Constant(_vec(I32, n), list(range(n))))
                for x, y in zip(pieces[::2], pieces[1::2], strict=True)
            ]
        return b.xor(pieces[0], _splat(I8, nbytes, -128)) if self.signed else pieces[0]


class _Q6KLoads(_Loads):
    """`_Loads` of a row of Q6_K blocks (whole blocks: no tail span). Span `4 k + i` of a row (64 weights, as INT8
    codes) is weights `64 i ..` of block k; weight `128 n + 64 h + c` of a block (c < 64) is `ql[64 n + c]`'s low
    (h = 0) or high nibble, with bits `4 h + 2 (c // 32)` and up of `qh[32 n + c % 32]` as its two high bits."""

    def codes(self, s: ir.Value, i: int, c: int, nbytes: int) -> ir.Value:
        """INT8's codes `q + 96` of weights `c .. c + nbytes - 1` of span `s`, the `i`-th of its block."""
        b = self.b
        n, h = divmod(i, 2)
        block = _block_start(b, s, 4, 210)
        ql = self.load(self.w, b.add(block, ir.Constant(I64, 64 * n + c)), _vec(I8, nbytes))
        qh = self.load(self.w, b.add(block, ir.Constant(I64, 128 + 32 * n)), _vec(I8, 32))
        low = b.and_(b.lshr(ql, _splat(I8, nbytes, 4 * h)), _splat(I8, nbytes, 15))
        if nbytes == 64:  # c = 0: qh's 32 bytes twice, shifted by 4 h and by 4 h + 2
            first, second = (b.lshr(qh, _splat(I8, 32, 4 * h + k)) for k in (0, 2))
            high = b.shuffle_vector(first, second, ir.Constant(_vec(I32, 64), list(range(64))))
        else:
            high = b.lshr(qh, _splat(I8, 32, 4 * h + 2 * (c // 32)))
        high = b.shl(b.and_(high, _splat(I8, nbytes, 3)), _splat(I8, nbytes, 4))
        return b.add(b.or_(low, high), _splat(I8, nbytes, 96))


class _Q4KLoads(_Loads):
    """`_Loads` of a row of Q4_K blocks (whole blocks: no tail span). Span `2 k + i` of a row is inputs
    `128 i ..` of block k: chunks `2 i` and `2 i + 1` of its nibbles, 32 bytes each, whose first 16 bytes (A)
    and last 16 (B) hold inputs `l` and `16 + l` of one group in their low nibbles and of the next group in
    their high ones. INT4's order wants a group's inputs `l` and `16 + l` in the low and high nibble of one
    byte: so the low nibbles are A's (twice: low, then high nibbles) and the high ones B's."""

    def nibbles(self, s: ir.Value, i: int, c: int, nbytes: int) -> tuple[ir.Value, ir.Value]:
        """Low and high nibble vectors, in INT4's order, of code bytes `c .. c + nbytes - 1` of span `s`."""
        b = self.b
        block = _block_start(b, s, 2, 144)
        raw = self.load(self.w, b.add(block, ir.Constant(I64, 16 + 64 * i + c)), _vec(I8, nbytes))
        second = ir.Constant(_vec(ir.IntType(1), nbytes), [(k // 16) % 2 == 1 for k in range(nbytes)])
        halves = []
        for half in (0, 16):  # A, then B: each chunk's 16 bytes twice
            picks = [32 * (k // 32) + half + k % 16 for k in range(nbytes)]
            v = b.shuffle_vector(raw, raw, ir.Constant(_vec(I32, nbytes), picks))
            low, high = b.and_(v, _splat(I8, nbytes, 15)), b.lshr(v, _splat(I8, nbytes, 4))
            halves.append(b.select(second, high, low))
        return halves[0], halves[1]


class _IQ4XSLoads(_Loads):
    """`_Loads` of a row of IQ4_XS blocks (whole blocks: no tail span): span `2 k + i` of a row is the 64 code bytes
    `8 + 64 i ..` of block k, already in INT4's order."""

    def codes(self, s: ir.Value, i: int, c: int, nbytes: int) -> ir.Value:
        block = _block_start(self.b, s, 2, 136)
        return self.load(self.w, self.b.add(block, ir.Constant(I64, 8 + 64 * i + c)), _vec(I8, nbytes))


def _iq4xs_scales(b: ir.IRBuilder, srow: ir.Value, s: ir.Value) -> ir.Value:
    """float32 `<8>` scales `d * (ls - 32)` of the IQ4_XS block of span `s` (its 8 groups): the 6-bit `ls` have
    their low 4 bits in the nibbles of bytes 4-7 and their high 2 bits in the uint16 at byte 2, two bits a group.
    Worked in int32 lanes, where x86 shifts each lane by its own count."""
    at = _block_fields(b, srow, s, 2, 136)
    v8 = _vec(I32, 8)
    low = b.zext(at(4, _vec(I8, 4)), _vec(I32, 4))
    low = b.shuffle_vector(low, low, ir.Constant(_vec(I32, 8), [0, 0, 1, 1, 2, 2, 3, 3]))
    low = b.and_(b.lshr(low, ir.Constant(v8, [0, 4] * 4)), ir.Constant(v8, [15] * 8))
    high = b.lshr(_broadcast(b, b.zext(at(2, ir.IntType(16)), I32), 8), ir.Constant(v8, list(range(0, 16, 2))))
    high = b.shl(b.and_(high, ir.Constant(v8, [3] * 8)), ir.Constant(v8, [4] * 8))
    ls = b.sub(b.or_(low, high), ir.Constant(v8, [32] * 8))
    return b.fmul(b.sitofp(ls, _vec(F32, 8)), _broadcast(b, b.fpext(at(0, ir.HalfType()), F32), 8))


def _q4k_scales(b: ir.IRBuilder, srow: ir.Value, s: ir.Value) -> ir.Value:
    """float32 `<16>`: the 8 scales `d * sc`, then the 8 mins `dmin * m`, of the Q4_K block of span `s`, from its 12
    bytes of 6-bit pairs q (llama.cpp's get_scale_min_k4): group j < 4 `q[j] & 63`, `q[j + 4] & 63`; j >= 4
    `q[j + 4] & 15 | (q[j - 4] >> 6) << 4`, `q[j + 4] >> 4 | (q[j] >> 6) << 4`. Worked in int32 lanes."""
    at = _block_fields(b, srow, s, 2, 144)
    v4 = _vec(I32, 4)

    def const(v: int) -> ir.Constant:
        return ir.Constant(v4, [v] * 4)

    q = [b.zext(at(4 + 4 * k, _vec(I8, 4)), v4) for k in range(3)]  # bytes 0-3, 4-7, 8-11 of the 12
    sc_high = b.or_(b.and_(q[2], const(15)), b.shl(b.lshr(q[0], const(6)), const(4)))
    m_high = b.or_(b.lshr(q[2], const(4)), b.shl(b.lshr(q[1], const(6)), const(4)))
    both = []
    for low, high, offset in ((q[0], sc_high, 0), (q[1], m_high, 2)):
        eight = b.shuffle_vector(b.and_(low, const(63)), high, ir.Constant(_vec(I32, 8), list(range(8))))
        both.append(b.fmul(b.uitofp(eight, _vec(F32, 8)), _broadcast(b, b.fpext(at(offset, ir.HalfType()), F32), 8)))
    return b.shuffle_vector(both[0], both[1], ir.Constant(_vec(I32, 16), list(range(16))))


def _lookup(b: ir.IRBuilder, isa: str, nibbles: ir.Value, nbytes: int, values: tuple[int, ...]) -> ir.Value:
    """`values[n]` for each nibble n of `nibbles <nbytes x i8>` (values 0..15): `vpshufb` on the table
    repeated in every 16-byte lane (512-bit on AVX-512, else 256-bit pieces)."""
    values = [v - 256 if v > 127 else v for v in values]  # as signed bytes
    if isa in ("avx512amx", "avx512vnni"):
        fn = _declare(b, "llvm.x86.avx512.pshuf.b.512", _vec(I8, 64), [_vec(I8, 64)] * 2)
        return b.call(fn, [ir.Constant(_vec(I8, 64), values * 4), nibbles])
    fn = _declare(b, "llvm.x86.avx2.pshuf.b", _vec(I8, 32), [_vec(I8, 32)] * 2)
    table = ir.Constant(_vec(I8, 32), values * 2)
    pieces = []
    for k in range(nbytes // 32):
        piece = b.shuffle_vector(nibbles, nibbles, ir.Constant(_vec(I32, 32), list(range(32 * k, 32 * k + 32))))
        pieces.append(b.call(fn, [table, piece]))
    if len(pieces) == 1:
        return pieces[0]
    return b.shuffle_vector(pieces[0], pieces[1], ir.Constant(_vec(I32, 64), list(range(64))))


def _e8m0_scales(b: ir.IRBuilder, e: ir.Value, n: int) -> ir.Value:
    """e8m0 bytes `<n x i8>` -> float32 `2^(e - 128)` (the half of `c` folded in; subnormal for e < 2; 255
    reads as 2^127)."""
    wide = b.zext(e, _vec(I32, n))
    normal = b.shl(b.sub(wide, _splat(I32, n, 1)), _splat(I32, n, 23))
    low = b.select(b.icmp_unsigned("==", wide, _splat(I32, n, 1)), _splat(I32, n, 1 << 22), _splat(I32, n, 1 << 21))
    bits = b.select(b.icmp_unsigned(">=", wide, _splat(I32, n, 2)), normal, low)
    return b.bitcast(bits, _vec(F32, n))


def _prefetch(b: ir.IRBuilder) -> ir.Function:
    """LLVM's prefetch intrinsic `(address, write, locality, cache)`, under its name in this LLVM."""
    name = "llvm.prefetch.p0" if llvm.llvm_version_info >= (17,) else "llvm.prefetch.p0i8"
    return _declare(b, name, ir.VoidType(), [I8.as_pointer(), I32, I32, I32])


def _half_scales(b: ir.IRBuilder, bits: ir.Value, kind: int, n: int) -> ir.Value:
    """`<n x i16>` bf16 or fp16 bits (`kind`) -> float32 `<n>`."""
    if kind == SCALE_BF16:
        return b.bitcast(b.shl(b.zext(bits, _vec(I32, n)), ir.Constant(_vec(I32, n), [16] * n)), _vec(F32, n))
    return b.fpext(b.bitcast(bits, _vec(ir.HalfType(), n)), _vec(F32, n))


def _kernel_function(module: ir.Module, name: str, args: list[ir.Type]) -> ir.Function:
    """The module's internal LLVM function `name`, `void (args)`, kept out of line: the one defined already (it has
    blocks), or a new one without a body."""
    if name in module.globals:
        return module.globals[name]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), args), name)
    fn.linkage = "internal"
    fn.attributes.add("noinline")
    fn.attributes.add("nounwind")
    return fn


def _dots_function(module: ir.Module, kind: str, simd: SimdType, n: int) -> ir.Function:
    """The module's LLVM function `hetero_moe_{kind}_dots_...` of `span_dots` for `n` tokens (`_kernel_function`),
    of the arguments `_row_function` lists."""
    name = f"hetero_moe_{kind}_dots_{simd.isa}_{FORMATS[simd.fmt]}_g{simd.g}_s{simd.kind}_n{n}"
    p8 = I8.as_pointer()
    return _kernel_function(module, name, [p8, I64, I64, I64, p8, I64, I64, *[p8] * (3 * n), p8, I64])


def _row_function(module: ir.Module, simd: SimdType, n: int) -> ir.Function:
    """The LLVM function of `span_dots` for `n` tokens, defined once per module:
    `(w, rows, row_stride, row_bytes, s, s_stride, groups, xq_0.., ascale_0.., bias_0.., out, out_stride)`,
    byte pointers and byte strides. A function of its own, so its loops get the registers to themselves
    inside a big parallel kernel. Rows go `ROW_BLOCK[n]` at a time through one loop over spans; each keeps
    its own accumulators, so the bits are those of one row at a time."""
    fn = _dots_function(module, "span", simd, n)
    if fn.blocks:
        return fn
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    w, n_rows, row_stride, row_bytes, s_ptr, s_stride, groups, *ptrs, out, out_stride = fn.args
    tokens = [(ptrs[j], ptrs[n + j], ptrs[2 * n + j]) for j in range(n)]
    isa = CODEGEN[simd.isa]
    fmt, block_bytes, code_bytes = BLOCK_ROWS.get(simd.fmt, (simd.fmt, 0, 0))
    span_bytes, span_elems, gps = spans(fmt, simd.g)
    file_span = span_bytes * block_bytes / code_bytes if block_bytes else span_bytes  # a span's bytes in a row
    tails = not block_bytes or code_bytes % span_bytes != 0  # rows of whole 256-input blocks have no ragged span
    width, vbytes = isa.width, isa.vbytes
    parts = 16 // width
    lanes_per_group = 16 // gps
    fma = _declare(b, f"llvm.fma.v{width}f32", _vec(F32, width), [_vec(F32, width)] * 3)
    zero = ir.Constant(_vec(F32, width), [0.0] * width)
    short_too = ROW_BLOCK[n] == 1  # one row at a time, but short rows SHORT_BLOCK at a time
    block = SHORT_BLOCK if short_too else ROW_BLOCK[n]
    # per row of a block, per token: the accumulators (and the affine formats' mins)
    accs = [[[cgutils.alloca_once_value(b, zero) for _ in range(parts)] for _ in range(n)] for _ in range(block)]
    affine = fmt in AFFINE
    if affine:
        gfma = _declare(b, f"llvm.fma.v{gps}f32", _vec(F32, gps), [_vec(F32, gps)] * 3)
        gzero = ir.Constant(_vec(F32, gps), [0.0] * gps)
        all_mins = [[cgutils.alloca_once_value(b, gzero) for _ in range(n)] for _ in range(block)]

    def const(v: int) -> ir.Constant:
        return ir.Constant(I64, v)

    size, item = {SCALE_E8M0: (1, I8), SCALE_F32: (4, F32)}.get(simd.kind, (2, I16))  # one stored scale

    def row_scales(srow: ir.Value, s: ir.Value, tail: bool, i: int) -> ir.Value:
        """float32 `<gps>` scales of span `s`; in the tail span, 0 for groups past the row (affine rows
        hold whole spans)."""
        first = b.mul(s, const(2 * gps if affine else gps))
        if simd.fmt == Q6_K:  # the block's 4 int8 scales of this span (its `i`-th), times its fp16 `d`
            at = _block_fields(b, srow, s, 4, block_bytes)
            d = _broadcast(b, b.fpext(at(208, ir.HalfType()), F32), 4)
            return b.fmul(b.sitofp(at(192 + 4 * i, _vec(I8, 4)), _vec(F32, 4)), d)
        if block_bytes and not tail:  # each group's block starts with its scale: the span's scales lie in
            # its first 64 bytes ((gps - 1) * block_bytes + 2 <= 64): one load, one shuffle of its 16-bit words
            wide = b.load(
                b.bitcast(b.gep(srow, [b.mul(first, const(block_bytes))]), _vec(I16, 32).as_pointer()), align=1
            )
            words = ir.Constant(_vec(I32, gps), [q * block_bytes // 2 for q in range(gps)])
            bits = b.shuffle_vector(wide, ir.Constant(_vec(I16, 32), None), words)
        elif block_bytes:  # the tail span: block by block, zero past the row
            bits = ir.Constant(_vec(I16, gps), [0] * gps)
            nb = b.udiv(row_bytes, const(block_bytes))
            for q in range(gps):
                k = b.add(first, const(q))
                inside = b.icmp_unsigned("<", k, nb) if tail else None
                where = b.mul(k, const(block_bytes))
                v = b.load(
                    b.bitcast(b.gep(srow, [b.select(inside, where, const(0)) if tail else where]), I16.as_pointer())
                )
                bits = b.insert_element(
                    bits, b.select(inside, v, ir.Constant(I16, 0)) if tail else v, ir.Constant(I32, q)
                )
        elif not tail or affine:
            bits = b.load(b.bitcast(b.gep(srow, [b.mul(first, const(size))]), _vec(item, gps).as_pointer()), align=size)
        else:  # groups past the row may be past the array: load those from group 0, then zero them
            bits = ir.Constant(_vec(item, gps), [0.0 if item == F32 else 0] * gps)
            for q in range(gps):
                k = b.add(first, const(q))
                inside = b.icmp_signed("<", k, groups)
                where = b.select(inside, b.mul(k, const(size)), const(0))
                v = b.load(b.bitcast(b.gep(srow, [where]), item.as_pointer()), align=size)
                bits = b.insert_element(bits, b.select(inside, v, ir.Constant(item, 0)), ir.Constant(I32, q))
        if simd.kind == SCALE_F32:
            return bits
        if simd.kind == SCALE_E8M0:
            return _e8m0_scales(b, bits, gps)
        return _half_scales(b, bits, simd.kind, gps)

    prefetch = _prefetch(b)

    def span(wrow: ir.Value, srow: ir.Value, loads: _Loads, s: ir.Value, tail: bool, acc, mins, i=0, block=None):
        """Span `s` of a row into its accumulators (Q6_K, Q4_K, IQ4_XS: the `i`-th span of its block, whose
        scales `block` holds when computed for the whole block)."""
        wbase = b.mul(s, const(span_bytes))
        if PREFETCH and not tail:  # the bytes PREFETCH ahead (of the next rows, or the next call's: rows and
            # tasks run in memory order); a prefetch past the array is harmless
            at = b.udiv(b.mul(s, const(span_bytes * block_bytes)), const(code_bytes)) if block_bytes else wbase
            for c in range(-(-int(file_span) // 64)):
                ahead = b.gep(wrow, [b.add(at, const(64 * c + PREFETCH))])
                b.call(prefetch, [ahead, ir.Constant(I32, 0), ir.Constant(I32, PREFETCH_LOCALITY), ir.Constant(I32, 1)])
        xbase = b.mul(s, const(span_elems))
        bbase = b.mul(s, const(64))  # 16 int32 bias lanes per span
        abase = b.mul(s, const(4 * gps * (2 if affine else 1)))  # float32 activation scales of the span's groups
        if simd.fmt == Q4_K:  # this span's 4 scales and 4 mins of the block's
            sw, mw = (
                b.shuffle_vector(block, block, ir.Constant(_vec(I32, 4), [k + 4 * i + j for j in range(4)]))
                for k in (0, 8)
            )
        elif simd.fmt == IQ4_XS:
            sw = b.shuffle_vector(block, block, ir.Constant(_vec(I32, 4), list(range(4 * i, 4 * i + 4))))
        else:
            sw = row_scales(srow, s, tail, i)
        if affine and simd.fmt != Q4_K:  # the span's mins, after its scales
            mw = loads.load(srow, b.mul(b.add(b.mul(s, const(2 * gps)), const(gps)), const(4)), _vec(F32, gps), 4)
        if affine:
            for j, (_, arow, _) in enumerate(tokens):
                ax = loads.load(arow, b.add(abase, const(4 * gps)), _vec(F32, gps), align=4)
                b.store(b.call(gfma, [mw, ax, b.load(mins[j])]), mins[j])
        for p in range(parts):
            if fmt in NIBBLES:
                if simd.fmt == Q4_K:
                    lo, hi = loads.nibbles(s, i, p * vbytes, vbytes)
                elif simd.fmt == IQ4_XS:
                    lo, hi = isa.nibbles(b, loads.codes(s, i, p * vbytes, vbytes))
                else:
                    lo, hi = isa.nibbles(b, loads.weights(b.add(wbase, const(p * vbytes)), vbytes, tail))
                if fmt == MXFP4:
                    lo, hi = _lookup(b, simd.isa, lo, vbytes, LOOKUP), _lookup(b, simd.isa, hi, vbytes, LOOKUP)
                if fmt == IQ4NL:
                    lo, hi = _lookup(b, simd.isa, lo, vbytes, IQ4_LOOKUP), _lookup(b, simd.isa, hi, vbytes, IQ4_LOOKUP)
                    weights = [isa.unpack_int8(b, lo), isa.unpack_int8(b, hi)]
            else:
                chunks = range(span_bytes // 64)
                if simd.fmt == Q6_K:
                    raw = [loads.codes(s, i, p * vbytes, vbytes)]
                else:
                    raw = [loads.weights(b.add(wbase, const(64 * m + p * vbytes)), vbytes, tail) for m in chunks]
                weights = raw if fmt == UINT8 else [isa.unpack_int8(b, w) for w in raw]
            mask = ir.Constant(_vec(I32, width), [(p * width + lane) // lanes_per_group for lane in range(width)])
            for j, (xrow, arow, brow) in enumerate(tokens):
                if affine:  # offset 0: lanes start at 0
                    bias = ir.Constant(_vec(I32, width), [0] * width)
                elif fmt in (INT8, IQ4NL) and not isa.int8_bias:
                    bias = None
                else:
                    bias = loads.load(brow, b.add(bbase, const(4 * p * width)), _vec(I32, width), align=4)
                if fmt in NIBBLES:
                    xlo = loads.load(xrow, b.add(xbase, const(p * vbytes)), _vec(I8, vbytes))
                    xhi = loads.load(xrow, b.add(xbase, const(64 + p * vbytes)), _vec(I8, vbytes))
                    if fmt == IQ4NL:
                        lanes = isa.int8_lanes(b, weights, [xlo, xhi], bias)
                    else:
                        lanes = isa.int4_lanes(b, lo, hi, xlo, xhi, bias)
                elif fmt == UINT8:
                    xs = [loads.load(xrow, b.add(xbase, const(64 * m + p * vbytes)), _vec(I8, vbytes)) for m in chunks]
                    lanes = isa.uint8_lanes(b, weights, xs, bias)
                else:
                    xs = [loads.load(xrow, b.add(xbase, const(64 * m + p * vbytes)), _vec(I8, vbytes)) for m in chunks]
                    lanes = isa.int8_lanes(b, weights, xs, bias)
                a = loads.load(arow, abase, _vec(F32, gps), align=4)
                scale = b.shuffle_vector(b.fmul(sw, a), ir.Constant(_vec(F32, gps), None), mask)
                b.store(b.call(fma, [b.sitofp(lanes, _vec(F32, width)), scale, b.load(acc[j][p])]), acc[j][p])

    def halves(v: ir.Value, k: int) -> list[ir.Value]:
        return [b.shuffle_vector(v, v, ir.Constant(_vec(I32, k), list(range(i, i + k)))) for i in (0, k)]

    codes = b.mul(b.udiv(row_bytes, const(block_bytes)), const(code_bytes)) if block_bytes else row_bytes
    full = b.udiv(codes, const(span_bytes))  # whole spans of a row
    has_tail = b.icmp_unsigned("!=", b.mul(full, const(span_bytes)), codes)

    def rows_from(first: ir.Value, count: int) -> None:
        """Rows `first .. first + count - 1`, their spans side by side in one loop: each token's activations
        are loaded once a span for all of them (the loads LLVM merges), and each row keeps its own order."""
        rows = []
        for i in range(count):
            r = b.add(first, const(i))
            wrow, srow = b.gep(w, [b.mul(r, row_stride)]), b.gep(s_ptr, [b.mul(r, s_stride)])
            if simd.fmt in SUPER_BLOCKS:
                loads = {Q6_K: _Q6KLoads, Q4_K: _Q4KLoads, IQ4_XS: _IQ4XSLoads}[simd.fmt](b, wrow, row_bytes)
            else:
                loads = _BlockLoads(b, wrow, row_bytes, simd.fmt) if block_bytes else _Loads(b, wrow, row_bytes)
            rows.append((r, wrow, srow, loads, accs[i], all_mins[i] if affine else None))
            for j in range(n):
                for p in range(parts):
                    b.store(zero, accs[i][j][p])
                if affine:
                    b.store(gzero, all_mins[i][j])
        if simd.fmt in SUPER_BLOCKS:  # a block's spans in one pass: their places in it are constants
            per_block = code_bytes // span_bytes
            with cgutils.for_range(b, b.udiv(full, const(per_block))) as loop:
                for _, wrow, srow, loads, acc, mins in rows:
                    s0 = b.mul(loop.index, const(per_block))  # the block's first span
                    block = {IQ4_XS: _iq4xs_scales, Q4_K: _q4k_scales}.get(simd.fmt)
                    block = block(b, srow, s0) if block else None
                    for i in range(per_block):
                        span(wrow, srow, loads, b.add(s0, const(i)), False, acc, mins, i, block)
        else:
            with cgutils.for_range(b, full) as loop:
                for _, wrow, srow, loads, acc, mins in rows:
                    span(wrow, srow, loads, loop.index, False, acc, mins)
        if tails:
            with b.if_then(has_tail, likely=False):
                for _, wrow, srow, loads, acc, mins in rows:
                    span(wrow, srow, loads, full, True, acc, mins)
        for r, _, _, _, acc, mins in rows:
            for j in range(n):
                vals = [b.load(a) for a in acc[j]]
                v8 = b.fadd(*(halves(vals[0], 8) if width == 16 else vals))
                v4 = b.fadd(*halves(v8, 4))
                v2 = b.fadd(*halves(v4, 2))
                total = b.fadd(b.extract_element(v2, ir.Constant(I32, 0)), b.extract_element(v2, ir.Constant(I32, 1)))
                if affine:
                    m = b.load(mins[j])
                    m = b.fadd(*halves(m, gps // 2)) if gps == 4 else m
                    pair = [b.extract_element(m, ir.Constant(I32, i)) for i in (0, 1)]
                    total = b.fsub(total, b.fadd(*pair))
                at = b.add(b.mul(const(j), out_stride), b.mul(r, const(4)))
                b.store(total, b.bitcast(b.gep(out, [at]), F32.as_pointer()))

    def all_rows(size: int) -> None:
        """Every row, `size` at a time, then the rest one by one."""
        blocks = b.udiv(n_rows, const(size))
        with cgutils.for_range(b, blocks) as loop:
            rows_from(b.mul(loop.index, const(size)), size)
        if size > 1:
            with cgutils.for_range(b, b.sub(n_rows, b.mul(blocks, const(size)))) as loop:
                rows_from(b.add(b.mul(blocks, const(size)), loop.index), 1)

    if short_too:
        short = b.and_(b.icmp_unsigned("<=", row_bytes, const(SHORT_ROW)), b.icmp_unsigned("==", row_stride, row_bytes))
        with b.if_else(short) as (short_rows, long_rows):
            with short_rows:
                all_rows(SHORT_BLOCK)
            with long_rows:
                all_rows(ROW_BLOCK[n])
    else:
        all_rows(block)
    b.ret_void()
    return fn


def _lane_function(module: ir.Module, simd: SimdType, n: int, cached: bool) -> ir.Function:
    """The LLVM function of `span_dots` (`cached_span_dots` if `cached`) for `n` tokens on rows across lanes
    (`LANES`), the arguments of `_row_function`: blocks of `LANE_ROWS` rows one after another, each read as one
    stream. On 8-lane isas a block is two halves of 8 rows, each 32 bytes of every chunk, run in one pass for up to
    `BOTH_HALVES` tokens (a decode step on Zen 3: 0.8x the time of one half after the other). Per token two chains
    of integer lanes (even and odd chunks) hide the latency of the dot products. Cached rows on 16-lane isas go two
    blocks a pass, `PAIR_TOKENS` tokens at a time (see `PAIR_TOKENS`)."""
    fn = _dots_function(module, "lane_cached" if cached else "lane", simd, n)
    if fn.blocks:
        return fn
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    w, n_rows, row_stride, _, s_ptr, s_stride, groups, *ptrs, out, out_stride = fn.args
    tokens = [(ptrs[j], ptrs[n + j], ptrs[2 * n + j], j) for j in range(n)]
    isa = CODEGEN[simd.isa]
    fmt, width, vbytes = LANES[simd.fmt], isa.width, isa.vbytes
    per_chunk = LANE_CHUNK[simd.fmt]
    chunks = simd.g // per_chunk  # of a group
    vf, vi = _vec(F32, width), _vec(I32, width)
    fma = _declare(b, f"llvm.fma.v{width}f32", vf, [vf] * 3)
    prefetch = _prefetch(b)
    zero, izero = ir.Constant(vf, [0.0] * width), ir.Constant(vi, [0] * width)
    paired = cached and width == LANE_ROWS
    # 8-lane isas (16 registers) keep the float accumulators in `out`, loaded and stored once a group: held in
    # registers, LLVM ran a group token by token, spilling the chunks' weights and reloading them for each token
    # (AVX2 INT8 g32, 64 tokens an expert: 0.78x the time in `out`)
    in_out = width < LANE_ROWS
    accs = [] if in_out else [[cgutils.alloca_once_value(b, zero) for _ in range(1 + paired)] for _ in range(n)]
    biased = fmt == INT4 or isa.int8_bias  # lanes start at the group's bias

    def const(v: int) -> ir.Constant:
        return ir.Constant(I64, v)

    def load(base: ir.Value, offset: ir.Value, vtype: ir.Type) -> ir.Value:
        return b.load(b.bitcast(b.gep(base, [offset]), vtype.as_pointer()), align=1)

    def scales(srow: ir.Value, k: ir.Value, part: int) -> ir.Value:
        """float32 scales of group `k` of the block's rows `part * width ..`."""
        bits = load(srow, b.add(b.mul(k, const(2 * LANE_ROWS)), const(2 * width * part)), _vec(I16, width))
        return _half_scales(b, bits, simd.kind, width)

    block_bytes = b.mul(row_stride, const(LANE_ROWS))
    block_scales = b.mul(s_stride, const(LANE_ROWS))

    def units_of(block: ir.Value, part: int) -> tuple[ir.Value, ir.Value, int, ir.Value]:
        """(weights, scales, part, first row) of `part` of block `block`."""
        first = b.add(b.mul(block, const(LANE_ROWS)), const(part * width))
        return b.gep(w, [b.mul(block, block_bytes)]), b.gep(s_ptr, [b.mul(block, block_scales)]), part, first

    def out_at(j: int, first: ir.Value) -> ir.Value:
        """Token `j`'s results of the rows from `first` on."""
        at = b.add(b.mul(const(j), out_stride), b.mul(first, const(4)))
        return b.bitcast(b.gep(out, [at]), vf.as_pointer())

    def run(units: list, tile: list) -> None:
        """The `tile`'s tokens with the rows of `units`, each broadcast feeding a dot product of every unit."""
        if in_out:
            mine = {j: [out_at(j, first) for _, _, _, first in units] for _, _, _, j in tile}
        else:
            mine = {j: accs[j][: len(units)] for _, _, _, j in tile}  # a token's accumulators, one a unit
        for token_accs in mine.values():
            for acc in token_accs:
                b.store(zero, acc, align=4)
        with cgutils.for_range(b, groups) as loop:
            k = loop.index
            lanes = []
            for _, _, brow, _ in tile:
                start = _broadcast(b, load(brow, b.mul(k, const(4)), I32), width) if biased else izero
                lanes.append([[start, izero] for _ in units])
            for c in range(chunks):
                at = b.add(b.mul(k, const(64 * chunks)), const(64 * c))
                weights = []
                for wblock, _, part, _ in units:
                    if PREFETCH and part == 0 and not cached:  # rows in cache need none
                        ahead = b.gep(wblock, [b.add(at, const(PREFETCH))])
                        b.call(prefetch, [ahead, *(ir.Constant(I32, v) for v in (0, PREFETCH_LOCALITY, 1))])
                    codes = load(wblock, b.add(at, const(vbytes * part)), _vec(I8, vbytes))
                    weights.append(isa.nibbles(b, codes) if fmt == INT4 else isa.unpack_int8(b, codes))
                x_at = b.add(b.mul(k, const(simd.g)), const(per_chunk * c))
                for (xrow, _, _, _), token_lanes in zip(tile, lanes, strict=True):
                    words = [load(xrow, b.add(x_at, const(4 * h)), I32) for h in range(per_chunk // 4)]
                    xs = [b.bitcast(_broadcast(b, word, width), _vec(I8, vbytes)) for word in words]
                    for unit_weights, chains in zip(weights, token_lanes, strict=True):
                        acc = chains[c % 2]
                        if fmt == INT4:
                            acc = isa.int4_lanes(b, *unit_weights, *xs, acc)
                        elif isa.int8_bias:
                            acc = isa.int8_lanes(b, [unit_weights], xs, acc)
                        else:
                            acc = b.add(acc, isa.int8_lanes(b, [unit_weights], xs, None))
                        chains[c % 2] = acc
            sws = [scales(sblock, k, part) for _, sblock, part, _ in units]
            for (_, arow, _, j), token_lanes in zip(tile, lanes, strict=True):
                a = _broadcast(b, load(arow, b.mul(k, const(4)), F32), width)
                for sw, chains, acc in zip(sws, token_lanes, mine[j], strict=True):
                    total = b.sitofp(b.add(*chains), vf)
                    b.store(b.call(fma, [total, b.fmul(sw, a), b.load(acc, align=4)]), acc, align=4)
        if not in_out:
            for _, _, _, j in tile:
                for (_, _, _, first), acc in zip(units, mine[j], strict=True):
                    b.store(b.load(acc), out_at(j, first), align=4)

    n_blocks = b.udiv(n_rows, const(LANE_ROWS))
    if paired:
        tiles = [tokens[i : i + PAIR_TOKENS] for i in range(0, n, PAIR_TOKENS)]
        with cgutils.for_range(b, b.udiv(n_blocks, const(2))) as pairs:
            units = [units_of(b.add(b.mul(pairs.index, const(2)), const(u)), 0) for u in range(2)]
            for tile in tiles:
                run(units, tile)
        with b.if_then(b.trunc(n_blocks, ir.IntType(1))):
            run([units_of(b.sub(n_blocks, const(1)), 0)], tokens)
    elif in_out and n <= BOTH_HALVES:
        with cgutils.for_range(b, n_blocks) as blocks:
            run([units_of(blocks.index, part) for part in range(LANE_ROWS // width)], tokens)
    else:
        with cgutils.for_range(b, n_blocks) as blocks:
            for part in range(LANE_ROWS // width):
                run([units_of(blocks.index, part)], tokens)
    b.ret_void()
    return fn


def _emit(simd: SimdType, n: int, cached: bool, context, builder: ir.IRBuilder, sig, args) -> None:
    """Call the row function with the data pointers of `span_dots`' arrays."""
    b = builder
    w, scales, xq, ascale, bias, rows, out = (
        context.make_array(t)(context, builder, v) for t, v in zip(sig.args[2:], args[2:], strict=True)
    )
    p8 = I8.as_pointer()
    per_token = []
    for a in (xq, ascale, bias):
        stride = b.extract_value(a.strides, 0)
        base = b.bitcast(a.data, p8)
        for j in range(n):
            t = b.load(b.gep(rows.data, [ir.Constant(I64, j)]))
            per_token.append(b.gep(base, [b.mul(t, stride)]))
    fn = _lane_function(b.module, simd, n, cached) if simd.fmt in LANES else _row_function(b.module, simd, n)
    n_rows, row_bytes = (b.extract_value(w.shape, i) for i in (0, 1))
    call = [b.bitcast(w.data, p8), n_rows, b.extract_value(w.strides, 0), row_bytes]
    call += [b.bitcast(scales.data, p8), b.extract_value(scales.strides, 0), b.extract_value(scales.shape, 1)]
    b.call(fn, [*call, *per_token, b.bitcast(out.data, p8), b.extract_value(out.strides, 0)])


def _is(t, dtype, ndim: int) -> bool:
    return isinstance(t, types.Array) and t.dtype == dtype and t.ndim == ndim


def _typed_dots(cached: bool, simd, n, w, scales, xq, ascale, bias, rows, out):
    """The typing and code of `span_dots` (`cached` False) and `cached_span_dots`."""
    if not isinstance(simd, SimdType) or not isinstance(n, types.IntegerLiteral):
        return None
    if not 1 <= n.literal_value <= (LANE_TILE if simd.fmt in LANES else TILE):
        return None
    scale_type = {SCALE_E8M0: types.uint8, SCALE_F32: types.float32}.get(simd.kind, types.uint16)
    if simd.fmt in BLOCK_ROWS:
        scale_type = types.uint8  # the rows themselves
    wanted = [
        (w, types.uint8, 2),
        (scales, scale_type, 2),
        (xq, types.int8, 2),
        (ascale, types.float32, 2),
        (bias, types.int32, 2),
        (rows, types.int64, 1),
        (out, types.float32, 2),
    ]
    if not all(_is(t, dtype, ndim) for t, dtype, ndim in wanted):
        return None
    count = n.literal_value

    def codegen(context, builder, sig, args):
        _emit(simd, count, cached, context, builder, sig, args)
        return context.get_dummy_value()

    return types.none(simd, n, w, scales, xq, ascale, bias, rows, out), codegen


@intrinsic
def span_dots(typingctx, simd, n, w, scales, xq, ascale, bias, rows, out):
    """`out[j, r] = w[r] . xq[rows[j]]` for `j < n` (a constant from 1 to TILE, to LANE_TILE for rows across
    lanes) and every row r of w, in the canonical order. Rows across lanes are read one stream a block.

    `w [R, B]` uint8, rows of packed weights (B a multiple of 16); `scales [R, G]` uint16, their bf16 or
    fp16 bits (`simd.kind`), uint8 e8m0 bytes (MXFP4) or float32 (`[R, spans * 2 * gps]` with the mins in
    the affine formats); `xq [T, >= spans * span_elems]` int8, `ascale [T, >= spans * gps]` (twice that
    in the affine formats) float32 and `bias [T, >= spans * 16]` int32, from `int8dot.quantize_activations`
    (MXFP4: `mxfp4.quantize_activations`); `rows [>= n]` int64;
    `out [>= n, >= R]` float32. Rows may be strided; within a row, elements must be contiguous (the
    caller checks: the code here reads them so). Rows across lanes (`LANES`): R a multiple of `LANE_ROWS`,
    `w` and `scales` C-contiguous blocks of rows laid out by `int8dot.to_lanes`, `bias [T, >= G]`.
    """
    return _typed_dots(False, simd, n, w, scales, xq, ascale, bias, rows, out)


@intrinsic
def cached_span_dots(typingctx, simd, n, w, scales, xq, ascale, bias, rows, out):
    """`span_dots`, the same bits, for rows that are in cache (read by the call before): on 16-lane isas,
    rows across lanes go two blocks a pass (`PAIR_TOKENS`)."""
    return _typed_dots(True, simd, n, w, scales, xq, ascale, bias, rows, out)


def peak_chains(isa: str) -> int:
    """Independent dot products in flight in `dot_rounds`: more than latency x throughput on any core (`vpdpbusd`:
    5 x 2), and few enough for the registers (16 on AVX2 and AVX-VNNI, which hold the chains and their operands)."""
    return 16 if CODEGEN[isa].width == 16 else 10


def dot_macs(isa: str) -> int:
    """Multiply-adds of one of the backend's int8 dot products (`uint8_lanes` on one register)."""
    return CODEGEN[isa].vbytes


@intrinsic
def dot_rounds(typingctx, simd, rounds):
    """`rounds` times `peak_chains` independent int8 dot products of the backend (`vpdpbusd`, or AVX2's
    `vpmaddubsw` + `vpmaddwd` + add), register to register, -> a sum of their lanes, so that none is left
    out: the backend's peak multiply-adds a second, which `bench experts` measures. Each product's byte operand
    is `Isa.opaque`, so that none is hoisted out of the loop nor shared between chains."""
    if not isinstance(simd, SimdType) or not isinstance(rounds, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        b = builder
        isa = CODEGEN[simd.isa]
        n, width = isa.vbytes, isa.width
        count = b.trunc(args[1], I8)  # operands the compiler cannot know
        u = b.insert_element(_splat(I8, n, 3), count, ir.Constant(I32, 0))
        s = b.insert_element(_splat(I8, n, 5), count, ir.Constant(I32, 1))
        accs = [cgutils.alloca_once_value(b, _splat(I32, width, i)) for i in range(peak_chains(simd.isa))]
        with cgutils.for_range(b, args[1]) as _:
            for a in accs:
                b.store(isa.uint8_lanes(b, [isa.opaque(b, u)], [s], b.load(a)), a)
        total = ir.Constant(I64, 0)
        for a in accs:
            total = b.add(total, b.sext(b.extract_element(b.load(a), ir.Constant(I32, 0)), I64))
        return total

    return types.int64(simd, rounds), codegen


@intrinsic
def prefetch_bytes(typingctx, a, start, stop):
    """Prefetch into L2 (as the kernels' own prefetches) the 64-byte lines of bytes `start` to `stop` of the
    C-contiguous array `a`."""
    if not isinstance(a, types.Array) or not all(isinstance(t, types.Integer) for t in (start, stop)):
        return None

    def codegen(context, builder, sig, args):
        b = builder
        arr = context.make_array(sig.args[0])(context, builder, args[0])
        data = b.bitcast(arr.data, I8.as_pointer())
        prefetch = _prefetch(b)
        first, last = (context.cast(b, v, t, types.int64) for v, t in zip(args[1:], sig.args[1:], strict=True))
        with cgutils.for_range_slice(b, first, last, ir.Constant(I64, 64), intp=I64) as (offset, _):
            b.call(prefetch, [b.gep(data, [offset]), *(ir.Constant(I32, v) for v in (0, PREFETCH_LOCALITY, 1))])
        return context.get_dummy_value()

    return types.none(a, start, stop), codegen


@intrinsic
def quantize_group(typingctx, x, start, g, xq, ascale, bias, k, offset):
    """Group `k` of a token for rows across lanes, inputs `x[start : start + g]` (whole, g a multiple of 16), on
    vectors: `a = max |x| / 127`, `xq[start + i] = clamp(rint(x[start + i] / a), -127, 127)` and `bias[k] = -offset
    * sum(xq)` where `a > 0` (else zeros), `ascale[k] = a`. The bits of `int8dot._quantize_token`'s loops (IEEE
    division and `rint`, no fastmath), 16 inputs an operation."""
    arrays = ((x, types.float32), (xq, types.int8), (ascale, types.float32), (bias, types.int32))
    if not all(_is(t, dtype, 1) and t.layout == "C" for t, dtype in arrays):
        return None
    if not all(isinstance(t, types.Integer) for t in (start, g, k, offset)):
        return None

    def codegen(context, builder, sig, args):
        b = builder
        x_, xq_, ascale_, bias_ = (context.make_array(sig.args[i])(context, b, args[i]) for i in (0, 3, 4, 5))
        start_, g_, k_, offset_ = (context.cast(b, args[i], sig.args[i], types.int64) for i in (1, 2, 6, 7))
        vf, vi = _vec(F32, 16), _vec(I32, 16)
        xs, qs = b.gep(x_.data, [start_]), b.gep(xq_.data, [start_])
        vectors = b.udiv(g_, ir.Constant(I64, 16))

        def inputs(v: ir.Value, vtype: ir.Type) -> ir.Value:
            return b.load(b.bitcast(b.gep(xs, [b.mul(v, ir.Constant(I64, 16))]), vtype.as_pointer()), align=4)

        def codes(v: ir.Value) -> ir.Value:
            return b.bitcast(b.gep(qs, [b.mul(v, ir.Constant(I64, 16))]), _vec(I8, 16).as_pointer())

        most = cgutils.alloca_once_value(b, _splat(I32, 16, 0))
        with cgutils.for_range(b, vectors) as loop:  # max |x| as the largest bits, the sign cleared
            bits = b.and_(inputs(loop.index, vi), _splat(I32, 16, 0x7FFFFFFF))
            b.store(b.call(_declare(b, "llvm.umax.v16i32", vi, [vi, vi]), [b.load(most), bits]), most)
        amax = b.call(_declare(b, "llvm.vector.reduce.umax.v16i32", I32, [vi]), [b.load(most)])
        a = b.fdiv(b.bitcast(amax, F32), ir.Constant(F32, 127.0))
        b.store(a, b.gep(ascale_.data, [k_]))
        positive = b.fcmp_ordered(">", a, ir.Constant(F32, 0.0))
        with b.if_else(positive) as (quantized, zeros):
            with quantized:
                total = cgutils.alloca_once_value(b, _splat(I32, 16, 0))
                rint = _declare(b, "llvm.rint.v16f32", vf, [vf])
                low, high = _splat(F32, 16, -127.0), _splat(F32, 16, 127.0)
                with cgutils.for_range(b, vectors) as loop:
                    q = b.call(rint, [b.fdiv(inputs(loop.index, vf), _broadcast(b, a, 16))])
                    q = b.select(b.fcmp_ordered("<", q, low), low, q)
                    q = b.fptosi(b.select(b.fcmp_ordered(">", q, high), high, q), vi)
                    b.store(b.trunc(q, _vec(I8, 16)), codes(loop.index), align=1)
                    b.store(b.add(b.load(total), q), total)
                added = b.call(_declare(b, "llvm.vector.reduce.add.v16i32", I32, [vi]), [b.load(total)])
                b.store(b.mul(b.trunc(b.neg(offset_), I32), added), b.gep(bias_.data, [k_]))
            with zeros:  # every input 0
                with cgutils.for_range(b, vectors) as loop:
                    b.store(_splat(I8, 16, 0), codes(loop.index), align=1)
                b.store(ir.Constant(I32, 0), b.gep(bias_.data, [k_]))
        return context.get_dummy_value()

    return types.none(x, start, g, xq, ascale, bias, k, offset), codegen
