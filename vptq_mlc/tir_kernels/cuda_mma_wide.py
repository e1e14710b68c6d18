"""CUDA VQ decode kernel on tensor cores with whole-entry lookups (v = 8, 1..16 activation rows): the weight is the
A operand of `mma.sync.m16n8k16` and each 8-weight codebook entry is looked up ONCE, with one 16-byte load.

Why: `cuda_mma.py` builds its B fragment from one 2-byte shared-memory lookup per weight (8 lookups per lane per
MMA), so it is instruction-bound (8-12% of copy bandwidth on the H100, flat from 4 to 16 rows), while the gather
GEMV (`cuda_gemv.py`) does one 16-byte lookup per 8 weights. Here a lookup's 8 values go into fragment layout
through a per-warp shared-memory tile and `ldmatrix`, which moves them between lanes in one instruction.

Roles: y^T = W x^T. A = W (m16 = the 16 outputs of two v = 8 vector rows, k16 = 16 input columns), B = x^T
(k16 x n8: 8 activation rows; two n-tiles for 9..16 rows, so 8 rows need half the MMAs of activations-as-A).
A codebook entry `C[g, codes[i, k]]` holds W[i*8 .. i*8+7][k]: 8 consecutive m of ONE k column.
`ldmatrix.x4.trans` reads four 8x8 b16 matrices whose 8 rows (16 bytes each) are addressed by lanes 8j..8j+7 of
matrix j, and gives lane (g = lane/4, q = lane%4) elements [row 2q][col g] and [row 2q+1][col g] of each matrix
(PTX ISA, ldmatrix with .trans). With rows = entries (k) and columns = entry elements (m), lane (g, q) gets
W[m=g][k=2q], W[g][2q+1] of matrix j: for j = 0..3 = (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15),
(m 8-15, k 8-15) these are a0a1, a2a3, a4a5, a6a7 of the A fragment ("Matrix Fragments for mma.m16n8k16 with
floating point type": a0,a1 (g, 2q..) a2,a3 (g+8, 2q..) a4,a5 (g, 2q+8..) a6,a7 (g+8, 2q+8..)). So lane t looks
up the entry of tile row t (matrix t/8, k slot 8*(t/16) + t%8, vector row (t/8)%2 of the pair), stores it to row
t of its warp's 512-byte tile, and gives row t's address to ldmatrix: the 32 lanes' 32 lookups are one A fragment.

Instructions per lane per 8 weights (one entry; smem codebook, no residual): code extract + clamp + address (~3
integer ops), 1 LDS.128 (lookup), 1 STS.128 (tile), 1 LDSM.x4.trans, plus 1 MMA per 8 activation rows, and a
`__syncwarp` per chunk (a no-op in SASS when converged), plus 2 PRMT per B fragment (per step, shared by the warp's
pair tiles) to pick its activations. sm_90 SASS of the 4096 x 4096 v8-k4096-0 kernel at 16 rows: 15 instructions per
8 weights per lane in the main loop, HMMA included; `cuda_mma.py` issues 8 LDS.U16 + their address arithmetic + PRMT
packing for the same 8 weights: 91 per 8 weights. Register shuffles need >= 4 SHFL + 4 PRMT per 8 weights (each
lane's 8 values go to 8 different lanes). `movmatrix.trans` works if 4 lanes read 4 bytes each of one entry (an 8x8
matrix of entries in "row" layout, which it transposes into A order): 4 LDS.32 + 4 MOVM + 4 code extractions and
addresses per 8 weights per lane, more instructions than here but no tile round trip in shared memory (not built:
the tile's STS.128 + LDSM cost 8 of the ~18 shared-memory wavefronts per 256 weights when the lookups have the ~2.6x
bank conflicts of random 16-byte reads). The tile stores are conflict-free (32 consecutive 16-byte rows); the
lookups themselves are random 16-byte reads, as in the GEMV (`REPLICAS` copies of a small book, as there, make them
conflict-free).

Column mapping (a sum over k does not care which physical column feeds which k slot, as long as A and B agree):
a chunk is 16*DS columns, DS MMA steps. Lane q of the B side owns the CW = 4*DS consecutive columns
[CW*q, CW*q + CW) of the chunk (one 8*DS-byte activation load per activation row); its B element e (0..3 = k slots
2q, 2q+1, 2q+8, 2q+9) at step d is column CW*q + DS*e + d. The A side's k slot s = 8E + 2Q + H at step d is then
column CW*Q + DS*(2E + H) + d, so a lookup lane's DS codes over the chunk's steps are consecutive (one DS- or
2*DS-byte code load), and 16 lanes of one vector row read 16*DS consecutive codes.

Register fragments (`WidePlan.register_tiles`; on by default where `register_tiles_preferred`, REGISTER_TILES_ENV=0
turns them off): no tile round trip through
shared memory. Lane (g, q) looks up the 4 entries of ONE vector row (i0 + g) at its 4 k slots (2q, 2q+1, 2q+8, 2q+9)
of a step; a warp then owns 8 vector rows (64 outputs) as 4 m16 tiles, tile t's row m < 8 being element 2t of vector
row i0 + m and row m + 8 element 2t + 1 of it. Lane (g, q)'s A registers of tile t are exactly elements 2t and
2t + 1 of its own 4 entries (a0a1 = E0[2t], E1[2t]; a2a3 = E0[2t+1], E1[2t+1]; a4..a7 the same of E2, E3), so the
fragment is 2 byte permutes per register (4 per entry) and nothing moves between lanes. The k slots use the B side's
column mapping below, so the lane's codes over a chunk are the CW consecutive columns it also loads activations for.
Per lane and 8 weights: 1 LDS.128 + ~4 PRMT + the code's extraction and address, against the tile form's LDS.128 +
STS.128 + LDSM; each step's 4 * NT MMAs go to independent accumulators (the tile form's chain per pair tile). The
cost: 8x fewer warps along the output, so short layers need more splits of the input (`plan_register_tiles`), and
~120 registers at 16 rows. D of tile t: c0/c1 = element 2t of vector row i0 + g for activation rows 2q, 2q+1, c2/c3
element 2t + 1.

Everything else follows `cuda_mma.py`: a warp owns MT pairs of vector rows and one of P splits of the input
dimension (summed through shared memory), U chunks of loads in flight, codebooks in shared memory up to
cuda_gemv.SMEM_CODEBOOK_BYTES (else read through L1/L2), a residual codebook added in fp16 before the tile store
(as `cuda_mma.py` adds it), outlier columns through the same MMA with scalar-built A fragments (a small share of
the columns). Activation rows past the batch and vector rows past the layer are clamped to the last real one (an
activation row feeds only its own D column, a vector row its own D rows; neither is stored), so loads need no
predicates.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tvm import tirx
from tvm.script import tirx as T

from vptq_mlc.artifact.vq_layout import code_dtype
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.errors import compile_switch
from vptq_mlc.tir_kernels.cuda_common import KERNEL_ATTRS, keep_params, ordered_params, pow2_floor, vr
from vptq_mlc.tir_kernels.cuda_gemv import MAX_LAYERS, REPLICAS, SMEM_CODEBOOK_BYTES, keep_generic_operands
from vptq_mlc.tir_kernels.cuda_mma import MAX_DYN_SMEM, MMA_FROM_ROWS, MMA_ROWS
from vptq_mlc.tir_kernels.cuda_prologue import THREADS as PROLOGUE_THREADS
from vptq_mlc.tir_kernels.cuda_prologue import prepare_launch
from vptq_mlc.tir_kernels.fused_input import PLAIN_INPUT, FusedInput
from vptq_mlc.tir_kernels.generic import kernel_dims

# On by default (measured on the H100: docs/dense-mma.md): the registry's tensor-core decode choice
# (cuda_mma.mma_preferred) takes this kernel where `mma_wide_supported`; VPTQ_MLC_MMA_WIDE=0 keeps `cuda_mma.py`.
MMA_WIDE_ENV = "VPTQ_MLC_MMA_WIDE"
MMA_WIDE_DEFAULT = True
TILE_HALVES = 256  # one A fragment's 32 entries of 8 halves: 512 bytes per tile
# A launch may use static + dynamic shared memory beyond this only with the opt-in attribute, which TVM's CUDA runtime
# sets when the dynamic part alone is >= 48 KB: a plan whose static tiles + dynamic book/scratch exceed it with less
# than 48 KB dynamic fails to launch (CUDA_ERROR_INVALID_VALUE), so its dynamic part is padded up to this size.
OPT_IN_SMEM = 48 * 1024
# The wave model the plan uses to pick its steps per load (tuned on the H100 SXM: 132 SMs, 228 KB shared memory per
# SM of which 1 KB is reserved per resident CTA, 64 warps per SM).
WAVE_SMS = 132
SM_SMEM_BYTES = 228 * 1024
CTA_RESERVED_SMEM = 1024
SM_WARPS = 64
# Register fragments: 8 vector rows per warp, and 4 tiles, tile t holding elements 2t (rows 0-7) and 2t+1 (rows 8-15)
REG_VECTOR_ROWS = 8
REG_TILES = 4
REG_MIN_VECTOR_ROWS = 1024  # register fragments from 8192 outputs in a launch (register_tiles_preferred)


REGISTER_TILES_ENV = "VPTQ_MLC_REGISTER_TILES"
REGISTER_TILES_DEFAULT = True


def register_tiles_enabled() -> bool:
    """Whether this kernel's registry plans build A fragments in registers: REGISTER_TILES_ENV=1 / 0, else the
    default."""
    return compile_switch(REGISTER_TILES_ENV, REGISTER_TILES_DEFAULT, "register-built A fragments in the "
                          "whole-entry tensor-core decode kernel")


# Register fragments for the two-launch form of a layer too short for them alone (`cta_splits_preferred`): its CTAs
# split the input and the last one of a row block adds their partials. Off by default: checked on the CPU only, not
# yet run or timed on a GPU (docs/dense-mma.md says how); VPTQ_MLC_CTA_SPLITS=1 turns it on.
CTA_SPLITS_ENV = "VPTQ_MLC_CTA_SPLITS"
CTA_SPLITS_DEFAULT = False
CTA_SPLIT_WARPS = 8  # warp splits per CTA (P) in `plan_cta_splits`
CTA_SPLIT_WARP_TARGET = 2048  # warps of the launch `plan_cta_splits` aims at (as `plan_register_tiles`)


def cta_splits_enabled() -> bool:
    """Whether the registry gives short two-launch layers register fragments over CTA splits: CTA_SPLITS_ENV=1 / 0,
    else the default."""
    return compile_switch(CTA_SPLITS_ENV, CTA_SPLITS_DEFAULT, "register fragments over CTA splits for layers of "
                          "fewer than 8192 outputs in the two-launch tensor-core decode form")


def mma_wide_enabled() -> bool:
    """Whether CUDA decode layers the tensor-core kernel serves get this one: MMA_WIDE_ENV=1 / 0, else the default."""
    return compile_switch(MMA_WIDE_ENV, MMA_WIDE_DEFAULT, "the whole-entry tensor-core decode kernel")


@dataclass(frozen=True)
class WidePlan:
    pair_tiles: int  # MT: m16 tiles (pairs of vector rows) per warp
    row_groups: int  # RW: warps along the output in a CTA
    splits: int  # P: warps along the input dimension
    steps_per_load: int  # DS: MMA steps per chunk (each lookup lane loads DS consecutive codes)
    smem_codebook: bool
    replicated: bool  # REPLICAS copies of the book in shared memory (lane l reads copy l % 8: conflict-free)
    unroll: int = 4  # U: chunks whose loads are in flight before the first lookup
    # A fragments built in registers (module docstring, "Register fragments"): the warp owns REG_VECTOR_ROWS vector
    # rows and REG_TILES m16 tiles; `pair_tiles` is unused
    register_tiles: bool = False
    # CTAs along the input dimension (each owning `splits` warp splits of it): 1, or, in the two-launch form of one
    # layer, 2+ CTAs whose fp32 partial sums the last one to finish adds in a fixed order ("CTA splits" below)
    cta_splits: int = 1


def warp_vector_rows(p: WidePlan) -> int:
    """Vector rows one warp owns: MT pairs through the tile, or REG_VECTOR_ROWS with register fragments."""
    return REG_VECTOR_ROWS if p.register_tiles else 2 * p.pair_tiles


def warp_tiles(p: WidePlan) -> int:
    """m16 tiles (accumulator sets per n-tile) one warp owns."""
    return REG_TILES if p.register_tiles else p.pair_tiles


def mma_wide_supported(cfg: VPTQLayerConfig, dtype: str, rows: int) -> bool:
    """v = 8 (a lookup is one 16-byte entry), fp16, 1..16 static rows, and whole chunks of 16 * 2 columns in the
    codes region and in the outlier region's 16-column steps (scalar-built, any size)."""
    return (dtype == "float16" and cfg.vector_len == 8 and 1 <= rows <= MMA_ROWS
            and (cfg.group_num * cfg.group_size) % 32 == 0)


