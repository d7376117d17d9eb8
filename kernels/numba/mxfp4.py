"""MXFP4 routed-expert kernels (gpt-oss): the release's e2m1 codes and e8m0 scales times int8 activations,
integer dot products on the instruction sets of `simd.py`.

Weights, per matrix `[O, I]` (I a multiple of 32; `kernels/mxfp4.py` has the format): `blocks [O, I / 2]
uint8` (the release's `[O, I / 32, 16]` viewed flat; value `2j` of the row in the low nibble of byte `j`,
`2j + 1` in the high one) and `scales [O, I / 32] uint8`, `w = e2m1(code) * 2^(s - 127)`. Nothing is
repacked: the arrays are the checkpoint's bytes. Twice an e2m1 value is an integer `c` in -12..12; a byte
lookup (`vpshufb`, 16 entries) turns each nibble into `c + 12`, an unsigned byte, and the integer lanes
start at `-12 * (sum of the lane's xq)`, as the INT4 kernels do with their offset 8.

Activations (`quantize_activations`), per token and block of 32 inputs: `a = amax / 127` (float32),
`xq = rint(x / a)` clamped to [-127, 127], zero where `a == 0`, laid out per span of 64 weight bytes
(128 inputs): `xq[128 s + b]` is input `128 s + 2 b` (the low nibble of the span's byte `b`) and
`xq[128 s + 64 + b]` input `128 s + 2 b + 1`; `ascale [T, 4 spans]`, `bias [T, 16 spans]` int32. Padded
with zeros to whole spans.

Canonical arithmetic (the same bits from every instruction set): integer lane `i` of span `s` is exactly
`sum (c - 0) * xq` over the 8 values in bytes `4i..4i+3` of the span; `S = 2^(s_k - 128) * a_k` (float32, the
half of `c` folded into the power of two, exact) for the lane's block `k`; `acc[i] = fma(lane, S, acc[i])`,
spans in order from +0; then `simd.py`'s pairwise sum of the 16 accumulators. A scale byte of 255 (NaN in
e8m0, absent from real checkpoints) reads as 2^127.

The experts: `h = clamped_swiglu(x W_gate^T + b_gate, x W_up^T + b_up)` with gate and up rows interleaved
(row `2r` gate r, `2r + 1` up r, as gpt-oss's release stores them), `y = h W_down^T + b_down`.
`clamped_swiglu(g, u) = (min(max(u, -limit), limit) + 1) * g' * sigmoid(alpha * g')`, `g' = min(g, limit)`,
the float32 sums clamped in float32 and the rest computed in float64, rounded once.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hetero_moe.kernels.numba import simd as simd_codegen
from hetero_moe.kernels.numba.simd import CODEGEN, F32, I8, I32, I64, TILE, _declare, _Loads, _splat, _vec
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import NativeValue, intrinsic, models, register_model, unbox

SPAN_BYTES = 64  # weight bytes per span
SPAN_ELEMS = 128  # inputs per span
SPAN_GROUPS = 4  # blocks of 32 per span
OFFSET = 12  # looked-up codes are c + 12
LOOKUP = tuple(c + OFFSET for c in (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12))  # nibble -> c + 12
PARALLEL_ELEMENTS = 1 << 16  # activations of at least this many values are quantized in parallel


def activation_shape(in_dim: int) -> tuple[int, int, int]:
    """Columns of (xq, ascale, bias) for inputs of `in_dim` (a multiple of 32)."""
    n = -(-in_dim // SPAN_ELEMS)
    return n * SPAN_ELEMS, n * SPAN_GROUPS, n * 16


@functools.cache
def codegen_version() -> str:
    """Hash of this file and of `simd.py`, part of the token's Numba type: cached kernels compiled from an
    older code generator no longer match."""
    digest = hashlib.sha256(Path(__file__).read_bytes() + Path(simd_codegen.__file__).read_bytes())
    return digest.hexdigest()[:12]


class MxSimdType(types.Dummy):
    def __init__(self, isa: str) -> None:
        self.isa = isa
        super().__init__(name=f"MxSimd({isa}, {codegen_version()})")


@dataclass(frozen=True)
class MxSimd:
    """Compile-time token of the MXFP4 kernels: the instruction set (a `simd.CODEGEN` name). Make it through
    `kernels` (which checks the CPU's features): running code for an instruction set the CPU lacks crashes."""

    isa: str

    def __post_init__(self) -> None:
        if self.isa not in CODEGEN:
            raise ValueError(f"no integer MXFP4 kernels for {self.isa!r}; choose one of {', '.join(CODEGEN)}")

    @functools.cached_property
    def _numba_type_(self) -> MxSimdType:
        return MxSimdType(self.isa)


register_model(MxSimdType)(models.OpaqueModel)


@unbox(MxSimdType)
def _unbox_simd(typ, obj, c):
    return NativeValue(c.context.get_dummy_value())


# --- activations ---------------------------------------------------------------------------------


@njit(inline="always", cache=True)
def _quantize_token(x, xq, ascale, bias) -> None:
    """One token `x [I]` -> `xq`, `ascale`, `bias` (rows, zeroed by the caller)."""
    n_in = x.shape[0]
    for k in range((n_in + 31) // 32):
        start, stop = 32 * k, min(32 * k + 32, n_in)
        amax = np.float32(0.0)
        for i in range(start, stop):
            amax = max(amax, abs(x[i]))
        a = amax / np.float32(127.0)
        ascale[k] = a
        if not a > 0:
            continue
        for i in range(start, stop):
            q = min(max(np.rint(x[i] / a), np.float32(-127.0)), np.float32(127.0))
            s, j = i // SPAN_ELEMS, i % SPAN_ELEMS
            xq[SPAN_ELEMS * s + 64 * (j % 2) + j // 2] = np.int8(q)
    for s in range(bias.shape[0] // 16):
        for lane in range(16):
            total = 0
            for c in range(4):
                total += xq[SPAN_ELEMS * s + 4 * lane + c] + xq[SPAN_ELEMS * s + 64 + 4 * lane + c]
            bias[16 * s + lane] = -OFFSET * total


@njit(inline="always", cache=True)
def _activation_arrays(x):
    t, n_in = x.shape
    n = (n_in + SPAN_ELEMS - 1) // SPAN_ELEMS
    xq = np.zeros((t, n * SPAN_ELEMS), np.int8)
    ascale = np.zeros((t, n * SPAN_GROUPS), np.float32)
    bias = np.zeros((t, n * 16), np.int32)
    return xq, ascale, bias


@njit(nogil=True, cache=True)
def quantize_activations(x):
    """`x [T, I]` float32 -> `(xq, ascale, bias)`, layout in the module docstring. One thread."""
    xq, ascale, bias = _activation_arrays(x)
    for t in range(x.shape[0]):
        _quantize_token(x[t], xq[t], ascale[t], bias[t])
    return xq, ascale, bias


@njit(parallel=True, nogil=True, cache=True)
def quantize_activations_parallel(x):
    """`quantize_activations`, parallel over tokens."""
    xq, ascale, bias = _activation_arrays(x)
    for t in prange(x.shape[0]):
        _quantize_token(x[t], xq[t], ascale[t], bias[t])
    return xq, ascale, bias


# --- the row dots, in LLVM IR ---------------------------------------------------------------------


def _lookup(b: ir.IRBuilder, isa: str, nibbles: ir.Value, nbytes: int) -> ir.Value:
    """`c + 12` for each nibble of `nibbles <nbytes x i8>` (values 0..15): `vpshufb` on a table repeated in
    every 16-byte lane (512-bit on AVX-512, else 256-bit pieces)."""
    if isa == "avx512vnni":
        fn = _declare(b, "llvm.x86.avx512.pshuf.b.512", _vec(I8, 64), [_vec(I8, 64)] * 2)
        return b.call(fn, [ir.Constant(_vec(I8, 64), list(LOOKUP) * 4), nibbles])
    fn = _declare(b, "llvm.x86.avx2.pshuf.b", _vec(I8, 32), [_vec(I8, 32)] * 2)
    table = ir.Constant(_vec(I8, 32), list(LOOKUP) * 2)
    pieces = []
    for k in range(nbytes // 32):
        piece = b.shuffle_vector(nibbles, nibbles, ir.Constant(_vec(I32, 32), list(range(32 * k, 32 * k + 32))))
        pieces.append(b.call(fn, [table, piece]))
    if len(pieces) == 1:
        return pieces[0]
    return b.shuffle_vector(pieces[0], pieces[1], ir.Constant(_vec(I32, 64), list(range(64))))


def _block_scales(b: ir.IRBuilder, e: ir.Value) -> ir.Value:
    """e8m0 bytes `<4 x i8>` -> float32 `2^(e - 128)` (subnormal for e < 2; 255 reads as 2^127)."""
    wide = b.zext(e, _vec(I32, 4))
    normal = b.shl(b.sub(wide, _splat(I32, 4, 1)), _splat(I32, 4, 23))
    low = b.select(b.icmp_unsigned("==", wide, _splat(I32, 4, 1)), _splat(I32, 4, 1 << 22), _splat(I32, 4, 1 << 21))
    bits = b.select(b.icmp_unsigned(">=", wide, _splat(I32, 4, 2)), normal, low)
    return b.bitcast(bits, _vec(F32, 4))


def _row_function(module: ir.Module, isa_name: str, n: int) -> ir.Function:
    """The LLVM function of `mx_dots` for `n` tokens, defined once per module:
    `(w, rows, row_stride, row_bytes, s, s_stride, groups, xq_0.., ascale_0.., bias_0.., out, out_stride)`."""
    name = f"hetero_moe_mxfp4_dots_{isa_name}_n{n}"
    if name in module.globals:
        return module.globals[name]
    p8 = I8.as_pointer()
    args = [p8, I64, I64, I64, p8, I64, I64, *[p8] * (3 * n), p8, I64]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), args), name)
    fn.linkage = "internal"
    fn.attributes.add("noinline")
    fn.attributes.add("nounwind")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    w, n_rows, row_stride, row_bytes, s_ptr, s_stride, groups, *ptrs, out, out_stride = fn.args
    tokens = [(ptrs[j], ptrs[n + j], ptrs[2 * n + j]) for j in range(n)]
    isa = CODEGEN[isa_name]
    width, vbytes = isa.width, isa.vbytes
    parts = 16 // width
    fma = _declare(b, f"llvm.fma.v{width}f32", _vec(F32, width), [_vec(F32, width)] * 3)
    zero = ir.Constant(_vec(F32, width), [0.0] * width)
    acc = [[cgutils.alloca_once_value(b, zero) for _ in range(parts)] for _ in range(n)]

    def const(v: int) -> ir.Constant:
        return ir.Constant(I64, v)

    def row_scales(srow: ir.Value, s: ir.Value, tail: bool) -> ir.Value:
        first = b.mul(s, const(SPAN_GROUPS))
        if not tail:
            e = b.load(b.bitcast(b.gep(srow, [first]), _vec(I8, SPAN_GROUPS).as_pointer()), align=1)
        else:  # blocks past the row may be past the array: read those from block 0, then zero them
            e = ir.Constant(_vec(I8, SPAN_GROUPS), [0] * SPAN_GROUPS)
            for q in range(SPAN_GROUPS):
                k = b.add(first, const(q))
                inside = b.icmp_signed("<", k, groups)
                v = b.load(b.gep(srow, [b.select(inside, k, const(0))]))
                e = b.insert_element(e, b.select(inside, v, ir.Constant(I8, 0)), ir.Constant(I32, q))
        return _block_scales(b, e)

    def span(srow: ir.Value, loads: _Loads, s: ir.Value, tail: bool) -> None:
        wbase = b.mul(s, const(SPAN_BYTES))
        xbase = b.mul(s, const(SPAN_ELEMS))
        bbase = b.mul(s, const(64))  # 16 int32 bias lanes per span
        abase = b.mul(s, const(4 * SPAN_GROUPS))
        sw = row_scales(srow, s, tail)  # zero past the row, so padded activations add +0 * 0
        for p in range(parts):
            lo, hi = isa.nibbles(b, loads.weights(b.add(wbase, const(p * vbytes)), vbytes, tail))
            lo, hi = _lookup(b, isa_name, lo, vbytes), _lookup(b, isa_name, hi, vbytes)
            mask = ir.Constant(_vec(I32, width), [(p * width + lane) // 4 for lane in range(width)])
            for j, (xrow, arow, brow) in enumerate(tokens):
                bias = loads.load(brow, b.add(bbase, const(4 * p * width)), _vec(I32, width), align=4)
                xlo = loads.load(xrow, b.add(xbase, const(p * vbytes)), _vec(I8, vbytes))
                xhi = loads.load(xrow, b.add(xbase, const(64 + p * vbytes)), _vec(I8, vbytes))
                lanes = isa.int4_lanes(b, lo, hi, xlo, xhi, bias)
                a = loads.load(arow, abase, _vec(F32, SPAN_GROUPS), align=4)
                scale = b.shuffle_vector(b.fmul(sw, a), ir.Constant(_vec(F32, SPAN_GROUPS), None), mask)
                b.store(b.call(fma, [b.sitofp(lanes, _vec(F32, width)), scale, b.load(acc[j][p])]), acc[j][p])

    def halves(v: ir.Value, k: int) -> list[ir.Value]:
        return [b.shuffle_vector(v, v, ir.Constant(_vec(I32, k), list(range(i, i + k)))) for i in (0, k)]

    full = b.udiv(row_bytes, const(SPAN_BYTES))
    has_tail = b.icmp_unsigned("!=", b.mul(full, const(SPAN_BYTES)), row_bytes)
    with cgutils.for_range(b, n_rows) as row:
        r = row.index
        wrow = b.gep(w, [b.mul(r, row_stride)])
        srow = b.gep(s_ptr, [b.mul(r, s_stride)])
        loads = _Loads(b, wrow, row_bytes)
        for j in range(n):
            for p in range(parts):
                b.store(zero, acc[j][p])
        with cgutils.for_range(b, full) as loop:
            span(srow, loads, loop.index, tail=False)
        with b.if_then(has_tail, likely=False):
            span(srow, loads, full, tail=True)
        for j in range(n):
            vals = [b.load(a) for a in acc[j]]
            v8 = b.fadd(*(halves(vals[0], 8) if width == 16 else vals))
            v4 = b.fadd(*halves(v8, 4))
            v2 = b.fadd(*halves(v4, 2))
            total = b.fadd(b.extract_element(v2, ir.Constant(I32, 0)), b.extract_element(v2, ir.Constant(I32, 1)))
            at = b.add(b.mul(const(j), out_stride), b.mul(r, const(4)))
            b.store(total, b.bitcast(b.gep(out, [at]), F32.as_pointer()))
    b.ret_void()
    return fn


def _is(t, dtype, ndim: int) -> bool:
    return isinstance(t, types.Array) and t.dtype == dtype and t.ndim == ndim


@intrinsic
def mx_dots(typingctx, simd, n, w, scales, xq, ascale, bias, rows, out):
    """`out[j, r] = w[r] . x[rows[j]]` for `j < n` (a constant from 1 to TILE) and every row r of `w [R, B]`
    uint8 (MXFP4 codes, B a multiple of 16) with `scales [R, B / 16]` uint8, over the tokens' `xq`, `ascale`,
    `bias` from `quantize_activations`; `rows [>= n]` int64, `out [>= n, >= R]` float32. Rows may be
    strided; within a row, elements must be contiguous (the caller checks)."""
    if not isinstance(simd, MxSimdType) or not isinstance(n, types.IntegerLiteral) or not 1 <= n.literal_value <= TILE:
        return None
    wanted = [
        (w, types.uint8, 2),
        (scales, types.uint8, 2),
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
        arrays = [context.make_array(t)(context, builder, v) for t, v in zip(sig.args[2:], args[2:], strict=True)]
        wa, sa, xqa, aa, ba, rowsa, outa = arrays
        p8 = I8.as_pointer()
        per_token = []
        for a in (xqa, aa, ba):
            stride = builder.extract_value(a.strides, 0)
            base = builder.bitcast(a.data, p8)
            for j in range(count):
                t = builder.load(builder.gep(rowsa.data, [ir.Constant(I64, j)]))
                per_token.append(builder.gep(base, [builder.mul(t, stride)]))
        fn = _row_function(builder.module, simd.isa, count)
        call = [builder.bitcast(wa.data, p8), builder.extract_value(wa.shape, 0), builder.extract_value(wa.strides, 0)]
        call += [builder.extract_value(wa.shape, 1), builder.bitcast(sa.data, p8)]
        call += [builder.extract_value(sa.strides, 0), builder.extract_value(sa.shape, 1)]
        builder.call(fn, [*call, *per_token, builder.bitcast(outa.data, p8), builder.extract_value(outa.strides, 0)])
        return context.get_dummy_value()

    return types.none(simd, n, w, scales, xq, ascale, bias, rows, out), codegen


# --- the kernels ----------------------------------------------------------------------------------


@njit(inline="always", cache=True)
def _tile(n: int) -> int:
    return TILE if n >= TILE else (2 if n >= 2 else 1)


@njit(inline="always", cache=True)
def _dots(simd, n, w, scales, xq, ascale, bias, rows, out) -> None:
    if n == TILE:
        mx_dots(simd, 4, w, scales, xq, ascale, bias, rows, out)
    elif n == 2:
        mx_dots(simd, 2, w, scales, xq, ascale, bias, rows, out)
    else:
        mx_dots(simd, 1, w, scales, xq, ascale, bias, rows, out)


@njit(inline="always", cache=True)
def _check(w, scales, xq, ascale, bias) -> None:
    row_bytes = w.shape[-1]
    n = (row_bytes + SPAN_BYTES - 1) // SPAN_BYTES
    if row_bytes % 16 or scales.shape[-1] * 16 != row_bytes or w.shape[:-1] != scales.shape[:-1]:
        raise ValueError("MXFP4 weights [.., B] need scales [.., B / 16], B a multiple of 16")
    if xq.shape[1] < n * SPAN_ELEMS or ascale.shape[1] < n * SPAN_GROUPS or bias.shape[1] < n * 16:
        raise ValueError("activations are too short for the weights")
    if w.strides[-1] != 1 or scales.strides[-1] != 1 or xq.strides[1] != 1 or ascale.strides[1] != 4:
        raise ValueError("rows of weights, scales and activations must be contiguous")
    if bias.strides[1] != 4:
        raise ValueError("rows of weights, scales and activations must be contiguous")


@njit(inline="always", cache=True)
def clamped_swiglu(gate, up, alpha, limit):
    """gpt-oss's activation of the float32 sums `gate`, `up` (module docstring); float32."""
    g = min(gate, limit)
    u = min(max(up, -limit), limit)
    g64 = np.float64(g)
    return np.float32((np.float64(u) + 1.0) * (g64 / (1.0 + math.exp(-np.float64(alpha) * g64))))


@njit(parallel=True, nogil=True, cache=True)
def gate_up(simd, xq, ascale, bias, pair_token, seg, seg_expert, w13, s13, b13, alpha, limit, rows_per_task, h):
    """`h[p] = clamped_swiglu(x[t] W_gate[e]^T + b_gate[e], x[t] W_up[e]^T + b_up[e])` for every pair p =
    (token t, expert e), grouped by expert (`pair_token [P]`, `seg [U + 1]`, `seg_expert [U]`, as
    `common.group_by_expert` gives them). `w13 [E, 2I, H / 2]` uint8 and `s13 [E, 2I, H / 32]` uint8, gate and
    up rows interleaved; `b13 [E, 2I]` float32, interleaved alike; `alpha`, `limit` float32; `h [P, I]`
    float32. Tasks are blocks of `rows_per_task` outputs of one expert; tiles of up to 4 pairs share each
    weight load."""
    inter = h.shape[1]
    _check(w13, s13, xq, ascale, bias)
    if w13.shape[1] != 2 * inter or b13.shape[1] != 2 * inter or h.shape[0] < pair_token.shape[0]:
        raise ValueError("w13 and b13 must hold 2 * I rows and h one row per pair")
    chunks = (inter + rows_per_task - 1) // rows_per_task
    for task in prange(seg_expert.shape[0] * chunks):
        u, c = task // chunks, task % chunks
        e = seg_expert[u]
        r0, r1 = c * rows_per_task, min((c + 1) * rows_per_task, inter)
        rows = np.empty(TILE, np.int64)
        both = np.empty((TILE, 2 * (r1 - r0)), np.float32)  # gate and up, interleaved
        p = seg[u]
        while p < seg[u + 1]:
            n = _tile(seg[u + 1] - p)
            for j in range(n):
                rows[j] = pair_token[p + j]
            _dots(simd, n, w13[e, 2 * r0 : 2 * r1], s13[e, 2 * r0 : 2 * r1], xq, ascale, bias, rows, both)
            for j in range(n):
                for r in range(r1 - r0):
                    g = both[j, 2 * r] + b13[e, 2 * (r0 + r)]
                    up = both[j, 2 * r + 1] + b13[e, 2 * (r0 + r) + 1]
                    h[p + j, r0 + r] = clamped_swiglu(g, up, alpha, limit)
            p += n


@njit(parallel=True, nogil=True, cache=True)
def down(simd, xq, ascale, bias, seg, seg_expert, w2, s2, b2, rows_per_task, y):
    """`y[p] = h[p] W_down[e]^T + b_down[e]` for every pair, grouped by expert as in `gate_up`; `xq, ascale,
    bias` quantize `h [P, I]`; `w2 [E, H, I / 2]`, `s2 [E, H, I / 32]` uint8, `b2 [E, H]` float32, `y [P, H]`."""
    hidden = y.shape[1]
    _check(w2, s2, xq, ascale, bias)
    if w2.shape[1] != hidden or b2.shape[1] != hidden or xq.shape[0] < seg[-1] or y.shape[0] < seg[-1]:
        raise ValueError("w2 and b2 must hold H rows, and h and y one row per pair")
    chunks = (hidden + rows_per_task - 1) // rows_per_task
    for task in prange(seg_expert.shape[0] * chunks):
        u, c = task // chunks, task % chunks
        e = seg_expert[u]
        r0, r1 = c * rows_per_task, min((c + 1) * rows_per_task, hidden)
        rows = np.empty(TILE, np.int64)
        out = np.empty((TILE, r1 - r0), np.float32)
        p = seg[u]
        while p < seg[u + 1]:
            n = _tile(seg[u + 1] - p)
            for j in range(n):
                rows[j] = p + j
            _dots(simd, n, w2[e, r0:r1], s2[e, r0:r1], xq, ascale, bias, rows, out)
            for j in range(n):
                for r in range(r1 - r0):
                    y[p + j, r0 + r] = out[j, r] + b2[e, r0 + r]
            p += n


# float32 kernels for CPUs without AVX2 (the `float` backend): close to the integer ones, not the same bits.


def scale_table() -> np.ndarray:
    """float32 `2^(s - 127)` of every e8m0 byte (255 as 2^127, as the integer kernels read it)."""
    return np.ldexp(np.float32(1.0), np.minimum(np.arange(256), 254) - 127).astype(np.float32)


VALUES = np.array([v / 2 for v in (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)], np.float32)


@njit(inline="always", fastmath=True, cache=True)
def _float_row(wrow, srow, x, values, table) -> float:
    total = np.float32(0.0)
    for k in range(srow.shape[0]):
        acc = np.float32(0.0)
        for j in range(16):
            byte = wrow[16 * k + j]
            acc += values[byte & 15] * x[32 * k + 2 * j] + values[byte >> 4] * x[32 * k + 2 * j + 1]
        total += table[srow[k]] * acc
    return total


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def float_gate_up(x, pair_token, seg, seg_expert, w13, s13, b13, alpha, limit, values, table, h):
    """`gate_up` in float32: `x [T, H]` float32, the rest as `gate_up`."""
    inter = h.shape[1]
    for task in prange(seg_expert.shape[0] * inter):
        u, r = task // inter, task % inter
        e = seg_expert[u]
        for p in range(seg[u], seg[u + 1]):
            xt = x[pair_token[p]]
            g = _float_row(w13[e, 2 * r], s13[e, 2 * r], xt, values, table) + b13[e, 2 * r]
            up = _float_row(w13[e, 2 * r + 1], s13[e, 2 * r + 1], xt, values, table) + b13[e, 2 * r + 1]
            h[p, r] = clamped_swiglu(g, up, alpha, limit)


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def float_down(h, seg, seg_expert, w2, s2, b2, values, table, y):
    """`down` in float32: `h [P, I]` float32."""
    hidden = y.shape[1]
    for task in prange(seg_expert.shape[0] * hidden):
        u, r = task // hidden, task % hidden
        e = seg_expert[u]
        for p in range(seg[u], seg[u + 1]):
            y[p, r] = _float_row(w2[e, r], s2[e, r], h[p], values, table) + b2[e, r]


@dataclass(frozen=True)
class Kernels:
    """The MXFP4 kernels of one backend. `act` is what `activations` returns; pass it on unchanged:

    - `activations(x [T, I] float32) -> act`
    - `gate_up(act, pair_token, seg, seg_expert, w13, s13, b13, alpha, limit, rows_per_task, h [P, I])`
    - `down(act_h, seg, seg_expert, w2, s2, b2, rows_per_task, y [P, H])`, `act_h = activations(h)`
    """

    isa: str
    activations: Callable[[np.ndarray], tuple]
    gate_up: Callable[..., None]
    down: Callable[..., None]


@functools.cache
def kernels(isa: str) -> Kernels:
    """The kernels of instruction set `isa`: a `simd.CODEGEN` name the caller has checked against the CPU
    (`simd.choose_isa`; the emulated VNNI sets for tests), or `float`. Nothing is compiled here."""
    if isa == "float":
        values, table = VALUES, scale_table()

        def float_gate_up_(act, pair_token, seg, seg_expert, w13, s13, b13, alpha, limit, rows_per_task, h):
            float_gate_up(act, pair_token, seg, seg_expert, w13, s13, b13, alpha, limit, values, table, h)

        def float_down_(act, seg, seg_expert, w2, s2, b2, rows_per_task, y):
            float_down(act, seg, seg_expert, w2, s2, b2, values, table, y)

        return Kernels(isa, lambda x: x, float_gate_up_, float_down_)
    simd = MxSimd(isa)

    def activations(x: np.ndarray) -> tuple:
        return (quantize_activations_parallel if x.size >= PARALLEL_ELEMENTS else quantize_activations)(x)

    def gate_up_(act, pair_token, seg, seg_expert, w13, s13, b13, alpha, limit, rows_per_task, h):
        gate_up(simd, *act, pair_token, seg, seg_expert, w13, s13, b13, alpha, limit, rows_per_task, h)

    def down_(act, seg, seg_expert, w2, s2, b2, rows_per_task, y):
        down(simd, *act, seg, seg_expert, w2, s2, b2, rows_per_task, y)

    return Kernels(isa, activations, gate_up_, down_)
