"""AMX tiles for many tokens of rows across lanes (`simd.py`, "Rows across lanes"): `amx_dots`, `span_dots`' bits.

Intel's AMX (Sapphire Rapids and later) has eight tile registers of up to 16 rows of 64 bytes. One `tdpbssd`
multiplies a tile A of signed bytes (16 tokens' `xq`, 64 inputs each, in input order) by a tile B of signed bytes
(row q holds, for each of 16 weight rows r, their weights of inputs `4 q .. 4 q + 3` at bytes `4 r ..`) into a tile
C of 16 x 16 int32 sums: 16,384 multiply-adds in one instruction, where `vpdpbusd` does 64. A 64-byte chunk of INT8
rows across lanes is one row of B as it lies in memory; an INT4 chunk's low nibbles are row `2 c` and its high
nibbles row `2 c + 1` (`int8dot.to_lanes`). A task's first call of `amx_dots` writes its rows once as B tiles,
`code - offset` in signed bytes (so C needs no bias), 64-byte aligned (a tile load of lines split in two runs ~7x
slower), into room the task keeps (`amx_room`), each group's a few groups ahead of its products; its later calls,
for the task's other tiles of up to 16 tokens, read them from cache.

The arithmetic is the canonical one of rows across lanes: `C[t, r]` for group k is the exact int32 `isum` the lane
of `vpdpbusd` holds, and `acc[t] = fma(float(isum), sw[k] * a[t, k], acc[t])` runs in the same order, so every
token's result has the bits of `span_dots` on any isa. C goes through memory (a tile's only way out), and the scale
arithmetic runs on 16-lane vectors: 3 vector operations a token and group of 16 rows, against `g / 4` dot products
on the vector path. Tile products and scale arithmetic are software-pipelined (`LAG`).

What it gains, on the AMX Xeon (2 cores, sessions 20-22, `docs/benchmarks.md`): one thread, 16 tokens, rows in
cache, 2.0-2.1x `span_dots`' tiles of 8 for INT4 g64; a V2-Lite experts layer at 683 tokens about 1.5x for INT4 and
1.2x for INT8 g32 (half the multiply-adds a group for the same scale work); a whole V2-Lite prefill of 512 tokens
1.18-1.30x (INT4, before the fill moved into the first call). The tile products would allow far more: the scale
arithmetic, the fill and C's round trip through memory bound it, at 4-8 % of AMX's own peak. On that Xeon, while a
core runs AMX (and for microseconds after) its 512-bit `fma`s and `vpdpbusd`s go at half rate and `vmulps` and
`vcvtdq2ps` at about 0.6 (`vaddps`, `vpaddd` keep theirs; session 21): a product's 48 scale operations take ~42
cycles against its 16.

Linux hands out AMX's register state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, kernel 5.16 on):
`simd.amx_permitted` asks once, and `simd.choose_isa` picks `avx512amx` only where it was granted. A call loads
its tile configuration (`ldtilecfg`) and releases the tiles at its end.
"""

from __future__ import annotations

import numpy as np
from hetero_moe.kernels.numba.simd import (
    AMX_TILE,
    CODEGEN,
    F32,
    FORMATS,
    I8,
    I16,
    I32,
    I64,
    INT4,
    LANE_ROWS,
    LANES,
    OFFSETS,
    PREFETCH,
    PREFETCH_LOCALITY,
    SimdType,
    _broadcast,
    _declare,
    _half_scales,
    _is,
    _kernel_function,
    _prefetch,
    _splat,
    _vec,
    uses_amx,
)
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

AMX_LEAST = 8  # fewest tokens `int8dot.dots` gives AMX (fewer go through `span_dots`)
# Rows a parallel task takes on AMX where experts have many tokens (`many_rows`): as many as keep the B tiles of a
# matrix's task within AMX_ROOM bytes (in L2 beside the other matrix of `gate_up`), at most AMX_ROWS: each call sets
# up its tile of tokens for all of them
AMX_ROWS, AMX_ROOM = 256, 512 << 10
LAG = 2  # groups between a group's tile products and its scale arithmetic, which reads C through memory
# groups whose B tiles the first call of a run of calls (the one that fills them) writes ahead of its products: a tile
# load waits for vector stores to its lines still in flight (1 to 16 ran alike, session 22)
LEAD = 4
TILE_C, TILES_A, TILES_B = 0, (1, 2), (3, 4)  # tile registers; A and B alternate within a group of 128 inputs