def _book_size(cfg: VPTQLayerConfig) -> int:
    """Bytes of one copy of the layer's books (main + residual, all groups, fp16 entries)."""
    return cfg.group_num * (cfg.num_centroids + cfg.num_res_centroids) * cfg.vector_len * 2


def plan_mma_wide(cfg: VPTQLayerConfig, rows: int = MMA_ROWS, register_tiles: bool = False, count: int = 1) -> WidePlan:
    """Launch shape from the layer shape (as `cuda_mma.plan_mma`: ~2-4k warps, splits while the input allows):
    one pair of vector rows per warp, 64-column chunks (4 MMA steps per 4-code load), four chunks in flight.
    With `register_tiles`: `plan_register_tiles` (for `count` layers in one launch)."""
    if register_tiles:
        return plan_register_tiles(cfg, rows, count)
    nv, length = cfg.num_vectors, cfg.group_num * cfg.group_size
    ds = 4 if length % 64 == 0 else 2
    mt = 1
    warp_rows = -(-nv // (2 * mt))
    splits = max(1, min(8, pow2_floor(4096 // max(1, warp_rows)), pow2_floor(max(1, length // (16 * ds * 4)))))
    row_groups = max(1, 8 // splits)
    cb = _book_size(cfg)
    chunks = -(-length // (16 * ds * splits))
    smem = cb <= SMEM_CODEBOOK_BYTES
    unroll = 4 if chunks >= 4 else 2 if chunks >= 2 else 1
    plan = WidePlan(mt, row_groups, splits, ds, smem, smem and cb * REPLICAS <= SMEM_CODEBOOK_BYTES, unroll)
    if smem_bytes(cfg, plan, rows) > MAX_DYN_SMEM and plan.replicated:
        plan = replace(plan, replicated=False)
    if ds == 4:  # half the tile per warp when that makes the grid one wave fewer (H100, 11008 x 4096 at 16 rows:
        # 3 CTAs per SM instead of 2, 344 CTAs in one wave: 30.3 us instead of 39.5; equal waves: 4 steps stay faster)
        short = replace(plan, steps_per_load=2)
        if waves(cfg, short, rows) < waves(cfg, plan, rows):
            plan = short
    return plan


def plan_register_tiles(cfg: VPTQLayerConfig, rows: int = MMA_ROWS, count: int = 1) -> WidePlan:
    """Register fragments: 8 vector rows per warp, so ~8x fewer warps along the output than the tile form; splits
    of the input (up to 16 warps of a CTA, summed in the book's shared memory) bring the launch (all `count`
    layers) to ~2k warps, and CTAs of at least 8 warps share one book copy."""
    length = cfg.group_num * cfg.group_size
    ds = 4 if length % 64 == 0 else 2
    warp_rows = count * -(-cfg.num_vectors // REG_VECTOR_ROWS)
    chunks = length // (16 * ds)
    splits = max(1, min(16, pow2_floor(2048 // max(1, warp_rows)), pow2_floor(max(1, chunks // 2))))
    row_groups = max(1, min(8 // splits, pow2_floor(warp_rows)))
    cb = _book_size(cfg)
    smem = cb <= SMEM_CODEBOOK_BYTES
    per_split = -(-chunks // splits)
    unroll = 2 if per_split >= 2 else 1
    plan = WidePlan(1, row_groups, splits, ds, smem, smem and cb * REPLICAS <= SMEM_CODEBOOK_BYTES, unroll,
                    register_tiles=True)
    if smem_bytes(cfg, plan, rows, count) > MAX_DYN_SMEM and plan.replicated:
        plan = replace(plan, replicated=False)
    while plan.splits > 1 and (smem_bytes(cfg, plan, rows, count) > MAX_DYN_SMEM
                               or launch_smem(cfg, plan, rows, count)[0] > OPT_IN_SMEM):  # the split-sum scratch
        plan = replace(plan, splits=plan.splits // 2)
    return plan


def plan_cta_splits(cfg: VPTQLayerConfig, rows: int = MMA_ROWS) -> WidePlan:
    """Register fragments for ONE layer of fewer than REG_MIN_VECTOR_ROWS vector rows in the two-launch form: its
    64-output warp rows cannot fill the GPU with splits inside a CTA (a 4096-output layer gets 64 CTAs for 132
    SMs), so CTA_SPLIT_WARPS warp splits per CTA and as many CTAs per row block as bring the launch to ~2k warps
    while every split keeps 2+ chunks. The plan `plan_register_tiles` would make when the split count gives
    one CTA per row block."""
    length = cfg.group_num * cfg.group_size
    ds = 4 if length % 64 == 0 else 2
    warp_rows = -(-cfg.num_vectors // REG_VECTOR_ROWS)
    chunks = length // (16 * ds)
    total = max(1, min(pow2_floor(max(1, CTA_SPLIT_WARP_TARGET // warp_rows)), pow2_floor(max(1, chunks // 2))))
    splits = min(CTA_SPLIT_WARPS, total)
    base = plan_register_tiles(cfg, rows)
    if total <= splits:
        return base
    plan = replace(base, row_groups=1, splits=splits, cta_splits=total // splits,
                   unroll=2 if -(-chunks // total) >= 2 else 1)
    if smem_bytes(cfg, plan, rows) > MAX_DYN_SMEM and plan.replicated:
        plan = replace(plan, replicated=False)
    return plan


def two_launch_scratch_mma(cfg: VPTQLayerConfig, dtype: str, rows: int, plan: WidePlan,
                           count: int) -> tuple[tuple[tuple[int, ...], str], ...]:
    """The scratch outputs of `vq_mma_wide_cuda(..., prologue=...)` in parameter order: the GEMV's two-launch xs /
    dot per layer (`cuda_gemv.two_launch_scratch`), then with CTA splits each CTA's fp32 partial sums
    [cta_splits, rows, O] and one int32 arrival counter per row block."""
    from vptq_mlc.tir_kernels.cuda_gemv import two_launch_scratch

    base = two_launch_scratch(cfg.in_features, dtype, rows, count)
    if plan.cta_splits == 1:
        return base
    nrb = -(-cfg.num_vectors // (plan.row_groups * warp_vector_rows(plan)))
    return base + (((plan.cta_splits, rows, cfg.out_features), "float32"), ((nrb,), "int32"))


def cta_splits_preferred(cfg: VPTQLayerConfig, dtype: str, rows: int) -> bool:
    """Whether ONE layer's two-launch form at `rows` gets register fragments over CTA splits (`plan_cta_splits`):
    the switches on, the book in shared memory, too few vector rows for `register_tiles_preferred`, and an input
    long enough for 2+ CTAs per row block (smaller layers keep the tile form)."""
    return (cta_splits_enabled() and register_tiles_enabled() and mma_wide_supported(cfg, dtype, rows)
            and _book_size(cfg) <= SMEM_CODEBOOK_BYTES and not register_tiles_preferred(cfg, dtype, rows)
            and plan_cta_splits(cfg, rows).cta_splits > 1)


def register_tiles_preferred(cfg: VPTQLayerConfig, dtype: str, rows: int, count: int = 1) -> bool:
    """Whether the registry gives `count` layers of `cfg` at `rows` (the tensor-core decode rows; several layers
    in one launch) register fragments: the switch on, the book in shared memory, and at least REG_MIN_VECTOR_ROWS
    vector rows in the launch. Measured on the H100 at 8 and 16 rows
    (bench/RESULTS.md, session 16): 1.10-1.34x the tile form from 11008 outputs (K 256 and 4096), 0.80-0.94x at
    4096 outputs (64 warp rows cannot fill 132 SMs), and slower with a K = 65536 book read through L1/L2."""
    return (register_tiles_enabled() and mma_wide_supported(cfg, dtype, rows) and _book_size(cfg) <= SMEM_CODEBOOK_BYTES
            and count * cfg.num_vectors >= REG_MIN_VECTOR_ROWS)


def residual_rows_preferred(cfg: VPTQLayerConfig, dtype: str, rows: int) -> bool:
    """Whether the registry's tensor-core rows start at cuda_mma.MMA_FROM_ROWS for a layer with a residual book
    (which `cuda_mma.mma_preferred` keeps on the GEMV up to its last row count: `cuda_mma.py` looks up every weight
    twice there): this kernel serves it, with both books in shared memory, where a residual entry is one more
    16-byte lookup per 8 weights. H100 kernel table (bench/RESULTS.md, session 16), v8-k256-256: the GEMV at 8 rows
    took 22.5 / 37.8 / 41.6 us for 4096x4096 / 11008x4096 / 4096x11008, this kernel at 16 rows 12.8 / 30.0 / 25.4
    (its time barely grows with rows). A K = 65536 book read through L1/L2 is mixed there and keeps the GEMV."""
    return (cfg.has_residual and rows >= MMA_FROM_ROWS and mma_wide_enabled() and mma_wide_supported(cfg, dtype, rows)
            and _book_size(cfg) <= SMEM_CODEBOOK_BYTES)


def _book_bytes(cfg: VPTQLayerConfig, p: WidePlan) -> int:
    """The shared book (all copies, main + residual; 16-byte entries), 0 when the book is read from L1/L2."""
    copies = REPLICAS if p.replicated else 1
    return cfg.group_num * (cfg.num_centroids + cfg.num_res_centroids) * copies * 16 if p.smem_codebook else 0


def _red_bytes(p: WidePlan, rows: int) -> int:
    """The fp32 split-sum scratch (splits 1..P-1 park their accumulators for split 0); none with one split."""
    return (p.splits - 1) * p.row_groups * warp_tiles(p) * (-(-rows // 8)) * 4 * 32 * 4


def _tile_bytes(p: WidePlan) -> int:
    """The warps' static tiles: one 512-byte A tile per (pair tile, MMA step) of a chunk and warp."""
    if p.register_tiles:
        return 0
    return p.row_groups * p.splits * p.pair_tiles * p.steps_per_load * TILE_HALVES * 2


def dynamic_pad(cfg: VPTQLayerConfig, plan: WidePlan, rows: int) -> int:
    """Bytes the dynamic buffer is padded to so that the launch gets the opt-in: 0 when the launch needs no pad,
    else OPT_IN_SMEM."""
    dyn = max(_book_bytes(cfg, plan), _red_bytes(plan, rows))
    return OPT_IN_SMEM if _tile_bytes(plan) + dyn > OPT_IN_SMEM > dyn else 0


def separate_scratch(cfg: VPTQLayerConfig, plan: WidePlan, count: int) -> bool:
    """Whether the split-sum scratch is its own static buffer instead of the book's bytes: in a launch of several
    layers with a shared-memory book and splits (TVM's StorageRewrite fails on the float32 view of the float16x8
    book when several layers' branches use both)."""
    return count > 1 and plan.smem_codebook and plan.splits > 1


def launch_smem(cfg: VPTQLayerConfig, plan: WidePlan, rows: int, count: int = 1) -> tuple[int, int]:
    """(static, dynamic) shared-memory bytes of a launch: the warps' tiles are static; the dynamic buffer holds the
    book, and the split-sum scratch over it once the book is dead (one buffer: TVM's merge of two dynamic buffers,
    one of them float16x8, sized the launch 16x too large), padded as `dynamic_pad` says; a launch of `count`
    layers may keep the scratch static instead (`separate_scratch`)."""
    if separate_scratch(cfg, plan, count):
        return _tile_bytes(plan) + _red_bytes(plan, rows), max(_book_bytes(cfg, plan), OPT_IN_SMEM)
    dyn = max(_book_bytes(cfg, plan), _red_bytes(plan, rows), dynamic_pad(cfg, plan, rows), 16)
    return _tile_bytes(plan), dyn


def smem_bytes(cfg: VPTQLayerConfig, plan: WidePlan, rows: int, count: int = 1) -> int:
    """Shared memory of a launch, static + dynamic (`launch_smem`)."""
    return sum(launch_smem(cfg, plan, rows, count))


def waves(cfg: VPTQLayerConfig, plan: WidePlan, rows: int) -> int:
    """Waves of the launch on the modelled GPU (WAVE_SMS): CTAs per SM bounded by shared memory and by warps."""
    p = plan
    per_sm = min(SM_SMEM_BYTES // (smem_bytes(cfg, p, rows) + CTA_RESERVED_SMEM), SM_WARPS // (p.row_groups * p.splits))
    ctas = -(-cfg.num_vectors // (p.row_groups * warp_vector_rows(p))) * p.cta_splits
    return -(-ctas // (WAVE_SMS * max(1, per_sm)))


def vq_mma_wide_cuda(cfg: VPTQLayerConfig, dtype: str, rows: int, plan: WidePlan | None = None,
                     count: int = 1, prologue: tuple[bool, ...] | None = None,
                     fused: FusedInput = PLAIN_INPUT) -> tirx.PrimFunc:
    """PrimFunc(xs[rows, I], *operands, y[rows, O]), fp16, v = 8, 1..16 static rows (module docstring); with
    `count` (2..3) layers of this config in one launch: PrimFunc(xs_0, *operands_0, xs_1, *operands_1, .., y_0,
    y_1, ..) (`KernelSelector.shared`).

    `prologue` (normed layers, one flag per layer: has a permutation): the decode linear as two launches of one
    PrimFunc, the contract of `cuda_gemv.vq_gemv_cuda(..., two_launch=True)`: the prologue kernel
    (`cuda_prologue.prepare_launch`, with `fused`'s RMSNorm or silu * up) writes each layer's xs and norm-bias dot
    into scratch outputs, then this kernel reads them and adds the dot (and `fused`'s residual) before its one
    rounding, the layers' outputs side by side with `fused.concat`. So a decoder layer at the tensor-core rows
    needs no RMSNorm, silu * up, dot, residual or concatenation kernels of its own. Params (x, [x2], [gamma], per
    layer m [perm_m], col_scale_m, weight_bias_m, *operands_m, [residual], per layer xs_m, dot_m, y_0, ..)."""
    if prologue is not None:
        count = len(prologue)
        if fused.source not in ("x", "rmsnorm", "swiglu") or (fused.residual and (count != 1 or fused.concat)):
            raise ValueError(f"bad fused input {fused} for {count} layers")
        if not cfg.enable_norm:
            raise ValueError("the two-launch form needs a normed layer (its prologue computes the norm-bias dot)")
    if not 1 <= count <= MAX_LAYERS:
        raise ValueError(f"vq_mma_wide_cuda serves 1..{MAX_LAYERS} layers in one launch, got {count}")
    if not mma_wide_supported(cfg, dtype, rows):
        raise ValueError(f"vq_mma_wide_cuda takes fp16, v = 8, 1..{MMA_ROWS} rows and a codes region of whole "
                         f"32-column chunks; got {dtype}, v = {cfg.vector_len}, {rows} rows")
    p = plan or plan_mma_wide(cfg, rows)
    if p.cta_splits > 1 and (prologue is None or count != 1):
        raise ValueError("CTA splits need the two-launch form of one layer (its prologue zeroes their counters)")
    I, O, v, G, S, K, KR, KR1, NV, L, OSZ, OSZ1, HAS_RES, HAS_OUT, VO, KO, NO = kernel_dims(cfg)  # noqa: E741
    CD, RCD = code_dtype(K), code_dtype(KR1)
    NB = rows
    MT, RW, P, DS, U = p.pair_tiles, p.row_groups, p.splits, p.steps_per_load, p.unroll
    if L % (16 * DS):
        raise ValueError(f"plan {p}: the codes region ({L} columns) is no whole number of {16 * DS}-column chunks")
    static_smem, dyn_smem = launch_smem(cfg, p, rows, count)
    SEP = separate_scratch(cfg, p, count)
    if static_smem + dyn_smem > MAX_DYN_SMEM or static_smem > OPT_IN_SMEM:
        raise ValueError(f"plan {p} needs {static_smem} + {dyn_smem} bytes of static + dynamic shared memory (at "
                         f"most {OPT_IN_SMEM} static, {MAX_DYN_SMEM} in all)")
    NT = -(-NB // 8)  # n-tiles: 8 activation rows each
    REG = p.register_tiles
    WV, TILES = warp_vector_rows(p), warp_tiles(p)
    NACC = TILES * NT * 4
    W = RW * P
    NTH = W * 32
    CW = 4 * DS  # activation columns per B lane per chunk
    CHUNK = 16 * DS
    NCH = L // CHUNK
    CS = p.cta_splits  # CTAs along the input, each with P warp splits
    PT = P * CS  # splits of the input in all
    CPS = -(-NCH // PT)  # chunks per split
    NOCH = -(-OSZ // 16) if HAS_OUT else 0
    NRB = -(-NV // (RW * WV))
    REP = REPLICAS if p.replicated else 1
    # the one dynamic buffer, in whole entries (one float16x8 element each): the book, then the split-sum scratch
    # (fp32, an alias of the same bytes); its CUDA declaration is `uint4 wide_book_ptr[]` in every kernel of this
    # family, never `half cb_s_ptr[]` of other kernels: all `extern __shared__` arrays of one CUDA file share a name
    # space, and TVM retypes a dynamic buffer whose every access is 8 wide, which made two kernels of one model
    # library declare `cb_s_ptr` differently
    CB_MAIN = G * K * REP
    ENTRY = f"{dtype}x{v}"
    NBUF = 0 if REG else MT * DS  # tiles per warp (one per (pair tile, step) of a chunk)
    CLW = CW if REG else MT * DS  # codes a lookup lane loads per chunk
    CV = min(CW, 8 // (1 if CD == "uint8" else 2))  # codes per load with register fragments (8 bytes)
    DYN_ENTRIES = dyn_smem // 16  # book, scratch and opt-in pad (launch_smem) in 16-byte entries
    WHOLE = NCH % PT == 0 and CPS % U == 0  # every (iteration, chunk) of every split is real: no per-chunk test
    XV = next(n for n in (8, 4, 2, 1) if OSZ % n == 0)  # activation load width: 16 bytes unless OSZ misaligns it
    EPI = prologue is not None  # the two-launch form: + dot (+ residual) in the epilogue, after the prologue launch
    RESID, CONCAT = EPI and fused.residual, EPI and fused.concat
    OY = count * O if CONCAT else O  # columns of y (layer m's at m * O with `concat`)
    PRO0, PRO1, PRO2 = (*(prologue or ()), False, False, False)[:3]

    def col0(sp, ch):  # first codes-region column of chunk `ch` of split `sp` (inline: keeps the alignment visible)
        return (sp * CPS + ch) * CHUNK

    def code_col(sp, ch, lane):  # first of the DS consecutive columns whose codes lookup lane `lane` loads
        return col0(sp, ch) + CW * (lane % 8 // 2) + DS * (2 * (lane // 16) + lane % 2)

    def vrow(i0, mt, lane):  # the vector row lookup lane `lane` serves in pair tile `mt`
        return i0 + 2 * mt + lane // 8 % 2

    def frag_vrow(i0, t, half, g):  # the vector row of A / D row g + 8 * half in tile t
        return i0 + g if REG else i0 + 2 * t + half

    def frag_elem(t, half, g):  # the element of that vector row (the output within it)
        return 2 * t + half if REG else g

    def frag_out(i0, t, half, g):  # the output of A / D row g + 8 * half in tile t
        return frag_vrow(i0, t, half, g) * v + frag_elem(t, half, g)

    def tile_at(ty, mt, d):  # first half of the warp's tile (pair tile mt, step d)
        return (ty * NBUF + mt * DS + d) * TILE_HALVES

    def code_index(code, entries):  # a stored code as an entry index that stays inside the book, whatever it holds
        if entries & (entries - 1) == 0:  # power of two: one AND (also extracts the code from its register)
            return T.bitwise_and(T.Cast("int32", code), entries - 1)
        return T.min(T.Cast("int32", code), entries - 1)

    def group_of(col):  # the codebook group of a codes-region column (one group: no arithmetic per lookup)
        return 0 if G == 1 else T.min(col, L - 1) // S

    def book_at(base, grp, code, per_group, lane):  # an entry of the shared book (lane's own copy when replicated)
        if REP > 1:
            return base + (grp * per_group + code) * REP + lane % REP
        return base + grp * per_group + code

    @T.macro
    def fill_book(book, base, src, entries, per_group, stage, tid):
        """src[G, per_group, 8] into the shared book at entry `base` (REP copies: thread t stores copy (q + t) % REP
        at step q, so a quarter-warp's stores hit 8 bank groups, as `cuda_common.fill_book_replicated`); rounds
        unrolled up to 16 (a 64 KB book over 256 threads), so their loads overlap."""
        for it in T.unroll(-(-entries // NTH)) if -(-entries // NTH) <= 16 else T.serial(-(-entries // NTH)):
            if it * NTH + tid < entries:
                stage[vr(0, v)] = src[(it * NTH + tid) // per_group, (it * NTH + tid) % per_group, vr(0, v)]
                for c in T.unroll(REP):
                    book[base + (it * NTH + tid) * REP + (c + it * NTH + tid) % REP] = stage[vr(0, v)]

    @T.macro
    def lookup(ent, eo, rent, book, centroids, res_centroids, cl, rl, at, col, lane):
        """ent[eo:eo+8] = W[vector row][col] for the 8 outputs (main + residual entry, fp16 add), from code cl[at]."""
        code = code_index(cl[at], K)
        if p.smem_codebook:
            ent[vr(eo, v)] = book[book_at(0, group_of(col), code, K, lane)]
        else:
            ent[vr(eo, v)] = centroids[group_of(col), code, vr(0, v)]
        if HAS_RES:
            if p.smem_codebook:
                rent[vr(0, v)] = book[book_at(CB_MAIN, group_of(col), code_index(rl[at], KR), KR, lane)]
            else:
                rent[vr(0, v)] = res_centroids[group_of(col), code_index(rl[at], KR),
                                               vr(0, v)]
            for j in T.unroll(v):
                ent[eo + j] = ent[eo + j] + rent[j]

    @T.macro
    def b_fragment(fb, xa, u, d):
        """B of step d of chunk u: activation element e of the lane's k slots is column CW * q + DS * e + d."""
        for nt in T.unroll(NT):
            for e in T.unroll(4):
                fb[nt * 4 + e] = xa[(u * NT + nt) * CW + DS * e + d]

    @T.macro
    def mma_steps(fa, fb, acc, mt):
        for nt in T.unroll(NT):
            T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", "fp16", "fp16", "fp32",
                                        fa.data, 0, fb.data, nt * 4, acc.data, (mt * NT + nt) * 4, False,
                                        dtype="float32"))

    @T.macro
    def finish(y, dot, residual, tot, row, out, yoff):
        """Store output `out` of activation row `row` from its fp32 sum `tot[0]`: the two-launch form (EPI) first adds
        the norm-bias dot the prologue launch wrote, then the residual or the concatenation column offset `yoff`."""
        if EPI:  # + the norm-bias dot, before the one rounding
            tot[0] = tot[0] + dot[row, 0]
        if RESID:  # the residual stream's add, as `y + residual` in the dtype
            y[row, out] = T.Cast(dtype, tot[0]) + residual[row, out]
        elif CONCAT:  # layer m's columns of one [rows, count * O] output
            y[row, yoff + out] = T.Cast(dtype, tot[0])
        else:
            y[row, out] = T.Cast(dtype, tot[0])

    @T.macro
    def body(xs, centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, y, i0, tx, ty, tid, g,
             q, rg, sp, spg, cs, rb, wide_book, red, tile, acc, fa, fb, xa, cl, rl, ent, rent, tot, stage, dot,
             residual, yoff, part, counters, arrived, last):
        """One layer's work for the warp whose first vector row is `i0`; `sp` is its split within the CTA, `spg` = cs *
        P + sp its split of the input (CTA `cs` of the CS splitting row block `rb`). Every value comes as an argument:
        a name bound at several expansions of one function (the layers of a multi-layer launch) would become a
        buffer. The two-launch form (EPI) adds the layer's `dot` (and `residual`) and writes at column `yoff` of y."""
        if p.smem_codebook:
            fill_book(wide_book, 0, centroids, G * K, K, stage, tid)
            if HAS_RES:
                fill_book(wide_book, CB_MAIN, res_centroids, G * KR, KR, stage, tid)
            T.tvm_storage_sync("shared")
        for a in T.unroll(NACC):
            acc[a] = T.float32(0)
        # outlier columns: A[m][k] = outlier_centroids[outlier_codes[r // VO, k], r % VO], r the output of m;
        # lane (g, q) holds a(2h + e2 + 4 e) = A[g + 8h][2q + e2 + 8e] (natural k order, scalar loads)
        if HAS_OUT:
            for ost in range(-(-NOCH // PT)):
                if ost * PT + spg < NOCH:
                    for nt in T.unroll(NT):
                        for e in T.unroll(4):
                            fb[nt * 4 + e] = T.if_then_else(
                                nt * 8 + g < NB and (ost * PT + spg) * 16 + 2 * q + e % 2 + 8 * (e // 2) < OSZ,
                                xs[T.min(nt * 8 + g, NB - 1),
                                   T.min((ost * PT + spg) * 16 + 2 * q + e % 2 + 8 * (e // 2), OSZ - 1)],
                                T.Cast(dtype, 0))
                    for mt in T.unroll(TILES):
                        for a in T.unroll(8):
                            fa[a] = T.if_then_else(
                                frag_vrow(i0, mt, a // 2 % 2, g) < NV
                                and frag_out(i0, mt, a // 2 % 2, g) < O
                                and (ost * PT + spg) * 16 + 2 * q + a % 2 + 8 * (a // 4) < OSZ,
                                outlier_centroids[
                                    T.Cast("int32", outlier_codes[
                                        T.min(frag_out(i0, mt, a // 2 % 2, g), O - 1) // VO,
                                        T.min((ost * PT + spg) * 16 + 2 * q + a % 2 + 8 * (a // 4), OSZ - 1)]),
                                    T.min(frag_out(i0, mt, a // 2 % 2, g), O - 1) % VO],
                                T.Cast(dtype, 0))
                        mma_steps(fa, fb, acc, mt)
        # codes region (physical column OSZ + c of xs): U chunks' loads in flight before the first lookup. Rows of xs
        # past the batch and vector rows past the layer are clamped to the last real one (read, never stored: an
        # activation row only feeds its own D column, a vector row its own D rows), so no load needs a predicate
        for it in range(-(-CPS // U)):
            for u in T.unroll(U):
                if WHOLE or (it * U + u < CPS and spg * CPS + it * U + u < NCH):
                    for nt in T.unroll(NT):
                        for j0 in T.unroll(CW // XV):
                            xa[vr((u * NT + nt) * CW + j0 * XV, XV)] = xs[
                                T.min(nt * 8 + g, NB - 1), vr(OSZ + col0(spg, it * U + u) + CW * q + j0 * XV, XV)]
                    if REG:  # lane (g, q): vector row i0 + g, the CW columns its B side owns
                        for j0 in T.unroll(CW // CV):
                            cl[vr(u * CW + j0 * CV, CV)] = codes[
                                T.min(i0 + g, NV - 1), vr(col0(spg, it * U + u) + CW * q + j0 * CV, CV)]
                            if HAS_RES:
                                rl[vr(u * CW + j0 * CV, CV)] = res_codes[
                                    T.min(i0 + g, NV - 1), vr(col0(spg, it * U + u) + CW * q + j0 * CV, CV)]
                    else:
                        for mt in T.unroll(MT):
                            cl[vr((u * MT + mt) * DS, DS)] = codes[T.min(vrow(i0, mt, tx), NV - 1),
                                                                   vr(code_col(spg, it * U + u, tx), DS)]
                            if HAS_RES:
                                rl[vr((u * MT + mt) * DS, DS)] = res_codes[T.min(vrow(i0, mt, tx), NV - 1),
                                                                           vr(code_col(spg, it * U + u, tx), DS)]
            for u in T.unroll(U):
                if WHOLE or (it * U + u < CPS and spg * CPS + it * U + u < NCH):
                    if REG:
                        # the 4 entries of this lane's k slots (2q, 2q + 1, 2q + 8, 2q + 9) at step d give tile t's A
                        # fragment: element 2t of each for A row g, element 2t + 1 for row g + 8
                        for d in T.unroll(DS):
                            for e in T.unroll(4):
                                lookup(ent, e * v, rent, wide_book, centroids, res_centroids, cl, rl,
                                       u * CW + DS * e + d, col0(spg, it * U + u) + CW * q + DS * e + d, tx)
                            b_fragment(fb, xa, u, d)
                            for t in T.unroll(REG_TILES):
                                for a in T.unroll(8):
                                    fa[a] = ent[(a % 2 + 2 * (a // 4)) * v + 2 * t + a // 2 % 2]
                                mma_steps(fa, fb, acc, t)
                    else:
                        # every lane's entries into the warp's tiles, then ldmatrix reads them in fragment order
                        for mt in T.unroll(MT):
                            for d in T.unroll(DS):
                                lookup(ent, 0, rent, wide_book, centroids, res_centroids, cl, rl,
                                       (u * MT + mt) * DS + d, code_col(spg, it * U + u, tx) + d, tx)
                                tile[vr(tile_at(ty, mt, d) + tx * v, v)] = ent[vr(0, v)]
                        T.evaluate(T.call_extern("void", "__syncwarp"))
                        for d in T.unroll(DS):
                            b_fragment(fb, xa, u, d)
                            for mt in T.unroll(MT):
                                # the address as `address_of`, not `access_ptr`: ThreadSync then sees no shared read
                                # to order against the tile stores (it would put a CTA barrier here; __syncwarp is
                                # the ordering this warp-private tile needs)
                                T.evaluate(T.ptx_legacy.ldmatrix(True, 4, ".b16", fa.data, 0,
                                                                 T.address_of(tile[tile_at(ty, mt, d)]), tx * v,
                                                                 dtype=dtype))
                                mma_steps(fa, fb, acc, mt)
                        T.evaluate(T.call_extern("void", "__syncwarp"))  # the tiles are rewritten by the next chunk
        # splits 1..P-1 park their accumulators in shared memory; split 0 adds them and stores
        if P > 1:
            T.tvm_storage_sync("shared")  # `red` is the book's bytes (one dynamic buffer): every lookup is done
            if sp > 0:
                for a in T.unroll(NACC):
                    red[((rg * (P - 1) + sp - 1) * NACC + a) * 32 + tx] = acc[a]
            T.tvm_storage_sync("shared")
        if sp == 0:
            # D[m][n]: c0, c1 = (g, 2q..), c2, c3 = (g + 8, 2q..); m -> output, n -> activation row
            for mt in T.unroll(TILES):
                for nt in T.unroll(NT):
                    for c in T.unroll(4):
                        tot[0] = acc[(mt * NT + nt) * 4 + c]
                        if P > 1:
                            for s in T.unroll(P - 1):
                                tot[0] = tot[0] + red[((rg * (P - 1) + s) * NACC + (mt * NT + nt) * 4 + c) * 32 + tx]
                        if nt * 8 + 2 * q + c % 2 < NB and frag_vrow(i0, mt, c // 2, g) < NV and \
                                frag_out(i0, mt, c // 2, g) < O:
                            if CS > 1:  # this CTA's partial sum, for the last CTA of the row block to add
                                part[cs, nt * 8 + 2 * q + c % 2, frag_out(i0, mt, c // 2, g)] = tot[0]
                            else:
                                finish(y, dot, residual, tot, nt * 8 + 2 * q + c % 2, frag_out(i0, mt, c // 2, g),
                                       yoff)
        if CS > 1:
            # the CTA's partials are visible device-wide before it counts itself in; the CTA that arrives last (its
            # count is CS - 1) adds all CS partials in split order (the same bits whichever CTA that is), reading
            # them from L2 (`__ldcg`: the L1 of this SM may hold none of them, and must not serve stale lines)
            T.evaluate(T.call_extern("void", "__threadfence"))
            T.tvm_storage_sync("shared")
            if tid == 0:
                arrived[0] = T.call_extern("int32", "atomicAdd", T.address_of(counters[rb]), 1)
            T.tvm_storage_sync("shared")
            last[0] = arrived[0]
            if last[0] == CS - 1 and sp == 0:
                for mt in T.unroll(TILES):
                    for nt in T.unroll(NT):
                        for c in T.unroll(4):
                            if nt * 8 + 2 * q + c % 2 < NB and frag_vrow(i0, mt, c // 2, g) < NV and \
                                    frag_out(i0, mt, c // 2, g) < O:
                                tot[0] = T.float32(0)
                                for s in T.unroll(CS):
                                    tot[0] = tot[0] + T.call_extern("float32", "__ldcg", T.address_of(
                                        part[s, nt * 8 + 2 * q + c % 2, frag_out(i0, mt, c // 2, g)]))
                                finish(y, dot, residual, tot, nt * 8 + 2 * q + c % 2, frag_out(i0, mt, c // 2, g),
                                       yoff)


    # one launch for `count` layers of this config (q/k/v, gate/up): CTA bx serves layer bx // NRB as CTA bx % NRB
    # of its own launch would; layer 0's operands keep the single-layer names (count 1: the single-layer kernel)
    @T.prim_func(private=True)
    def kernel(
        xs: T.Buffer((NB, I), dtype),
        centroids: T.Buffer((G, K, v), dtype),
        codes: T.Buffer((NV, L), CD),
        res_centroids: T.Buffer((G, KR1, v), dtype),
        res_codes: T.Buffer((NV, L), RCD),
        outlier_centroids: T.Buffer((KO, VO), dtype),
        outlier_codes: T.Buffer((NO, OSZ1), "uint16"),
        xs_1: T.Buffer((NB, I), dtype),
        centroids_1: T.Buffer((G, K, v), dtype),
        codes_1: T.Buffer((NV, L), CD),
        res_centroids_1: T.Buffer((G, KR1, v), dtype),
        res_codes_1: T.Buffer((NV, L), RCD),
        outlier_centroids_1: T.Buffer((KO, VO), dtype),
        outlier_codes_1: T.Buffer((NO, OSZ1), "uint16"),
        xs_2: T.Buffer((NB, I), dtype),
        centroids_2: T.Buffer((G, K, v), dtype),
        codes_2: T.Buffer((NV, L), CD),
        res_centroids_2: T.Buffer((G, KR1, v), dtype),
        res_codes_2: T.Buffer((NV, L), RCD),
        outlier_centroids_2: T.Buffer((KO, VO), dtype),
        outlier_codes_2: T.Buffer((NO, OSZ1), "uint16"),
        y: T.Buffer((NB, OY), dtype),
        y_1: T.Buffer((NB, O), dtype),
        y_2: T.Buffer((NB, O), dtype),
        # the two-launch form's (`prologue`): the raw input(s), each layer's prologue operands, the residual, and
        # each layer's norm-bias dot (its xs is the prologue's other output)
        x: T.Buffer((NB, I), dtype),
        x2: T.Buffer((NB, I), dtype),
        gamma: T.Buffer((I,), dtype),
        perm_0: T.Buffer((I,), "int32"),
        col_scale_0: T.Buffer((I,), dtype),
        weight_bias_0: T.Buffer((I,), dtype),
        perm_1: T.Buffer((I,), "int32"),
        col_scale_1: T.Buffer((I,), dtype),
        weight_bias_1: T.Buffer((I,), dtype),
        perm_2: T.Buffer((I,), "int32"),
        col_scale_2: T.Buffer((I,), dtype),
        weight_bias_2: T.Buffer((I,), dtype),
        residual: T.Buffer((NB, O), dtype),
        dot_0: T.Buffer((NB, 1), "float32"),
        dot_1: T.Buffer((NB, 1), "float32"),
        dot_2: T.Buffer((NB, 1), "float32"),
        # CTA splits (`cta_splits` > 1): each CTA's fp32 partial sums and the row blocks' arrival counters
        part: T.Buffer((CS, NB, O), "float32"),
        counters: T.Buffer((NRB,), "int32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        if EPI:
            prepare_launch(x, x2, gamma, perm_0, col_scale_0, weight_bias_0, perm_1, col_scale_1, weight_bias_1,
                           perm_2, col_scale_2, weight_bias_2, xs, dot_0, xs_1, dot_1, xs_2, dot_2, NB, count, PRO0,
                           PRO1, PRO2, I, -(-I // PROLOGUE_THREADS), dtype, fused.source, fused.eps, counters,
                           NRB if CS > 1 else 0)
        bx = T.launch_thread("blockIdx.x", NRB * count * CS)
        tx = T.launch_thread("threadIdx.x", 32)
        ty = T.launch_thread("threadIdx.y", W)
        if p.smem_codebook:
            wide_book = T.alloc_buffer((DYN_ENTRIES,), ENTRY, scope="shared.dyn")
            if SEP:
                red = T.alloc_buffer((max(1, _red_bytes(p, rows) // 4),), "float32", scope="shared")
            else:
                red = T.decl_buffer((DYN_ENTRIES * 4,), "float32", data=wide_book.data, scope="shared.dyn")
        else:  # no book (never accessed: TVM drops it): the scratch alone, declared `float red_ptr[]`
            wide_book = T.alloc_buffer((1,), ENTRY, scope="shared.dyn")
            red = T.alloc_buffer((DYN_ENTRIES * 4,), "float32", scope="shared.dyn")
        tile = T.alloc_buffer((max(1, W * NBUF * TILE_HALVES),), dtype, scope="shared")
        acc = T.alloc_buffer((NACC,), "float32", scope="local")
        fa = T.alloc_buffer((8,), dtype, scope="local")
        fb = T.alloc_buffer((NT * 4,), dtype, scope="local")
        xa = T.alloc_buffer((U * NT * CW,), dtype, scope="local")
        cl = T.alloc_buffer((U * CLW,), CD, scope="local")
        rl = T.alloc_buffer((U * CLW,), RCD, scope="local")
        ent = T.alloc_buffer(((4 if REG else 1) * v,), dtype, scope="local")
        rent = T.alloc_buffer((v,), dtype, scope="local")
        tot = T.alloc_buffer((1,), "float32", scope="local")
        stage = T.alloc_buffer((v,), dtype, scope="local")
        arrived = T.alloc_buffer((1,), "int32", scope="shared")
        last = T.alloc_buffer((1,), "int32", scope="local")
        if count == 1 and CS > 1:  # CTA bx: split bx // NRB of row block bx % NRB
            tid = ty * 32 + tx
            g = tx // 4
            q = tx % 4
            rg = ty // P
            sp = ty % P
            rb = bx % NRB
            cs = bx // NRB
            i0 = (rb * RW + rg) * WV  # first vector row of this warp
            body(xs, centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, y, i0, tx, ty,
                 tid, g, q, rg, sp, cs * P + sp, cs, rb, wide_book, red, tile, acc, fa, fb, xa, cl, rl, ent, rent, tot,
                 stage, dot_0, residual, 0, part, counters, arrived, last)
        elif count == 1:  # named as before the multi-layer form, so the single-layer kernel's CUDA is unchanged
            tid = ty * 32 + tx
            g = tx // 4
            q = tx % 4
            rg = ty // P
            sp = ty % P
            i0 = (bx * RW + rg) * WV  # first vector row of this warp
            body(xs, centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, y, i0, tx, ty,
                 tid, g, q, rg, sp, sp, 0, bx, wide_book, red, tile, acc, fa, fb, xa, cl, rl, ent, rent, tot, stage,
                 dot_0, residual, 0, part, counters, arrived, last)
        else:
            if bx < NRB:
                body(xs, centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, y,
                     (bx * RW + ty // P) * WV, tx, ty, ty * 32 + tx, tx // 4, tx % 4, ty // P, ty % P, ty % P, 0, 0,
                     wide_book, red, tile, acc, fa, fb, xa, cl, rl, ent, rent, tot, stage, dot_0, residual, 0, part,
                     counters, arrived, last)
            # the CTA's branch is uniform, but the sync planner sees the next branch's shared-memory writes after
            # this one's reads: a barrier here, outside any condition, orders them
            T.tvm_storage_sync("shared")
            if bx // NRB == 1:
                if CONCAT:
                    body(xs_1, centroids_1, codes_1, res_centroids_1, res_codes_1, outlier_centroids_1,
                         outlier_codes_1, y, ((bx - NRB) * RW + ty // P) * WV, tx, ty, ty * 32 + tx, tx // 4, tx % 4,
                         ty // P, ty % P, ty % P, 0, 0, wide_book, red, tile, acc, fa, fb, xa, cl, rl, ent, rent, tot,
                         stage, dot_1, residual, O, part, counters, arrived, last)
                else:
                    body(xs_1, centroids_1, codes_1, res_centroids_1, res_codes_1, outlier_centroids_1,
                         outlier_codes_1, y_1, ((bx - NRB) * RW + ty // P) * WV, tx, ty, ty * 32 + tx, tx // 4, tx % 4,
                         ty // P, ty % P, ty % P, 0, 0, wide_book, red, tile, acc, fa, fb, xa, cl, rl, ent, rent, tot,
                         stage, dot_1, residual, 0, part, counters, arrived, last)
            if count == 3:
                T.tvm_storage_sync("shared")
                if bx // NRB == 2:
                    if CONCAT:
                        body(xs_2, centroids_2, codes_2, res_centroids_2, res_codes_2, outlier_centroids_2,
                             outlier_codes_2, y, ((bx - 2 * NRB) * RW + ty // P) * WV, tx, ty, ty * 32 + tx, tx // 4,
                             tx % 4, ty // P, ty % P, ty % P, 0, 0, wide_book, red, tile, acc, fa, fb, xa, cl, rl,
                             ent, rent, tot, stage, dot_2, residual, 2 * O, part, counters, arrived, last)
                    else:
                        body(xs_2, centroids_2, codes_2, res_centroids_2, res_codes_2, outlier_centroids_2,
                             outlier_codes_2, y_2, ((bx - 2 * NRB) * RW + ty // P) * WV, tx, ty, ty * 32 + tx, tx // 4,
                             tx % 4, ty // P, ty % P, ty % P, 0, 0, wide_book, red, tile, acc, fa, fb, xa, cl, rl,
                             ent, rent, tot, stage, dot_2, residual, 0, part, counters, arrived, last)

    from vptq_mlc.artifact.vq_layout import vq_operand_shapes

    def layer(name: str, m: int) -> str:  # layer 0's parameters keep the single-layer names
        return f"{name}_{m}" if m else name

    if EPI:
        order = ["x", *(["x2"] if fused.source == "swiglu" else ["gamma"] if fused.source == "rmsnorm" else [])]
        for m in range(count):
            order += [*([f"perm_{m}"] if prologue[m] else []), f"col_scale_{m}", f"weight_bias_{m}",
                      *(layer(n, m) for n in vq_operand_shapes(cfg))]
        order += ["residual"] if RESID else []
        order += [n for m in range(count) for n in (layer("xs", m), f"dot_{m}")]
        order += ["part", "counters"] if CS > 1 else []
        return ordered_params(kernel, order + (["y"] if CONCAT else [layer("y", m) for m in range(count)]))
    if count == 1:
        return keep_generic_operands(kernel, cfg)
    names = ("xs", "y", *vq_operand_shapes(cfg))
    return keep_params(kernel, {layer(n, m) for n in names for m in range(count)})
