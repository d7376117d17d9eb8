"""AMX tiles for many tokens of rows across lanes (`simd.py`, "Rows across lanes"): `amx_dots`, `span_dots`' bits.

Intel's AMX (Sapphire Rapids and later) has eight tile registers of up to 16 rows of 64 bytes. One `tdpbssd`
multiplies a tile A of signed bytes (16 tokens' `xq`, 64 inputs each, in input order) by a tile B of signed bytes
(row q holds, for each of 16 weight rows r, their weights of inputs `4 q .. 4 q + 3` at bytes `4 r ..`) into a tile
C of 16 x 16 int32 sums: 16,384 multiply-adds in one instruction, where `vpdpbusd` does 64. A 64-byte chunk of INT8
rows across lanes is one row of B as it lies in memory; an INT4 chunk's low nibbles are row `2 c` and its high
nibbles row `2 c + 1` (`int8dot.to_lanes`). One call of `amx_dots` takes all of an expert's tokens for a task's
rows (up to `AMX_TOKENS`) and reads the rows once. It goes through a block of 16 rows a chunk of `CHUNK` inputs at a
time, tile of 16 tokens by tile, each tile's accumulators in registers through the chunk; the chunk's rows were
written as B tiles during the chunk before (spread across its products), `code - offset` in signed bytes (so C
needs no bias), 64-byte aligned (a tile load of lines split in two runs ~7x slower), 8 KB that every tile of tokens
reads from L1. A task's rows so stream from DRAM across all of its products, and a call keeps in cache
(`amx_room`) only its tokens' A tiles, two chunks of B tiles, C buffers and accumulators.

The arithmetic is the canonical one of rows across lanes: `C[t, r]` for group k is the exact int32 `isum` the lane
of `vpdpbusd` holds, and `acc[t] = fma(float(isum), sw[k] * a[t, k], acc[t])` runs in the same order, so every
token's result has the bits of `span_dots` on any isa. C goes through memory (a tile's only way out), and the scale
arithmetic runs on 16-lane vectors: 3 vector operations a token and group of 16 rows, against `g / 4` dot products
on the vector path. Tile products and scale arithmetic are software-pipelined: a product's C, in one of two tile
registers, is stored during the next product and scaled `LAG` products after its own.

What it gains, on the AMX Xeon (2 cores, sessions 20-22, `docs/benchmarks.md`): one thread, 16 tokens, rows in
cache, 2.0-2.1x `span_dots`' tiles of 8 for INT4 g64; a V2-Lite experts layer at 683 tokens about 1.5x for INT4 and
1.2x for INT8 g32 (half the multiply-adds a group for the same scale work); a whole V2-Lite prefill of 512 tokens
1.18-1.30x (INT4, sessions 20-21); one call for all tokens, by chunks, made the INT8 layer 1.1-1.2x faster again
(session 23). The tile products would allow far more: the scale arithmetic and C's round trip through memory bound
it, at 4-8 % of AMX's own peak. On that Xeon, while a
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
AMX_TOKENS = 128  # most tokens one `amx_dots` call takes (`int8dot.tile`): 8 tiles of 16
# Rows a parallel task takes on AMX where experts have many tokens (`many_rows`): each call lays out its tokens as A
# tiles for all of them
AMX_ROWS = 256
# inputs of a chunk: a call goes through a block of 16 rows a chunk at a time, for each tile of tokens, with the
# tile's accumulators in registers through the chunk (in memory from group to group, they cost 1.07-1.12x the time of
# a V2-Lite INT8 layer, session 23); the chunk's B tiles (8 KB) are read once a tile, from L1
CHUNK = 512
LAG = 2  # products between a product and its scale arithmetic, which reads C through memory
C_BYTES = 1024  # of a C tile: 16 tokens' 16 int32 sums
# tile registers: C and A alternate from product to product (A within a group of 128 inputs), B holds a group's
TILES_C, TILES_A, TILES_B = (0, 1), (2, 3), (4, 5)


def _config(shapes: list[tuple[int, int, int]]) -> list[int]:
    """The 64 bytes `ldtilecfg` loads (palette 1) for tiles `(register, rows, bytes a row)`."""
    config = [0] * 64
    config[0] = 1
    for tile, rows, colsb in shapes:
        config[16 + 2 * tile], config[17 + 2 * tile] = colsb & 255, colsb >> 8
        config[48 + tile] = rows
    return config


def tile_config(g: int) -> list[int]:
    """`amx_dots`' configuration: C tiles of 16 rows of 16 int32; A tiles of 16 tokens of `min(g, 64)` bytes; B
    tiles of `min(g, 64) / 4` rows of 64 bytes."""
    k = min(g, 64)
    c, a, b = [(t, 16, 64) for t in TILES_C], [(t, AMX_TILE, k) for t in TILES_A], [(t, k // 4, 64) for t in TILES_B]
    return _config(c + a + b)


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
    """The LLVM function of `amx_dots`: `(room, w, n_rows, s, s_stride, groups, xq, xq_stride, ascale, ascale_stride,
    rows, n, out, out_stride, laid)`, byte pointers and byte strides (`rows` int64). The `n` tokens' `xq` laid out as A
    tiles, a tile of 16 tokens after another, with their scales. Then each block of 16 rows goes a chunk of `CHUNK`
    inputs at a time: for each tile of tokens, for each group of the chunk, C from one tile product a 64 inputs,
    stored and scaled into 16 float32 vectors of accumulators, one a token, kept in registers through the chunk. A
    chunk's B tiles are written during the chunk before, into one of two buffers that alternate."""
    name = f"hetero_moe_amx_dots_{simd.isa}_{FORMATS[simd.fmt]}_g{simd.g}_s{simd.kind}"
    p8 = I8.as_pointer()
    fn = _kernel_function(module, name, [p8, p8, I64, p8, I64, I64, p8, I64, p8, I64, p8, I64, p8, I64, I64])
    if fn.blocks:
        return fn
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    const, at, load = _builder_helpers(b)
    room, w, n_rows, s_ptr, s_stride, groups, xq, xq_stride, ascale, a_stride, rows, n, out, out_stride, laid = fn.args
    rows = b.bitcast(rows, I64.as_pointer())
    g, part = simd.g, min(simd.g, 64)  # inputs of a group, and of one tile product
    parts = g // part
    per_chunk = CHUNK // g  # groups of a whole chunk
    widen = 2 if LANES[simd.fmt] == INT4 else 1  # bytes of B tiles a byte of weights
    vf, vi = _vec(F32, 16), _vec(I32, 16)
    fma = _declare(b, "llvm.fma.v16f32", vf, [vf] * 3)
    _load_config(b, tile_config(g))

    def tile(name: str, *args) -> None:
        _tile_op(b, name, *args)

    def below(x: ir.Value, y: ir.Value) -> ir.Value:
        return b.icmp_unsigned("<", x, y)

    def smaller(x: ir.Value, y: ir.Value) -> ir.Value:
        return b.select(below(x, y), x, y)

    def counter(value: ir.Value) -> ir.Value:
        return cgutils.alloca_once_value(b, value)

    # The room (`amx_room`): two chunks' B tiles, the C buffers, the accumulators of each tile of tokens between
    # chunks, A tiles, their scales
    tiles_m = b.udiv(b.add(n, const(AMX_TILE - 1)), const(AMX_TILE))  # tiles of 16 tokens
    step_bytes = LANE_ROWS * g // widen  # bytes of rows in a step (a group of a block), `16 g` of B tiles
    chunk_tiles = LANE_ROWS * CHUNK  # bytes of a chunk's B tiles
    buffers = _aligned64(b, room)
    cbufs = at(buffers, const(2 * chunk_tiles))
    saved_accs = at(cbufs, const((LAG + 1) * C_BYTES))
    abuf = at(saved_accs, b.mul(tiles_m, const(AMX_TILE * 64)))
    tile_a = b.mul(groups, const(g * AMX_TILE))  # bytes of a tile of tokens' A tiles
    scales_a = at(abuf, b.mul(tiles_m, tile_a))  # float32 [tile][group][token of 16]

    # A tile (tile m, group k, part h): 16 tokens' `part` bytes side by side; tokens past `n` are left as they are
    # (their rows of C are never read)
    with cgutils.for_range(b, b.select(b.icmp_unsigned("!=", laid, const(0)), const(0), n)) as tokens:
        j = tokens.index
        m, t = b.udiv(j, const(AMX_TILE)), b.urem(j, const(AMX_TILE))
        token = b.load(b.gep(rows, [j]))
        xrow, arow = at(xq, b.mul(token, xq_stride)), at(ascale, b.mul(token, a_stride))
        tile_base = at(abuf, b.add(b.mul(m, tile_a), b.mul(t, const(part))))
        scale_base = at(scales_a, b.mul(b.add(b.mul(m, b.mul(groups, const(AMX_TILE))), t), const(4)))
        with cgutils.for_range(b, groups) as loop:
            k = loop.index
            for h in range(parts):
                piece = load(xrow, b.add(b.mul(k, const(g)), const(part * h)), _vec(I8, part))
                dest = at(tile_base, b.add(b.mul(k, const(g * AMX_TILE)), const(part * AMX_TILE * h)))
                b.store(piece, b.bitcast(dest, _vec(I8, part).as_pointer()), align=part)
            scale_to = b.bitcast(at(scale_base, b.mul(k, const(64))), I32.as_pointer())
            b.store(load(arow, b.mul(k, const(4)), I32), scale_to)

    blocks = b.udiv(n_rows, const(LANE_ROWS))
    chunks = b.udiv(b.add(groups, const(per_chunk - 1)), const(per_chunk))

    def fill(step: ir.Value, buffer: ir.Value, j: ir.Value) -> None:
        """Step `step` (group of a block, in the order of memory) as the B tiles of group `j` of a chunk."""
        dest = at(buffers, b.add(b.mul(buffer, const(chunk_tiles)), b.mul(j, const(LANE_ROWS * g))))
        _fill(b, simd, at(w, b.mul(step, const(step_bytes))), dest, step_bytes // 64)

    with cgutils.for_range(b, smaller(groups, const(per_chunk))) as first:
        fill(first.index, const(0), first.index)
    zero = ir.Constant(vf, [0.0] * 16)
    accs = [cgutils.alloca_once_value(b, zero) for _ in range(AMX_TILE)]
    tile_bytes = part * 16  # of one B tile: `part / 4` rows of 64 bytes

    def cbuf(s: ir.Value) -> ir.Value:
        return at(cbufs, b.mul(b.urem(s, const(LAG + 1)), const(C_BYTES)))

    def products(parity: int, buffer: ir.Value, m: ir.Value, k0: ir.Value, k: ir.Value) -> None:
        tile("tilezero", TILES_C[parity])
        for h in range(parts):
            a_reg, b_reg = TILES_A[(parity * parts + h) % 2], TILES_B[h]
            b_tile = at(
                buffers,
                b.add(b.mul(buffer, const(chunk_tiles)), b.add(b.mul(k, const(LANE_ROWS * g)), const(tile_bytes * h))),
            )
            tile("tileloadd64", b_reg, b_tile, const(64))
            group = b.add(k0, k)
            a_tile = at(abuf, b.add(b.add(b.mul(m, tile_a), b.mul(group, const(g * AMX_TILE))), const(tile_bytes * h)))
            tile("tileloadd64", a_reg, a_tile, const(part))
            tile("tdpbssd", TILES_C[parity], a_reg, b_reg)

    def scale(sblock: ir.Value, m: ir.Value, group: ir.Value, sums: ir.Value) -> None:
        """Group `group`'s sums of tile `m`, stored at `sums`, scaled into the accumulators (its valid tokens)."""
        sw = _half_scales(b, load(sblock, b.mul(group, const(2 * LANE_ROWS)), _vec(I16, 16)), simd.kind, 16)
        words = b.mul(b.add(b.mul(m, groups), group), const(4 * AMX_TILE))

        def token(t: int) -> None:
            isum = load(sums, const(64 * t), vi)
            a = _broadcast(b, load(scales_a, b.add(words, const(4 * t)), F32), 16)
            b.store(b.call(fma, [b.sitofp(isum, vf), b.fmul(sw, a), b.load(accs[t])]), accs[t])

        valid = b.sub(n, b.mul(m, const(AMX_TILE)))
        with b.if_else(b.icmp_unsigned(">=", valid, const(AMX_TILE))) as (whole, ragged):
            with whole:
                for t in range(AMX_TILE):
                    token(t)
            with ragged:
                for t in range(AMX_TILE):
                    with b.if_then(below(const(t), valid)):
                        token(t)

    def saved(m: ir.Value, t: int) -> ir.Value:
        """Where token `t` of tile `m` keeps its accumulators between chunks."""
        return b.bitcast(at(saved_accs, b.mul(b.add(b.mul(m, const(AMX_TILE)), const(t)), const(64))), vf.as_pointer())

    def emit(m: ir.Value, column: ir.Value) -> None:
        """Tile `m`'s results: its valid tokens' accumulators into their rows of `out` at `column`."""
        valid = b.sub(n, b.mul(m, const(AMX_TILE)))
        for t in range(AMX_TILE):
            with b.if_then(below(const(t), valid)):
                row = b.add(b.mul(m, const(AMX_TILE)), const(t))
                b.store(b.load(accs[t]), b.bitcast(at(column, b.mul(row, out_stride)), vf.as_pointer()), align=4)

    with cgutils.for_range(b, blocks) as block_loop:
        block = block_loop.index
        sblock = at(s_ptr, b.mul(block, b.mul(s_stride, const(LANE_ROWS))))
        column = at(out, b.mul(block, const(4 * LANE_ROWS)))
        with cgutils.for_range(b, chunks) as chunk_loop:
            kc = chunk_loop.index
            k0 = b.mul(kc, const(per_chunk))
            kn = smaller(const(per_chunk), b.sub(groups, k0))
            buffer = b.and_(b.add(b.mul(block, chunks), kc), const(1))
            # the next chunk (of this block, or the first of the next), written during this one's products
            last_chunk = b.icmp_unsigned("==", b.add(kc, const(1)), chunks)
            next_k0 = b.select(last_chunk, const(0), b.add(k0, const(per_chunk)))
            next_block = b.select(last_chunk, b.add(block, const(1)), block)
            next_kn = b.select(below(next_block, blocks), smaller(const(per_chunk), b.sub(groups, next_k0)), const(0))
            next_step = b.add(b.mul(next_block, groups), next_k0)
            filled = counter(const(0))
            total = b.mul(tiles_m, kn)
            pm, pk, sm, sk = (counter(const(0)) for _ in range(4))
            # iteration s: store C of product s - 1, product s (tile `pm`, group `pk` of the chunk) into the other C
            # register, scale product s - LAG; tile by tile, each tile's accumulators in registers through the chunk
            with cgutils.for_range(b, b.add(total, const(LAG))) as loop:
                s = loop.index
                producing = below(s, total)
                stores = b.and_(b.icmp_unsigned(">=", s, const(1)), b.icmp_unsigned("<=", s, total))
                odd = b.trunc(s, ir.IntType(1))
                with b.if_else(odd) as (on_odd, on_even):
                    for parity, branch in ((1, on_odd), (0, on_even)):
                        with branch:
                            with b.if_then(producing):
                                products(parity, buffer, b.load(pm), k0, b.load(pk))
                            with b.if_then(stores):
                                tile("tilestored64", TILES_C[1 - parity], cbuf(b.sub(s, const(1))), const(64))
                with b.if_then(producing):
                    # the next chunk's groups, spread evenly across this chunk's products
                    done = b.load(filled)
                    due = b.icmp_unsigned("<=", b.mul(done, total), b.mul(s, next_kn))
                    with b.if_then(b.and_(below(done, next_kn), due)):
                        fill(b.add(next_step, done), b.xor(buffer, const(1)), done)
                        b.store(b.add(done, const(1)), filled)
                    k = b.add(b.load(pk), const(1))
                    wrap = b.icmp_unsigned("==", k, kn)
                    b.store(b.select(wrap, const(0), k), pk)
                    b.store(b.select(wrap, b.add(b.load(pm), const(1)), b.load(pm)), pm)
                with b.if_then(b.icmp_unsigned(">=", s, const(LAG))):
                    m, k = b.load(sm), b.load(sk)
                    starting = b.icmp_unsigned("==", k, const(0))
                    with b.if_then(starting), b.if_else(b.icmp_unsigned("==", kc, const(0))) as (fresh, again):
                        with fresh:
                            for acc in accs:
                                b.store(zero, acc)
                        with again:
                            for t, acc in enumerate(accs):
                                b.store(b.load(saved(m, t)), acc)
                    scale(sblock, m, b.add(k0, k), cbuf(b.sub(s, const(LAG))))
                    k = b.add(k, const(1))
                    wrap = b.icmp_unsigned("==", k, kn)
                    with b.if_then(wrap), b.if_else(last_chunk) as (final, between):
                        with final:
                            emit(m, column)
                        with between:
                            for t, acc in enumerate(accs):
                                b.store(b.load(acc), saved(m, t))
                    b.store(b.select(wrap, const(0), k), sk)
                    b.store(b.select(wrap, b.add(m, const(1)), m), sm)
            with cgutils.for_range(b, b.sub(next_kn, smaller(b.load(filled), next_kn))) as rest:
                j = b.add(b.load(filled), rest.index)
                fill(b.add(next_step, j), b.xor(buffer, const(1)), j)
    tile("tilerelease")
    b.ret_void()
    return fn


def amx_room(simd, w, tokens):
    """A uint8 array for what `amx_dots` keeps of calls of up to `tokens` tokens (at most `AMX_TOKENS`) with the rows
    `w [R, B]`: two chunks of B tiles (8 KB each), `LAG + 1` C buffers (1 KB each), and for each tile of 16 tokens
    its accumulators between chunks (1 KB) and its A tiles and scales (`16 (I + I / g * 4)` bytes for I inputs),
    with 64 to round its start up, where `simd.amx` and the calls take `tokens >= AMX_LEAST` tokens; else an empty
    one (decode allocates nothing). Jitted code only."""
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
        tiles = (min(tokens, AMX_TOKENS) + AMX_TILE - 1) // AMX_TILE
        per_tile = AMX_TILE * 64 + AMX_TILE * (inputs + inputs // g * 4)
        return np.empty(2 * LANE_ROWS * CHUNK + (LAG + 1) * C_BYTES + tiles * per_tile + 64, np.uint8)

    return room


def many_rows(simd):
    """The least rows a parallel task takes where experts have many tokens (0: the caller's least): `AMX_ROWS` on
    AMX. Jitted code only."""
    raise TypeError("many_rows runs inside jitted code")


@overload(many_rows, inline="always")
def _many_rows(simd):
    if not isinstance(simd, SimdType):
        return None
    rows = AMX_ROWS if uses_amx(simd) else 0
    return lambda simd: rows


def _typed(simd, arrays) -> bool:
    return isinstance(simd, SimdType) and uses_amx(simd) and all(_is(t, dtype, ndim) for t, dtype, ndim in arrays)


@intrinsic
def amx_dots(typingctx, simd, n, room, w, scales, xq, ascale, rows, out, laid):
    """`span_dots` (the same bits) of `n` tokens, 1 to `AMX_TOKENS` at run time, with rows across lanes `w [R, B]`
    (whole blocks, C-contiguous), on AMX tiles, in `room` (`amx_room`): `out[j, r] = w[r] . xq[rows[j]]` for `j <
    n`. The call reads `w` once, for all its tokens; it lays out the tokens in `room` as A tiles unless `laid` (the
    call before took the same tokens and room). No `bias`: the B tiles are signed. Runs only on the `avx512amx`
    isa (`simd.choose_isa`), where Linux granted the tiles."""
    arrays = [
        (room, types.uint8, 1),
        (w, types.uint8, 2),
        (scales, types.uint16, 2),
        (xq, types.int8, 2),
        (ascale, types.float32, 2),
        (rows, types.int64, 1),
        (out, types.float32, 2),
    ]
    if not _typed(simd, arrays) or not isinstance(n, types.Integer) or not isinstance(laid, types.Boolean):
        return None

    def codegen(context, builder, sig, args):
        b = builder
        room_, w_, scales_, xq_, ascale_, rows_, out_ = (
            context.make_array(t)(context, b, v) for t, v in zip(sig.args[2:9], args[2:9], strict=True)
        )
        p8 = I8.as_pointer()

        def data(a):
            return b.bitcast(a.data, p8)

        def stride(a):
            return b.extract_value(a.strides, 0)

        n_ = context.cast(b, args[1], sig.args[1], types.int64)
        call = [data(room_), data(w_), b.extract_value(w_.shape, 0), data(scales_), stride(scales_)]
        call += [b.extract_value(scales_.shape, 1), data(xq_), stride(xq_), data(ascale_), stride(ascale_)]
        call += [data(rows_), n_, data(out_), stride(out_), b.zext(args[9], I64)]
        b.call(_amx_function(b.module, simd), call)
        return context.get_dummy_value()

    return types.none(simd, n, room, w, scales, xq, ascale, rows, out, laid), codegen


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