def _config(shapes: list[tuple[int, int, int]]) -> list[int]:
    """The 64 bytes `ldtilecfg` loads (palette 1) for tiles `(register, rows, bytes a row)`."""
    config = [0] * 64
    config[0] = 1
    for tile, rows, colsb in shapes:
        config[16 + 2 * tile], config[17 + 2 * tile] = colsb & 255, colsb >> 8
        config[48 + tile] = rows
    return config


def tile_config(g: int) -> list[int]:
    """`amx_dots`' configuration: a C tile of 16 rows of 16 int32; A tiles of 16 tokens of `min(g, 64)` bytes; B
    tiles of `min(g, 64) / 4` rows of 64 bytes."""
    k = min(g, 64)
    return _config([(TILE_C, 16, 64)] + [(a, AMX_TILE, k) for a in TILES_A] + [(t, k // 4, 64) for t in TILES_B])


def _tile_op(b: ir.IRBuilder, name: str, *args) -> None:
    """Call `llvm.x86.{name}` (ints are tile registers, an `i8` immediate)."""
    kinds = [I8 if isinstance(a, int) else a.type for a in args]
    values = [ir.Constant(I8, a) if isinstance(a, int) else a for a in args]
    b.call(_declare(b, f"llvm.x86.{name}", ir.VoidType(), kinds), values)


def _load_config(b: ir.IRBuilder, config: list[int]) -> None:
    """`ldtilecfg` of `config` (`_config`), from a 64-byte-aligned stack slot."""
    config_type = ir.ArrayType(I8, 64)
    slot = cgutils.alloca_once(b, config_type)
    slot.align = 64
    b.store(ir.Constant(config_type, bytearray(config)), slot)
    _tile_op(b, "ldtilecfg", b.bitcast(slot, I8.as_pointer()))


def _builder_helpers(b: ir.IRBuilder):
    def const(v: int) -> ir.Constant:
        return ir.Constant(I64, v)

    def at(base: ir.Value, offset: ir.Value) -> ir.Value:
        return b.gep(base, [offset])

    def load(base: ir.Value, offset: ir.Value, vtype: ir.Type) -> ir.Value:
        return b.load(b.bitcast(at(base, offset), vtype.as_pointer()), align=1)

    return const, at, load


def _aligned64(b: ir.IRBuilder, p: ir.Value) -> ir.Value:
    """`p` rounded up to a multiple of 64: tile loads of lines split in two run several times slower."""
    address = b.ptrtoint(p, I64)
    return b.inttoptr(b.and_(b.add(address, ir.Constant(I64, 63)), ir.Constant(I64, -64)), p.type)


def _fill(b: ir.IRBuilder, simd: SimdType, w: ir.Value, tiles: ir.Value, chunks: int) -> None:
    """The `chunks` 64-byte chunks of rows across lanes at `w` as B tiles at `tiles` (64-byte aligned), `code -
    offset` in signed bytes: INT8's chunks in their order, INT4's each as its low nibbles, then its high nibbles."""
    const, at, load = _builder_helpers(b)
    halves_of = 2 if LANES[simd.fmt] == INT4 else 1
    prefetch = _prefetch(b)
    for c in range(chunks):
        if PREFETCH:
            locality = (ir.Constant(I32, v) for v in (0, PREFETCH_LOCALITY, 1))
            b.call(prefetch, [at(w, const(64 * c + PREFETCH)), *locality])
        codes = load(w, const(64 * c), _vec(I8, 64))
        halves = CODEGEN[simd.isa].nibbles(b, codes) if halves_of == 2 else (codes,)
        for q, half in enumerate(halves):
            signed = b.sub(half, _splat(I8, 64, OFFSETS[LANES[simd.fmt]]))
            dest = at(tiles, const(64 * (halves_of * c + q)))
            b.store(signed, b.bitcast(dest, _vec(I8, 64).as_pointer()), align=64)


def _amx_function(module: ir.Module, simd: SimdType) -> ir.Function:
    """The LLVM function of `amx_dots`: `(room, w, fill, n_rows, row_stride, s, s_stride, groups, xq_0..,
    ascale_0.., out, out_stride)`, byte pointers and byte strides. The 16 tokens' `xq` laid out as A tiles and their
    scales group by group, after the B tiles in the room; then for each block of 16 rows and each group, C from one
    tile product a 64 inputs, stored and scaled into 16 float32 vectors of accumulators, one a token. With `fill`,
    the rows `w` are written as B tiles on the way, `LEAD` groups ahead of their products."""
    name = f"hetero_moe_amx_dots_{simd.isa}_{FORMATS[simd.fmt]}_g{simd.g}_s{simd.kind}"
    p8 = I8.as_pointer()
    n = AMX_TILE
    fn = _kernel_function(module, name, [p8, p8, I64, I64, I64, p8, I64, I64, *[p8] * (2 * n), p8, I64])
    if fn.blocks:
        return fn
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    const, at, load = _builder_helpers(b)
    tiles, w, fill, n_rows, row_stride, s_ptr, s_stride, groups, *ptrs, out, out_stride = fn.args
    tiles = _aligned64(b, tiles)
    xrows, arows = ptrs[:n], ptrs[n : 2 * n]
    int4 = LANES[simd.fmt] == INT4
    g, part = simd.g, min(simd.g, 64)  # inputs of a group, and of one tile product
    parts = g // part
    vf, vi = _vec(F32, 16), _vec(I32, 16)

    def tile(name: str, *args) -> None:
        _tile_op(b, name, *args)

    def aligned(vtype: ir.Type) -> ir.Value:
        slot = cgutils.alloca_once(b, vtype)
        slot.align = 64
        return b.bitcast(slot, p8)

    fma = _declare(b, "llvm.fma.v16f32", vf, [vf] * 3)
    _load_config(b, tile_config(g))

    # A's tiles one after another (group k, part h: 16 tokens' `part` bytes side by side), and the tokens' activation
    # scales group by group, 16 side by side: one stream, and one base pointer for them all
    widen = 2 if int4 else 1  # bytes of B tiles a byte of weights
    abuf = at(tiles, b.mul(n_rows, b.mul(row_stride, const(widen))))  # after the B tiles in `room`
    scales_a = b.bitcast(at(abuf, b.mul(groups, const(g * n))), I32.as_pointer())
    with cgutils.for_range(b, groups) as loop:
        k = loop.index
        for t in range(n):
            for h in range(parts):
                piece = load(xrows[t], b.add(b.mul(k, const(g)), const(part * h)), _vec(I8, part))
                dest = at(abuf, b.add(b.mul(k, const(g * n)), const(part * (n * h + t))))
                b.store(piece, b.bitcast(dest, _vec(I8, part).as_pointer()), align=part)
            to = b.add(b.mul(k, const(n)), const(t))
            b.store(load(arows[t], b.mul(k, const(4)), I32), b.gep(scales_a, [to]))
    scales_a = b.bitcast(scales_a, p8)

    # A group of a block of 16 rows (a "step", `blocks x groups` of them in the order of memory) has `16 g / widen`
    # bytes of rows and `16 g` of B tiles. The fill writes step `j + LEAD`'s B tiles during step `j`.
    steps = b.mul(b.udiv(n_rows, const(LANE_ROWS)), groups)
    step_bytes = LANE_ROWS * g // widen
    filling = b.icmp_unsigned("!=", fill, const(0))

    def fill_step(j: ir.Value) -> None:
        with b.if_then(b.and_(filling, b.icmp_unsigned("<", j, steps))):
            source = at(w, b.mul(j, const(step_bytes)))
            _fill(b, simd, source, at(tiles, b.mul(j, const(step_bytes * widen))), step_bytes // 64)

    with cgutils.for_range(b, const(LEAD)) as lead:
        fill_step(lead.index)
    # C tiles stored for the scale arithmetic: LAG + 1 of them, one a group, reused LAG + 1 groups on
    cbufs = aligned(ir.ArrayType(I32, (LAG + 1) * 16 * 16))
    zero = ir.Constant(vf, [0.0] * 16)
    accs = [cgutils.alloca_once_value(b, zero) for _ in range(n)]
    block_tiles, block_scales = b.mul(row_stride, const(LANE_ROWS * widen)), b.mul(s_stride, const(LANE_ROWS))
    tile_bytes = part * 16  # of one B tile: `part / 4` rows of 64 bytes

    def products(tblock: ir.Value, k: ir.Value) -> None:
        """Group `k`'s sums into tile C (stored a group later: a tile store waits for its product, ~50 cycles, and
        holds up the tile instructions after it)."""
        tile("tilezero", TILE_C)
        for h in range(parts):
            b_tile = at(tblock, b.add(b.mul(k, const(g * 16)), const(tile_bytes * h)))
            tile("tileloadd64", TILES_B[h % 2], b_tile, const(64))
            a_tile = at(abuf, b.add(b.mul(k, const(g * n)), const(part * n * h)))
            tile("tileloadd64", TILES_A[h % 2], a_tile, const(part))
            tile("tdpbssd", TILE_C, TILES_A[h % 2], TILES_B[h % 2])

    def cbuf(k: ir.Value) -> ir.Value:
        """Where tile C of group `k` is stored."""
        return at(cbufs, b.mul(b.urem(k, const(LAG + 1)), const(1024)))

    def scale(sblock: ir.Value, k: ir.Value, sums: ir.Value) -> None:
        """Group `k`'s sums, stored at `sums`, scaled into the accumulators."""
        sw = _half_scales(b, load(sblock, b.mul(k, const(2 * LANE_ROWS)), _vec(I16, 16)), simd.kind, 16)
        k64 = b.mul(k, const(4 * n))
        for t in range(n):
            word = b.add(k64, const(4 * t))
            isum = load(sums, const(64 * t), vi)
            a = _broadcast(b, load(scales_a, word, F32), 16)
            b.store(b.call(fma, [b.sitofp(isum, vf), b.fmul(sw, a), b.load(accs[t])]), accs[t])

    with cgutils.for_range(b, b.udiv(n_rows, const(LANE_ROWS))) as blocks:
        tblock = at(tiles, b.mul(blocks.index, block_tiles))
        sblock = at(s_ptr, b.mul(blocks.index, block_scales))
        first = b.mul(blocks.index, groups)  # step of the block's first group
        for acc in accs:
            b.store(zero, acc)
        # Software-pipelined: iteration i stores C of group i - 1 just before group i's product into it, and scales
        # group i - LAG's sums while the products run.
        with cgutils.for_range(b, b.add(groups, const(LAG))) as loop:
            i = loop.index
            with b.if_then(b.and_(b.icmp_unsigned(">=", i, const(1)), b.icmp_unsigned("<=", i, groups))):
                tile("tilestored64", TILE_C, cbuf(b.sub(i, const(1))), const(64))
            with b.if_then(b.icmp_unsigned("<", i, groups)):
                fill_step(b.add(b.add(first, i), const(LEAD)))
                products(tblock, i)
            with b.if_then(b.icmp_unsigned(">=", i, const(LAG))):
                done = b.sub(i, const(LAG))
                scale(sblock, done, cbuf(done))
        column = b.mul(blocks.index, const(4 * LANE_ROWS))
        for t in range(n):
            dest = at(out, b.add(b.mul(const(t), out_stride), column))
            b.store(b.load(accs[t]), b.bitcast(dest, vf.as_pointer()), align=4)
    tile("tilerelease")
    b.ret_void()
    return fn


def amx_room(simd, w, tokens):
    """A uint8 array for the B tiles of the rows `w [R, B]` (twice their bytes for INT4) and the room
    `amx_dots` lays out the tokens in (their A tiles and scales, `16 (I + I / g * 4)` bytes for I inputs), with 64
    to round its start up, where `simd.amx` and the calls take `tokens >= AMX_LEAST` tokens; else an empty one
    (decode allocates nothing). Jitted code only."""
    raise TypeError("amx_room runs inside jitted code")


_NO_ROOM = np.empty(0, np.uint8)


@overload(amx_room, inline="always")
def _amx_room(simd, w, tokens):
    if not isinstance(simd, SimdType):
        return None
    if not uses_amx(simd):
        return lambda simd, w, tokens: _NO_ROOM
    widen = 2 if LANES[simd.fmt] == INT4 else 1
    g = simd.g

    def room(simd, w, tokens):
        if tokens < AMX_LEAST:
            return np.empty(0, np.uint8)
        inputs = w.shape[1] * widen
        return np.empty(w.shape[0] * inputs + AMX_TILE * (inputs + inputs // g * 4) + 64, np.uint8)

    return room


def many_rows(simd, row_bytes):
    """The least rows a parallel task takes where experts have many tokens, for rows of `row_bytes` (0: the caller's
    least): on AMX, as many as keep a task's B tiles within `AMX_ROOM`, `LANE_ROWS` to `AMX_ROWS`. Jitted code
    only."""
    raise TypeError("many_rows runs inside jitted code")


@overload(many_rows, inline="always")
def _many_rows(simd, row_bytes):
    if not isinstance(simd, SimdType):
        return None
    if not uses_amx(simd):
        return lambda simd, row_bytes: 0
    widen = 2 if LANES[simd.fmt] == INT4 else 1

    def rows(simd, row_bytes):
        return min(AMX_ROWS, max(LANE_ROWS, AMX_ROOM // (row_bytes * widen) // LANE_ROWS * LANE_ROWS))

    return rows


def _typed(simd, arrays) -> bool:
    return isinstance(simd, SimdType) and uses_amx(simd) and all(_is(t, dtype, ndim) for t, dtype, ndim in arrays)


@intrinsic
def amx_dots(typingctx, simd, n, tiles, w, scales, xq, ascale, rows, out, fill):
    """`span_dots` (the same bits) of `n` tokens, up to 16 at run time, with rows across lanes `w [R, B]` (whole
    blocks, C-contiguous), on AMX tiles, their B tiles in `tiles` (`amx_room`), which the call writes first if
    `fill` (the first call of a run with the same rows; the others read them): `out[j, r] = w[r] . xq[rows[j]]`
    for `j < 16`, tokens past `n` repeating token `n - 1` (`out` has 16 rows). No `bias`: the B tiles are signed.
    Runs only on the `avx512amx` isa (`simd.choose_isa`), where Linux granted the tiles."""
    arrays = [
        (tiles, types.uint8, 1),
        (w, types.uint8, 2),
        (scales, types.uint16, 2),
        (xq, types.int8, 2),
        (ascale, types.float32, 2),
        (rows, types.int64, 1),
        (out, types.float32, 2),
    ]
    if not _typed(simd, arrays) or not all(isinstance(t, (types.Integer, types.Boolean)) for t in (n, fill)):
        return None

    def codegen(context, builder, sig, args):
        b = builder
        tiles_, w_, scales_, xq_, ascale_, rows_, out_ = (
            context.make_array(t)(context, b, v) for t, v in zip(sig.args[2:9], args[2:9], strict=True)
        )
        p8 = I8.as_pointer()
        last = b.sub(context.cast(b, args[1], sig.args[1], types.int64), ir.Constant(I64, 1))
        per_token = []
        for a in (xq_, ascale_):
            stride = b.extract_value(a.strides, 0)
            base = b.bitcast(a.data, p8)
            for j in range(AMX_TILE):
                index = b.select(b.icmp_signed("<", ir.Constant(I64, j), last), ir.Constant(I64, j), last)
                t = b.load(b.gep(rows_.data, [index]))
                per_token.append(b.gep(base, [b.mul(t, stride)]))
        fill_ = context.cast(b, args[9], sig.args[9], types.int64)
        call = [b.bitcast(tiles_.data, p8), b.bitcast(w_.data, p8), fill_, b.extract_value(w_.shape, 0)]
        call += [b.extract_value(w_.strides, 0)]
        call += [b.bitcast(scales_.data, p8), b.extract_value(scales_.strides, 0), b.extract_value(scales_.shape, 1)]
        call += [*per_token, b.bitcast(out_.data, p8), b.extract_value(out_.strides, 0)]
        b.call(_amx_function(b.module, simd), call)
        return context.get_dummy_value()

    return types.none(simd, n, tiles, w, scales, xq, ascale, rows, out, fill), codegen


PEAK_TILES = 4  # independent tile products a round of `tile_rounds`: more than their latency over throughput


@intrinsic
def tile_rounds(typingctx, rounds):
    """`rounds` times `PEAK_TILES` independent tile products of 16 x 16 x 64 int8 multiply-adds each, register to
    register on zeroed tiles, -> C's first int32 (0): AMX's peak multiply-adds a second, which `bench experts`
    measures. Only where `simd.amx_permitted` (and the CPU has AMX)."""
    if not isinstance(rounds, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        b = builder
        _load_config(b, _config([(t, 16, 64) for t in range(8)]))
        out = cgutils.alloca_once(b, ir.ArrayType(I32, 256))

        def tile(name: str, *values) -> None:
            _tile_op(b, name, *values)

        for t in range(8):
            tile("tilezero", t)
        with cgutils.for_range(b, context.cast(b, args[0], sig.args[0], types.int64)):
            for c in range(PEAK_TILES):
                tile("tdpbssd", c, 4 + c // 2, 6 + c % 2)
        tile("tilestored64", 0, b.bitcast(out, I8.as_pointer()), ir.Constant(I64, 64))
        tile("tilerelease")
        return b.sext(b.load(b.gep(out, [ir.Constant(I32, 0), ir.Constant(I32, 0)])), I64)

    return types.int64(rounds), codegen
