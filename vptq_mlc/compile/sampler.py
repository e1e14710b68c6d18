"""Token sampling compiled into the model library, so logits never leave the device.

`add_sampler(mod, target)` adds one relax function, `sample_tokens` (argument layout:
vptq_mlc/artifact/sampler_abi.py), that samples a whole batch in one call with the semantics of the numpy
reference (runtime/sampling.py): constraint bitmask and logit_bias on the raw logits, repetition/presence/frequency
penalties, temperature, then top-k, top-p and min-p, one draw per row from a uniform the host derives from
(seed, step), so a seeded request samples the same token alone or in any batch. Greedy rows (temperature 0) take
the first argmax.

Why no sort: sorting a 128k vocabulary costs several ms per row on a CPU. The filters only need thresholds:
- min-p keeps `p_i >= min_p * p_max`, i.e. `exp(x_i - max) >= min_p`;
- top-k keeps `x_i >=` the k-th largest value: the largest key t (an order-preserving int of the float bits) with
  at least k tokens at or above it;
- top-p keeps token i iff the probability mass of strictly larger tokens is `< p` (the reference's ascending
  cumulative sum `<= 1 - p` rule): the largest key t whose mass at or above it is `>= p` (of the top-k mass);
- the CPU finds each threshold by radix select (4 histogram passes over 8-bit digits of the key); GPUs rank up to
  512 candidates directly (the count and mass of strictly larger candidates, one candidate per thread) and search
  larger sets by testing 15 keys per pass (8 block-wide passes over the 32-bit key);
and the draw walks the kept tokens in token-id order, exactly as the reference's `searchsorted` over the cdf does.
A compaction pass first keeps only the candidates that can survive top-p / min-p (`p_i >= (1 - top_p) / vocab` of
the relevant mass, or `>= min_p`), so the threshold passes touch a few thousand entries for peaked distributions
(falling back to the whole vocabulary when top-k needs more than the candidates, or without top-p / min-p).
CPU: rows in parallel, each row's passes serial. GPU (`gpu_kernel`): the full-vocabulary passes (scores, max, sum,
compaction) run over 64 blocks per row (batch 1 would leave all but one SM idle); built with `top_p_search`
(TOP_P_SEARCH_ENV), so does the top-p search when a row has more candidates than one block ranks directly (a flat
distribution: tens of thousands), one launch per pass; the other thresholds and the draw run in one block per row.
No atomics, so every sum has a fixed order and a seeded row samples the same token in any batch.

Rows whose scores keep no token (NaN logits, a constraint that allows nothing) take their first argmax (token 0 when
every score is NaN), and top-n lists fall back to token 0: every id the kernels index with or return lies inside the
vocabulary whatever the logits hold.

Ties: tokens of equal score are kept or dropped together (top-k and top-p keep every token whose score equals the
threshold's), so at a tie on the top-p boundary the kept set can exceed the smallest set reaching top_p; the numpy
reference drops the lower-id part of such a tie group instead. Exact ties of float logits are rare in trained
models; the tests use logits without ties.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

from vptq_mlc.artifact.sampler_abi import (
    F_COLS,
    F_FREQUENCY,
    F_MIN_P,
    F_PRESENCE,
    F_REPETITION,
    F_TEMPERATURE,
    F_TOP_P,
    F_UNIFORM,
    FUNCTION,
    I_BIAS_END,
    I_BIAS_START,
    I_COLS,
    I_MASK_ROW,
    I_PENALTY_END,
    I_PENALTY_START,
    I_TOP_K,
    I_TOP_N,
    I_VOCAB_LIMIT,
    MAX_TOP,
)
from vptq_mlc.errors import compile_switch

NEG_INF = tirx.const(float("-inf"), "float32")
POS_INF = tirx.const(float("inf"), "float32")
KEY_MIN = tirx.const(-(2**31), "int64")  # below every float key


def _key(x):
    """An int whose order is the float order (negative floats: flip the magnitude bits)."""
    bits = T.reinterpret("int32", x)
    return T.Cast("int64", T.if_then_else(bits >= 0, bits, T.bitwise_xor(bits, 0x7FFFFFFF)))


def _argmax_key(value, index):
    """One int64 whose max is the largest value, then the lowest index; index -1 (none) sorts below all."""
    packed = T.bitwise_or(T.shift_left(_key(value), T.int64(32)), T.int64(0xFFFFFFFF) - index)
    return T.if_then_else(index < 0, T.min_value("int64"), packed)


def _argmax_index(packed):
    return T.int64(0xFFFFFFFF) - T.bitwise_and(packed, T.int64(0xFFFFFFFF))


def cpu_kernel() -> tirx.PrimFunc:
    """Rows in parallel; each row's passes run serially over its (compacted) tokens."""

    @T.macro
    def radix_select(r, cand, work, hist, f, k, n_cand, floor_key, use_mass, target):
        """k[2] = the largest key t with W(key >= t) >= target over the candidates with key >= floor_key, W a
        count or the exp mass: four histogram passes over 8-bit digits of the key (as unsigned), high first."""
        k[2] = T.int64(0)  # the digits chosen so far, unsigned key space
        f[6] = T.float32(0)  # weight of the candidates above that prefix
        for level in range(4):
            shift = T.int64(24) - T.int64(8) * level
            for d in range(256):
                hist[d] = T.float32(0)
            for j in range(n_cand):
                c = T.Cast("int64", cand[r, j])
                key = _key(work[r, 0, c])
                u = key + T.int64(2**31)
                if T.shift_right(u, shift + 8) == T.shift_right(k[2], shift + 8) and key >= floor_key:
                    d = T.bitwise_and(T.shift_right(u, shift), T.int64(255))
                    hist[d] = hist[d] + (work[r, 1, c] if use_mass else T.float32(1))
            k[4] = T.int64(-1)  # the digit
            for d0 in range(256):
                if k[4] < 0:
                    if f[6] + hist[255 - d0] >= target:
                        k[4] = T.int64(255) - d0
                    else:
                        f[6] = f[6] + hist[255 - d0]
            k[2] = T.bitwise_or(k[2], T.shift_left(T.max(k[4], T.int64(0)), shift))
        k[2] = k[2] - T.int64(2**31)

    @T.prim_func(private=True)
    def kernel(
        var_logits: T.handle, var_fp: T.handle, var_ip: T.handle, var_bt: T.handle, var_bv: T.handle,
        var_pt: T.handle, var_pc: T.handle, var_mask: T.handle, var_tok: T.handle, var_lp: T.handle,
        var_work: T.handle, var_cand: T.handle,
    ):
        T.func_attr({"tirx.noalias": True})
        rows, vocab = T.int64(), T.int64()
        nb, npen, nmask, words = T.int64(), T.int64(), T.int64(), T.int64()
        logits = T.match_buffer(var_logits, (rows, vocab), "float32")
        fp = T.match_buffer(var_fp, (rows, F_COLS), "float32")
        ip = T.match_buffer(var_ip, (rows, I_COLS), "int32")
        bias_tok = T.match_buffer(var_bt, (nb,), "int32")
        bias_val = T.match_buffer(var_bv, (nb,), "float32")
        pen_tok = T.match_buffer(var_pt, (npen,), "int32")
        pen_cnt = T.match_buffer(var_pc, (npen,), "int32")
        bitmask = T.match_buffer(var_mask, (nmask, words), "int32")
        out_tok = T.match_buffer(var_tok, (rows, MAX_TOP + 1), "int32")
        out_lp = T.match_buffer(var_lp, (rows, MAX_TOP + 1), "float32")
        work = T.match_buffer(var_work, (rows, 2, vocab), "float32")  # scaled scores x, then exp(x - max)
        cand = T.match_buffer(var_cand, (rows, vocab), "int32")  # candidate token ids, in id order
        for r in T.parallel(rows):
            f = T.decl_buffer((8,), "float32", scope="local")  # max, Z, L, Zk, W, target, acc, best
            k = T.decl_buffer((8,), "int64", scope="local")  # argmax, n_cand, selected, thr, digit/flag, token, i, last
            hist = T.decl_buffer((256,), "float32", scope="local")
            lim = T.min(T.Cast("int64", ip[r, I_VOCAB_LIMIT]), vocab)
            temp = fp[r, F_TEMPERATURE]
            inv_t = T.if_then_else(temp > T.float32(0), T.float32(1) / temp, T.float32(1))
            mrow = T.Cast("int64", ip[r, I_MASK_ROW])
            # 1. processed scores: mask, logit_bias, penalties (on raw logits), then temperature; max and argmax
            b0 = T.Cast("int64", ip[r, I_BIAS_START])
            b1 = T.Cast("int64", ip[r, I_BIAS_END])
            p0 = T.Cast("int64", ip[r, I_PENALTY_START])
            p1 = T.Cast("int64", ip[r, I_PENALTY_END])
            f[0] = NEG_INF
            k[0] = T.int64(0)
            if mrow < 0 and b0 == b1 and p0 == p1:  # the common case: one fused pass
                for i in range(vocab):
                    s = T.if_then_else(i < lim, logits[r, i] * inv_t, NEG_INF)
                    work[r, 0, i] = s
                    if s > f[0]:
                        f[0] = s
                        k[0] = i
            else:
                for i in range(vocab):
                    word = bitmask[T.max(mrow, T.int64(0)), i // 32]
                    bit = T.bitwise_and(T.shift_right(word, T.Cast("int32", i % 32)), 1)
                    work[r, 0, i] = T.if_then_else(i < lim and (mrow < 0 or bit == 1), logits[r, i], NEG_INF)
                for j in range(b0, b1):
                    t = T.Cast("int64", bias_tok[j])
                    if t < vocab:
                        work[r, 0, t] = work[r, 0, t] + bias_val[j]
                rep = fp[r, F_REPETITION]
                for j in range(p0, p1):
                    t = T.Cast("int64", pen_tok[j])
                    c = pen_cnt[j]
                    if t < vocab:
                        s = work[r, 0, t]
                        s2 = T.if_then_else(s < T.float32(0), s * rep, s / rep)
                        work[r, 0, t] = s2 - T.Cast("float32", c) * fp[r, F_FREQUENCY] - T.if_then_else(
                            c > 0, fp[r, F_PRESENCE], T.float32(0))
                for i in range(vocab):
                    s = work[r, 0, i] * inv_t
                    work[r, 0, i] = s
                    if s > f[0]:
                        f[0] = s
                        k[0] = i
            k[5] = k[0]  # greedy token
            top_n = T.Cast("int64", ip[r, I_TOP_N])
            if temp > T.float32(0) or top_n >= 0:
                f[1] = T.float32(0)
                for i in range(vocab):
                    e = T.exp(work[r, 0, i] - f[0])
                    work[r, 1, i] = e
                    f[1] = f[1] + e
            if temp > T.float32(0):
                top_k = T.Cast("int64", ip[r, I_TOP_K])
                top_p = fp[r, F_TOP_P]
                min_p = fp[r, F_MIN_P]
                k_on = top_k > 0 and top_k < lim
                # 2. candidates: tokens that can survive top-p / min-p, in id order
                f[2] = T.float32(0)
                if top_p < T.float32(1):
                    f[2] = (T.float32(1) - top_p) * T.if_then_else(k_on, T.float32(1), f[1]) / T.Cast("float32", lim)
                f[2] = T.max(f[2], min_p)
                k[1] = T.int64(0)
                for i in range(lim):
                    if work[r, 1, i] >= f[2]:
                        cand[r, k[1]] = T.Cast("int32", i)
                        k[1] = k[1] + 1
                if k_on and k[1] < top_k:  # top-k's normalisation needs tokens below the bound: take them all
                    k[1] = lim
                    for i in range(lim):
                        cand[r, i] = T.Cast("int32", i)
                n_cand = k[1]
                # 3. top-k threshold: the largest key with at least top_k candidates at or above it
                k[2] = KEY_MIN
                if k_on:
                    radix_select(r, cand, work, hist, f, k, n_cand, KEY_MIN, False, T.Cast("float32", top_k))
                k_thr = k[2]
                f[3] = f[1]
                if k_on:
                    f[3] = T.float32(0)
                    for j in range(n_cand):
                        c = T.Cast("int64", cand[r, j])
                        if _key(work[r, 0, c]) >= k_thr:
                            f[3] = f[3] + work[r, 1, c]
                # 4. top-p threshold: the largest key t with (top-k kept) mass(key >= t) >= top_p * Zk, which is the
                # smallest key whose strictly larger mass is < top_p * Zk
                if top_p < T.float32(1):
                    radix_select(r, cand, work, hist, f, k, n_cand, k_thr, True, top_p * f[3])
                k[3] = k[2]  # k_thr when top-p is off
                thr = T.max(k_thr, k[3])
                # 5. one draw, walking the kept tokens in id order (none kept, only for non-finite scores: the
                # greedy token, so the token is always a valid id)
                f[4] = T.float32(0)
                k[7] = k[0]
                for j in range(n_cand):
                    c = T.Cast("int64", cand[r, j])
                    if _key(work[r, 0, c]) >= thr and work[r, 1, c] >= min_p:
                        f[4] = f[4] + work[r, 1, c]
                        k[7] = c
                f[5] = fp[r, F_UNIFORM] * f[4]
                f[6] = T.float32(0)
                k[5] = k[7]
                k[4] = T.int64(0)
                for j in range(n_cand):
                    c = T.Cast("int64", cand[r, j])
                    if k[4] == 0 and _key(work[r, 0, c]) >= thr and work[r, 1, c] >= min_p:
                        f[6] = f[6] + work[r, 1, c]
                        if f[6] > f[5]:
                            k[5] = c
                            k[4] = T.int64(1)
            out_tok[r, 0] = T.Cast("int32", k[5])
            out_lp[r, 0] = T.float32(0)
            if top_n >= 0:
                log_z = f[0] + T.log(f[1])
                out_lp[r, 0] = work[r, 0, k[5]] - log_z
                # 6. top-n logprobs, best first (ties: lower id first): n argmax rounds below the previous pick
                f[7] = POS_INF
                k[6] = T.int64(-1)
                for n in range(T.min(top_n, T.int64(MAX_TOP))):
                    f[2] = NEG_INF
                    k[4] = T.int64(-1)
                    for i in range(vocab):
                        s = work[r, 0, i]
                        if (s < f[7] or (s == f[7] and i > k[6])) and (k[4] < 0 or s > f[2]):
                            f[2] = s
                            k[4] = i
                    k[4] = T.max(k[4], T.int64(0))  # no token below the previous pick: only for NaN scores
                    f[7] = f[2]
                    k[6] = k[4]
                    out_tok[r, n + 1] = T.Cast("int32", k[4])
                    out_lp[r, n + 1] = f[2] - log_z

    return kernel


GPU_THREADS = 512  # the per-row select kernel: one block per row
SPLIT_THREADS = 256  # the full-vocabulary kernels: several blocks per row
MAX_SPLITS = 64  # blocks per row of the full-vocabulary kernels (batch 1 spreads the vocabulary over the GPU)
MIN_SLICE = 1024  # tokens per block at least (small vocabularies take one block)
PIVOTS = 15  # keys the select kernel's threshold search tests per pass (4 bits of the 32-bit key)
# Launches of the multi-block top-p search: each narrows the key interval (at most 2^32 keys wide) to at most
# 1/(PIVOTS + 1) of it, so 8 passes reach adjacent keys, the exact threshold.
SEARCH_PASSES = 8
# The multi-block top-p search is on for GPU libraries (VPTQ_MLC_SAMPLER_TOP_P_SEARCH=0 builds the one-block search):
# its kernels pass the CUDA emulator (tests/cuda_emulator.py) and tests/gpu/test_device_sampler_gpu.py on an H100,
# and in one H100 run it cut a T 0.6 / top_p 0.9 step over 128256 random-model logits from 0.50 to 0.16 ms at batch
# 1 (0.61 -> 0.43 ms at 16; peaked logits 0.13 -> 0.26 ms at 16), lifting Llama-3.1-8B-shape model sampling from
# 0.932x to 0.982x its greedy tok/s at batch 1 and 0.956x -> 0.977x at batch 16 (bench/RESULTS.md).
TOP_P_SEARCH_ENV = "VPTQ_MLC_SAMPLER_TOP_P_SEARCH"
TOP_P_SEARCH_DEFAULT = True
# A margin on the compaction bound against float rounding (its proof is in exact arithmetic; Z is merged from
# per-block sums): keeping slightly more candidates changes no result.
_BOUND_MARGIN = 0.999


def _log2(n: int) -> int:
    return n.bit_length() - 1


def _cand_score(full, work, cand, r, j):
    """The select kernel's score of candidate j: token j's (all tokens), or the copy next to it in `cand`."""
    return T.if_then_else(full, work[r, j], T.reinterpret("float32", cand[r, j]))


def _searched(top_p, k_on, n_cand, top_p_search: bool):
    """Whether `search_pass` finds a sampled row's top-p threshold: top-p, no top-k, more candidates than the select
    block ranks directly; a constant False without `top_p_search` (the lowering then drops its branches)."""
    if not top_p_search:
        return tirx.const(False, "bool")
    return tirx.all(top_p < T.float32(1), tirx.Not(k_on), n_cand > GPU_THREADS)


def gpu_kernel(top_p_search: bool = False) -> tirx.PrimFunc:
    """Three kernels (and with `top_p_search` SEARCH_PASSES + 1 launches of a fourth) per call (one PrimFunc, so the
    workspaces are its own outputs):

    1. scores, `MAX_SPLITS` blocks per row: mask, logit_bias and penalties, temperature; each block's slice of the
       vocabulary gives its max, first argmax and sum of exp(x - block max) (partials);
    2. compaction, the same grid: the row's max and Z merged from the partials (every thread in the same order, so
       every block agrees); each block keeps its slice's candidates, the tokens that can survive top-p / min-p
       (the CPU kernel's bound), in id order (per-thread contiguous chunks and a block-wide prefix sum) at the
       start of its slice of `cand`, and its count;
    2b. with `top_p_search`, the top-p search (`search_pass`), the same grid, SEARCH_PASSES + 1 launches: rows with
       top-p, no top-k and more candidates than the select block's threads (the others return at once) narrow the
       threshold key over every block's candidates, then sum each block's kept mass;
    3. select, one block per row: greedy rows take the merged argmax. Sampled rows join the candidate segments
       into `dense` (ids in id order; each position finds its segment by binary search). Up to one candidate per
       thread, each thread computes its own token's rank directly (the count and the mass of strictly larger
       candidates give top-k and top-p) and thread 0 walks the kept ones in id order; more candidates (a flat
       distribution, or top-k needing tokens below the bound or no top-p / min-p: then the whole vocabulary)
       get their scores copied next to them (contiguous loads), the thresholds by `key_search` (15 keys per
       pass, block-wide sums over the candidates only) and a chunked draw, unless `search_pass` found the
       threshold: then the draw finds its block from the blocks' kept masses and walks that block's candidates.
       Then the top-n logprobs (full-vocabulary argmax rounds).

    Values every thread needs (max, sums, thresholds) are computed identically by every thread or read from a
    reduction buffer by all threads into registers, so each block stays in lockstep without shared scalars."""
    NT, NS = GPU_THREADS, SPLIT_THREADS

    @T.macro
    def block_sum(red, tx, nt, log_nt):
        T.tvm_storage_sync("shared")
        for s in T.unroll(log_nt):
            stride = T.shift_right(nt, s + 1)
            if tx < stride:
                red[tx] = red[tx] + red[tx + stride]
            T.tvm_storage_sync("shared")

    @T.macro
    def block_max(redi, tx, nt, log_nt):  # of int64 keys; an argmax packs (value key, -index) (`_argmax_key`)
        T.tvm_storage_sync("shared")
        for s in T.unroll(log_nt):
            stride = T.shift_right(nt, s + 1)
            if tx < stride:
                redi[tx] = T.max(redi[tx], redi[tx + stride])
            T.tvm_storage_sync("shared")

    @T.macro
    def row_stats(part_f, part_i, r, splits, tx, pf_s, pi_s, st, sti):
        """st[0] = the row's max, st[1] = Z = sum of exp(x - max), sti[0] = the packed first argmax; merged from
        the scores kernel's partials (staged in shared memory) in block order, the same in every thread of every
        kernel."""
        if T.Cast("int64", tx) < splits:
            pf_s[tx, 0] = part_f[r, tx, 0]
            pf_s[tx, 1] = part_f[r, tx, 1]
            pi_s[tx, 0] = part_i[r, tx, 0]
        T.tvm_storage_sync("shared")
        sti[0] = T.min_value("int64")
        st[0] = NEG_INF
        for b in range(splits):
            sti[0] = T.max(sti[0], _argmax_key(pf_s[b, 0], T.Cast("int64", pi_s[b, 0])))
            st[0] = T.max(st[0], pf_s[b, 0])
        st[1] = T.float32(0)
        for b in range(splits):
            st[1] = st[1] + T.if_then_else(pf_s[b, 1] > T.float32(0), pf_s[b, 1] * T.exp(pf_s[b, 0] - st[0]),
                                           T.float32(0))
        T.tvm_storage_sync("shared")  # TVM may give pf_s's memory to a later buffer

    @T.macro
    def pivot_keys(piv, vi, lo: int, hi: int):
        """PIVOTS keys spread over the open interval (vi[lo], vi[hi]): each part is at most 1/(PIVOTS + 1) of it."""
        for q in T.unroll(PIVOTS):
            piv[q] = T.min(T.max(vi[lo] + T.floordiv((vi[hi] - vi[lo]) * (q + 1), PIVOTS + 1), vi[lo] + 1), vi[hi] - 1)

    @T.macro
    def pivot_block_sums(accp, redp, red, sums, tx):
        """sums[q] = the block's sum of accp[q] (fixed order: deterministic), for every q < PIVOTS."""
        for q in T.unroll(PIVOTS):
            redp[q, tx] = accp[q]
        T.tvm_storage_sync("shared")
        if tx < PIVOTS * 32:  # warp g sums row g of redp (32 lanes x NT / 32), lane 0 its 32 partials
            accp[0] = T.float32(0)
            for k in T.unroll(NT // 32):
                accp[0] = accp[0] + redp[tx // 32, tx % 32 + 32 * k]
            red[tx] = accp[0]
        T.tvm_storage_sync("shared")
        if tx < PIVOTS * 32 and tx % 32 == 0:
            accp[0] = T.float32(0)
            for k in T.unroll(32):
                accp[0] = accp[0] + red[tx + k]
            sums[tx // 32] = accp[0]
        T.tvm_storage_sync("shared")

    @T.macro
    def key_search(r, n, full, cand, work, vf, vi, tx, piv, accp, redp, red, sums, use_mass, above, floor_key, target):
        """Narrows (vi[1], vi[2]) to adjacent keys, where W(m) = the weight (a count, or the mass exp(x - max)) of
        the tokens with key >= m + above and key >= floor_key satisfies W(vi[1]) >= target > W(vi[2]): each pass
        evaluates PIVOTS keys spread over the interval at once (one pass over the tokens, one block reduction of
        PIVOTS sums), so the 2^32 keys take 8 passes where bisection takes 32. W is monotone in m also in float
        (the same non-negative terms in the same order), so the interval stays consistent."""
        while vi[2] - vi[1] > 1:
            pivot_keys(piv, vi, 1, 2)
            for q in T.unroll(PIVOTS):
                accp[q] = T.float32(0)
            for it in range(T.ceildiv(n, T.int64(NT))):
                j = it * NT + tx
                if j < n:
                    x = _cand_score(full, work, cand, r, j)
                    key = _key(x)
                    w = T.exp(x - vf[0]) if use_mass else T.float32(1)
                    if key >= floor_key:
                        for q in T.unroll(PIVOTS):
                            if key >= piv[q] + above:
                                accp[q] = accp[q] + w
            pivot_block_sums(accp, redp, red, sums, tx)
            for q in T.unroll(PIVOTS):
                accp[q] = sums[q]
            for q in T.unroll(PIVOTS):
                if accp[q] >= target:
                    vi[1] = T.max(vi[1], piv[q])
                else:
                    vi[2] = T.min(vi[2], piv[q])

    @T.macro
    def search_pass(t, rows, vocab, fp, ip, work, cand, part_i, row_f, search_f, search_i):
        """Launch t of the top-p threshold search of rows with top-p, no top-k and more candidates than the select
        block ranks directly (the others return at once), over every block's candidates (`MAX_SPLITS` blocks per
        row): `key_search` (W(m) = the candidates' mass strictly above key m; W(lo) >= top_p * Z > W(hi)) split
        into launches. Every block of launch t narrows the interval launch t - 1 started from with launch t - 1's
        per-block PIVOTS masses (summed in block order: every block gets the same interval), block 0 records it,
        and each block writes its own masses at the new PIVOTS keys. After SEARCH_PASSES launches the interval is
        two adjacent keys, hi the threshold (kept: key >= hi); the last launch writes each block's kept mass (and
        min-p), where the select block's draw starts."""
        with T.launch_thread("blockIdx.y", rows) as r:
            b = T.launch_thread("blockIdx.x", T.ceildiv(vocab, T.max(T.ceildiv(vocab, T.int64(MAX_SPLITS)),
                                                                      T.int64(MIN_SLICE))))
            tx = T.launch_thread("threadIdx.x", NT)
            slice_len = T.max(T.ceildiv(vocab, T.int64(MAX_SPLITS)), T.int64(MIN_SLICE))
            splits = T.ceildiv(vocab, slice_len)
            cnt_s = T.alloc_buffer((MAX_SPLITS,), "int32", scope="shared")
            stage = T.alloc_buffer((MAX_SPLITS, PIVOTS), "float32", scope="shared")
            redp = T.alloc_buffer((PIVOTS, NT), "float32", scope="shared")
            red = T.alloc_buffer((NT,), "float32", scope="shared")
            sums = T.alloc_buffer((PIVOTS,), "float32", scope="shared")
            piv = T.alloc_buffer((PIVOTS,), "int64", scope="local")
            accp = T.alloc_buffer((PIVOTS,), "float32", scope="local")
            vi = T.alloc_buffer((4,), "int64", scope="local")  # interval lo, hi; searched (0 / 1); candidates
            acc = T.alloc_buffer((2,), "float32", scope="local")
            lim = T.min(T.Cast("int64", ip[r, I_VOCAB_LIMIT]), vocab)
            top_k = T.Cast("int64", ip[r, I_TOP_K])
            top_p = fp[r, F_TOP_P]
            k_on = top_k > 0 and top_k < lim
            if t == 0:
                vi[0] = T.int64(0)
                vi[1] = T.int64(1)
                vi[2] = T.int64(0)
                vi[3] = T.int64(0)
                if fp[r, F_TEMPERATURE] > T.float32(0) and top_p < T.float32(1) and not k_on:
                    if T.Cast("int64", tx) < splits:
                        cnt_s[tx] = part_i[r, tx, 1]
                    T.tvm_storage_sync("shared")
                    for bb in range(splits):
                        vi[3] = vi[3] + T.Cast("int64", cnt_s[bb])
                    if vi[3] > NT:  # the select block's own ranking takes up to NT candidates
                        vi[0] = KEY_MIN - 1
                        vi[1] = _key(row_f[r, 0])
                        vi[2] = T.int64(1)
            else:
                vi[0] = search_i[r, t - 1, 0]
                vi[1] = search_i[r, t - 1, 1]
                vi[2] = search_i[r, t - 1, 2]
                if vi[2] == 1 and vi[1] - vi[0] > 1:
                    pivot_keys(piv, vi, 0, 1)
                    for it in range(T.ceildiv(splits * PIVOTS, T.int64(NT))):
                        i = it * NT + tx
                        if i < splits * PIVOTS:
                            stage[i // PIVOTS, i % PIVOTS] = search_f[r, t - 1, i // PIVOTS, i % PIVOTS]
                    T.tvm_storage_sync("shared")
                    if tx < PIVOTS:
                        acc[0] = T.float32(0)
                        for bb in range(splits):
                            acc[0] = acc[0] + stage[bb, tx]
                        sums[tx] = acc[0]
                    T.tvm_storage_sync("shared")
                    for q in T.unroll(PIVOTS):
                        accp[q] = sums[q]
                    for q in T.unroll(PIVOTS):
                        if accp[q] >= top_p * row_f[r, 1]:
                            vi[0] = T.max(vi[0], piv[q])
                        else:
                            vi[1] = T.min(vi[1], piv[q])
            if b == 0 and tx == 0:
                search_i[r, t, 0] = vi[0]
                search_i[r, t, 1] = vi[1]
                search_i[r, t, 2] = vi[2]
            if vi[2] == 1:
                n_b = T.Cast("int64", part_i[r, b, 1])
                base = b * slice_len
                row_max = row_f[r, 0]
                if t < SEARCH_PASSES:
                    if vi[1] - vi[0] > 1:
                        pivot_keys(piv, vi, 0, 1)
                        for q in T.unroll(PIVOTS):
                            accp[q] = T.float32(0)
                        for it in range(T.ceildiv(n_b, T.int64(NT))):
                            j = it * NT + tx
                            if j < n_b:
                                x = work[r, T.Cast("int64", cand[r, base + j])]
                                key = _key(x)
                                w = T.exp(x - row_max)
                                for q in T.unroll(PIVOTS):
                                    if key > piv[q]:
                                        accp[q] = accp[q] + w
                        pivot_block_sums(accp, redp, red, sums, tx)
                        if tx < PIVOTS:
                            search_f[r, t, b, tx] = sums[tx]
                else:
                    min_p = fp[r, F_MIN_P]
                    acc[1] = T.float32(0)
                    for it in range(T.ceildiv(n_b, T.int64(NT))):
                        j = it * NT + tx
                        if j < n_b:
                            x = work[r, T.Cast("int64", cand[r, base + j])]
                            e = T.exp(x - row_max)
                            if _key(x) >= vi[1] and e >= min_p:
                                acc[1] = acc[1] + e
                    red[tx] = acc[1]
                    block_sum(red, tx, NT, _log2(NT))
                    if tx == 0:
                        search_f[r, t, b, 0] = red[0]

    @T.prim_func(private=True)
    def kernel(
        var_logits: T.handle, var_fp: T.handle, var_ip: T.handle, var_bt: T.handle, var_bv: T.handle,
        var_pt: T.handle, var_pc: T.handle, var_mask: T.handle, var_tok: T.handle, var_lp: T.handle,
        var_work: T.handle, var_cand: T.handle, var_dense: T.handle, var_part_f: T.handle, var_part_i: T.handle,
        var_row_f: T.handle, var_search_f: T.handle, var_search_i: T.handle,
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        rows, vocab = T.int64(), T.int64()
        nb, npen, nmask, words = T.int64(), T.int64(), T.int64(), T.int64()
        logits = T.match_buffer(var_logits, (rows, vocab), "float32")
        fp = T.match_buffer(var_fp, (rows, F_COLS), "float32")
        ip = T.match_buffer(var_ip, (rows, I_COLS), "int32")
        bias_tok = T.match_buffer(var_bt, (nb,), "int32")
        bias_val = T.match_buffer(var_bv, (nb,), "float32")
        pen_tok = T.match_buffer(var_pt, (npen,), "int32")
        pen_cnt = T.match_buffer(var_pc, (npen,), "int32")
        bitmask = T.match_buffer(var_mask, (nmask, words), "int32")
        out_tok = T.match_buffer(var_tok, (rows, MAX_TOP + 1), "int32")
        out_lp = T.match_buffer(var_lp, (rows, MAX_TOP + 1), "float32")
        work = T.match_buffer(var_work, (rows, vocab), "float32")  # the processed, scaled scores x
        cand = T.match_buffer(var_cand, (rows, vocab), "int32")  # candidate ids, a segment per block; then scores
        dense = T.match_buffer(var_dense, (rows, vocab), "int32")  # the candidate ids together, in id order
        part_f = T.match_buffer(var_part_f, (rows, MAX_SPLITS, 2), "float32")  # per block: max, sum exp(x - max)
        part_i = T.match_buffer(var_part_i, (rows, MAX_SPLITS, 2), "int32")  # per block: first argmax, candidates
        row_f = T.match_buffer(var_row_f, (rows, 2), "float32")  # the row's max and Z (sampled, compacted rows)
        # the multi-block top-p search: per pass and block, the PIVOTS masses (the last pass: the kept mass) ...
        search_f = T.match_buffer(var_search_f, (rows, SEARCH_PASSES + 1, MAX_SPLITS, PIVOTS), "float32")
        # ... and per pass, the key interval it started from (lo, hi) and whether the row takes the search
        search_i = T.match_buffer(var_search_i, (rows, SEARCH_PASSES + 1, 4), "int64")
        # 1. scores: mask, logit_bias, penalties (on raw logits; distinct tokens per row: no races), temperature
        with T.launch_thread("blockIdx.y", rows) as r:
            b = T.launch_thread("blockIdx.x", T.ceildiv(vocab, T.max(T.ceildiv(vocab, T.int64(MAX_SPLITS)),
                                                                      T.int64(MIN_SLICE))))
            tx = T.launch_thread("threadIdx.x", NS)
            slice_len = T.max(T.ceildiv(vocab, T.int64(MAX_SPLITS)), T.int64(MIN_SLICE))
            splits = T.ceildiv(vocab, slice_len)
            red = T.alloc_buffer((NS,), "float32", scope="shared")
            redi = T.alloc_buffer((NS,), "int64", scope="shared")
            acc = T.alloc_buffer((2,), "float32", scope="local")
            acci = T.alloc_buffer((1,), "int64", scope="local")
            lo = b * slice_len
            hi = T.min(lo + slice_len, vocab)
            its = T.ceildiv(slice_len, T.int64(NS))
            lim = T.min(T.Cast("int64", ip[r, I_VOCAB_LIMIT]), vocab)
            temp = fp[r, F_TEMPERATURE]
            inv_t = T.if_then_else(temp > T.float32(0), T.float32(1) / temp, T.float32(1))
            mrow = T.Cast("int64", ip[r, I_MASK_ROW])
            b0 = T.Cast("int64", ip[r, I_BIAS_START])
            b1 = T.Cast("int64", ip[r, I_BIAS_END])
            p0 = T.Cast("int64", ip[r, I_PENALTY_START])
            p1 = T.Cast("int64", ip[r, I_PENALTY_END])
            plain = mrow < 0 and b0 == b1 and p0 == p1
            if not plain:
                for it in range(its):
                    i = lo + it * NS + tx
                    if i < hi:
                        word = bitmask[T.max(mrow, T.int64(0)), i // 32]
                        bit = T.bitwise_and(T.shift_right(word, T.Cast("int32", i % 32)), 1)
                        work[r, i] = T.if_then_else(i < lim and (mrow < 0 or bit == 1), logits[r, i], NEG_INF)
                T.tvm_storage_sync("shared")
                for it in range(T.ceildiv(b1 - b0, T.int64(NS))):
                    j = b0 + it * NS + tx
                    if j < b1:
                        t = T.Cast("int64", bias_tok[j])
                        if t >= lo and t < hi:
                            work[r, t] = work[r, t] + bias_val[j]
                T.tvm_storage_sync("shared")
                for it in range(T.ceildiv(p1 - p0, T.int64(NS))):
                    j = p0 + it * NS + tx
                    if j < p1:
                        t = T.Cast("int64", pen_tok[j])
                        c = pen_cnt[j]
                        if t >= lo and t < hi:
                            s = work[r, t]
                            rep = fp[r, F_REPETITION]
                            s2 = T.if_then_else(s < T.float32(0), s * rep, s / rep)
                            work[r, t] = s2 - T.Cast("float32", c) * fp[r, F_FREQUENCY] - T.if_then_else(
                                c > 0, fp[r, F_PRESENCE], T.float32(0))
                T.tvm_storage_sync("shared")
            acc[0] = NEG_INF
            acci[0] = T.int64(-1)
            for it in range(its):
                i = lo + it * NS + tx
                if i < hi:
                    s = T.if_then_else(plain, T.if_then_else(i < lim, logits[r, i] * inv_t, NEG_INF),
                                       work[r, i] * inv_t)
                    work[r, i] = s
                    if acci[0] < 0 or s > acc[0]:
                        acc[0] = s
                        acci[0] = i
            redi[tx] = _argmax_key(acc[0], acci[0])
            block_max(redi, tx, NS, _log2(NS))
            acci[0] = _argmax_index(redi[0])
            T.tvm_storage_sync("shared")
            acc[0] = work[r, acci[0]]  # the block's max
            acc[1] = T.float32(0)
            if temp > T.float32(0) or ip[r, I_TOP_N] >= 0:
                for it in range(its):
                    i = lo + it * NS + tx
                    if i < hi:
                        s = work[r, i]
                        if s > NEG_INF:
                            acc[1] = acc[1] + T.exp(s - acc[0])
                red[tx] = acc[1]
                block_sum(red, tx, NS, _log2(NS))
                acc[1] = red[0]
            if tx == 0:
                part_f[r, b, 0] = acc[0]
                part_f[r, b, 1] = acc[1]
                part_i[r, b, 0] = T.Cast("int32", acci[0])
        # 2. compaction of sampled rows with top-p or min-p: each block's candidates, in id order
        with T.launch_thread("blockIdx.y", rows) as r:
            b = T.launch_thread("blockIdx.x", T.ceildiv(vocab, T.max(T.ceildiv(vocab, T.int64(MAX_SPLITS)),
                                                                      T.int64(MIN_SLICE))))
            tx = T.launch_thread("threadIdx.x", NS)
            slice_len = T.max(T.ceildiv(vocab, T.int64(MAX_SPLITS)), T.int64(MIN_SLICE))
            splits = T.ceildiv(vocab, slice_len)
            scan = T.alloc_buffer((NS,), "int32", scope="shared")
            pf_s = T.alloc_buffer((MAX_SPLITS, 2), "float32", scope="shared")
            pi_s = T.alloc_buffer((MAX_SPLITS, 2), "int32", scope="shared")
            st = T.alloc_buffer((2,), "float32", scope="local")
            sti = T.alloc_buffer((1,), "int64", scope="local")
            cnt = T.alloc_buffer((3,), "int32", scope="local")  # own count, write position, scan addend
            lo = b * slice_len
            hi = T.min(lo + slice_len, vocab)
            lim = T.min(T.Cast("int64", ip[r, I_VOCAB_LIMIT]), vocab)
            top_k = T.Cast("int64", ip[r, I_TOP_K])
            top_p = fp[r, F_TOP_P]
            min_p = fp[r, F_MIN_P]
            if fp[r, F_TEMPERATURE] > T.float32(0) and (top_p < T.float32(1) or min_p > T.float32(0)):
                row_stats(part_f, part_i, r, splits, tx, pf_s, pi_s, st, sti)
                k_on = top_k > 0 and top_k < lim
                # the CPU kernel's bound: p_i >= (1 - top_p) / vocab of the mass (of 1 <= Zk with top-k), or min_p
                bound = T.max(T.if_then_else(top_p < T.float32(1), (T.float32(1) - top_p) * T.if_then_else(
                    k_on, T.float32(1), st[1]) / T.Cast("float32", lim) * T.float32(_BOUND_MARGIN), T.float32(0)),
                    min_p)
                chunk = T.ceildiv(slice_len, T.int64(NS))
                c0 = lo + T.Cast("int64", tx) * chunk
                c1 = T.min(T.min(c0 + chunk, hi), lim)
                cnt[0] = 0
                for j in range(chunk):
                    if c0 + j < c1:
                        if T.exp(work[r, c0 + j] - st[0]) >= bound:
                            cnt[0] = cnt[0] + 1
                scan[tx] = cnt[0]
                for s in T.unroll(_log2(NS)):  # inclusive prefix sum (Hillis-Steele)
                    T.tvm_storage_sync("shared")
                    cnt[2] = T.if_then_else(tx >= T.shift_left(1, s), scan[tx - T.shift_left(1, s)], 0)
                    T.tvm_storage_sync("shared")
                    scan[tx] = scan[tx] + cnt[2]
                T.tvm_storage_sync("shared")
                cnt[1] = scan[tx] - cnt[0]
                for j in range(chunk):
                    if c0 + j < c1:
                        if T.exp(work[r, c0 + j] - st[0]) >= bound:
                            cand[r, lo + T.Cast("int64", cnt[1])] = T.Cast("int32", c0 + j)
                            cnt[1] = cnt[1] + 1
                if tx == NS - 1:
                    part_i[r, b, 1] = scan[NS - 1]
                if top_p_search:
                    if b == 0 and tx == 0:
                        row_f[r, 0] = st[0]
                        row_f[r, 1] = st[1]
        if top_p_search:
            # 2b. the top-p threshold of rows with many candidates (no top-k): SEARCH_PASSES passes of the key search
            # over every block's candidates, then each block's kept mass (see `search_pass`)
            for t in range(SEARCH_PASSES + 1):
                search_pass(t, rows, vocab, fp, ip, work, cand, part_i, row_f, search_f, search_i)
        # 3. select: one block per row
        with T.launch_thread("blockIdx.x", rows) as r:
            tx = T.launch_thread("threadIdx.x", NT)
            slice_len = T.max(T.ceildiv(vocab, T.int64(MAX_SPLITS)), T.int64(MIN_SLICE))
            splits = T.ceildiv(vocab, slice_len)
            red = T.alloc_buffer((NT,), "float32", scope="shared")
            redi = T.alloc_buffer((NT,), "int64", scope="shared")
            redp = T.alloc_buffer((PIVOTS, NT), "float32", scope="shared")  # the key search's per-thread sums
            sums = T.alloc_buffer((PIVOTS,), "float32", scope="shared")  # and its block sums
            pf_s = T.alloc_buffer((MAX_SPLITS, 2), "float32", scope="shared")
            pi_s = T.alloc_buffer((MAX_SPLITS, 2), "int32", scope="shared")
            seg_start = T.alloc_buffer((MAX_SPLITS,), "int64", scope="shared")  # candidate position of each segment
            piv = T.alloc_buffer((PIVOTS,), "int64", scope="local")
            accp = T.alloc_buffer((PIVOTS,), "float32", scope="local")
            cand_key = T.alloc_buffer((NT,), "int64", scope="shared")  # small path: each candidate's key
            cand_e = T.alloc_buffer((NT,), "float32", scope="shared")  # its exp(x - max)
            cand_kept = T.alloc_buffer((NT,), "float32", scope="shared")  # its mass if kept, else -1
            chunk_of = T.alloc_buffer((1,), "int64", scope="shared")  # the draw's chunk (thread)
            found_in = T.alloc_buffer((1,), "int64", scope="shared")
            target_in = T.alloc_buffer((1,), "float32", scope="shared")  # the draw's target within that chunk
            token_of = T.alloc_buffer((1,), "int64", scope="shared")
            st = T.alloc_buffer((2,), "float32", scope="local")
            sti = T.alloc_buffer((1,), "int64", scope="local")
            acc = T.alloc_buffer((3,), "float32", scope="local")
            acci = T.alloc_buffer((3,), "int64", scope="local")
            # registers, equal in every thread: max, Z, Zk / token, search interval (lo, hi), top-k threshold
            vf = T.alloc_buffer((3,), "float32", scope="local")
            vi = T.alloc_buffer((4,), "int64", scope="local")
            nc = T.alloc_buffer((2,), "int64", scope="local")  # candidates, dense write position
            lim = T.min(T.Cast("int64", ip[r, I_VOCAB_LIMIT]), vocab)
            temp = fp[r, F_TEMPERATURE]
            top_n = T.Cast("int64", ip[r, I_TOP_N])
            row_stats(part_f, part_i, r, splits, tx, pf_s, pi_s, st, sti)
            if T.Cast("int64", tx) < splits:  # the candidate counts (the compaction kernel's; not staged there)
                pi_s[tx, 1] = part_i[r, tx, 1]
            T.tvm_storage_sync("shared")
            vi[0] = _argmax_index(sti[0])  # the greedy token
            vf[0] = st[0]
            vf[1] = st[1]
            if temp > T.float32(0):
                top_k = T.Cast("int64", ip[r, I_TOP_K])
                top_p = fp[r, F_TOP_P]
                min_p = fp[r, F_MIN_P]
                k_on = top_k > 0 and top_k < lim
                compacted = top_p < T.float32(1) or min_p > T.float32(0)
                nc[0] = T.int64(0)
                if compacted:
                    for b in range(splits):
                        nc[0] = nc[0] + T.Cast("int64", pi_s[b, 1])
                full = not compacted or (k_on and nc[0] < top_k)  # top-k needs tokens below the bound: all
                n = T.if_then_else(full, lim, nc[0])
                # the segments together, in order: position p's segment by binary search (not for a row whose
                # threshold `search_pass` found)
                if not full and not _searched(top_p, k_on, nc[0], top_p_search):
                    if tx == 0:
                        nc[1] = T.int64(0)
                        for b in range(splits):
                            seg_start[b] = nc[1]
                            nc[1] = nc[1] + T.Cast("int64", pi_s[b, 1])
                    T.tvm_storage_sync("shared")
                    for it in range(T.ceildiv(n, T.int64(NT))):
                        p = it * NT + tx
                        if p < n:
                            acci[0] = T.int64(0)  # the last segment starting at or before p (a non-empty one)
                            acci[1] = splits - 1
                            for _step in T.unroll((MAX_SPLITS - 1).bit_length()):
                                acci[2] = seg_start[T.floordiv(acci[0] + acci[1] + 1, 2)]
                                if acci[2] <= p:
                                    acci[0] = T.floordiv(acci[0] + acci[1] + 1, 2)
                                else:
                                    acci[1] = T.floordiv(acci[0] + acci[1] + 1, 2) - 1
                            dense[r, p] = cand[r, acci[0] * slice_len + p - seg_start[acci[0]]]
                    T.tvm_storage_sync("shared")
                if n <= NT:
                    # 3a. one candidate per thread: rank by the count / mass of strictly larger candidates
                    valid = T.Cast("int64", tx) < n
                    tok = T.if_then_else(valid, T.if_then_else(full, T.Cast("int64", tx),
                                                               T.Cast("int64", dense[r, T.Cast("int64", tx)])),
                                         T.int64(0))
                    key = _key(work[r, tok])
                    e = T.exp(work[r, tok] - vf[0])
                    cand_key[tx] = key
                    cand_e[tx] = e
                    T.tvm_storage_sync("shared")
                    acci[1] = T.int64(0)  # candidates strictly larger
                    acc[0] = T.float32(0)  # their mass
                    for j in range(n):  # shared loads go to registers first (no shared loads in conditions)
                        acci[2] = cand_key[j]
                        acc[2] = cand_e[j]
                        if acci[2] > key:
                            acci[1] = acci[1] + 1
                            acc[0] = acc[0] + acc[2]
                    kept_k = not k_on or acci[1] < top_k
                    vf[2] = vf[1]
                    if k_on:
                        red[tx] = T.if_then_else(valid and kept_k, e, T.float32(0))
                        block_sum(red, tx, NT, _log2(NT))
                        vf[2] = red[0]
                    kept = valid and kept_k and (top_p >= T.float32(1) or acc[0] < top_p * vf[2]) and e >= min_p
                    cand_kept[tx] = T.if_then_else(kept, e, T.float32(-1))
                    T.tvm_storage_sync("shared")
                    if tx == 0:  # the draw, walking the kept candidates in id order
                        acc[1] = T.float32(0)
                        acci[2] = T.int64(-1)
                        for j in range(n):
                            acc[2] = cand_kept[j]
                            if acc[2] >= T.float32(0):
                                acc[1] = acc[1] + acc[2]
                                acci[2] = j
                        target = fp[r, F_UNIFORM] * acc[1]
                        acc[1] = T.float32(0)
                        acci[1] = T.int64(0)  # found
                        for j in range(n):
                            acc[2] = cand_kept[j]
                            if acci[1] == 0 and acc[2] >= T.float32(0):
                                acc[1] = acc[1] + acc[2]
                                if acc[1] > target:
                                    acci[2] = j
                                    acci[1] = T.int64(1)
                        token_of[0] = acci[2]
                    T.tvm_storage_sync("shared")
                    acci[2] = token_of[0]
                    if acci[2] >= 0:  # none kept, only for non-finite scores: the greedy token stays
                        vi[0] = T.if_then_else(full, acci[2], T.Cast("int64", dense[r, acci[2]]))
                elif _searched(top_p, k_on, nc[0], top_p_search):
                    # 3c. the threshold and each block's kept mass come from `search_pass`: the block holding the
                    # draw, then the draw within its candidates (in id order) as in 3b
                    thr = search_i[r, SEARCH_PASSES, 1]
                    if T.Cast("int64", tx) < splits:
                        red[tx] = search_f[r, SEARCH_PASSES, tx, 0]
                    T.tvm_storage_sync("shared")
                    if tx == 0:
                        acc[1] = T.float32(0)
                        for c in range(splits):
                            acc[1] = acc[1] + red[T.Cast("int32", c)]
                        target = fp[r, F_UNIFORM] * acc[1]
                        acc[1] = T.float32(0)  # mass of the blocks before
                        acci[0] = T.int64(-1)  # the chosen block (the last one with mass if rounding finds none)
                        acci[1] = T.int64(0)  # found
                        for c in range(splits):
                            acc[0] = red[T.Cast("int32", c)]
                            if acc[0] > T.float32(0) and acci[1] == 0:
                                acci[0] = T.Cast("int64", c)
                                if acc[1] + acc[0] > target:
                                    acci[1] = T.int64(1)
                                else:
                                    acc[1] = acc[1] + acc[0]
                        chunk_of[0] = T.max(acci[0], T.int64(0))  # none kept only for NaN scores
                        target_in[0] = target - acc[1]
                    T.tvm_storage_sync("shared")
                    acci[0] = chunk_of[0]
                    acc[2] = target_in[0]  # the draw's target within the block
                    n_b = T.Cast("int64", part_i[r, acci[0], 1])
                    base = acci[0] * slice_len
                    chunk = T.ceildiv(n_b, T.int64(NT))
                    acc[0] = T.float32(0)
                    for jj in range(chunk):
                        j = tx * chunk + jj
                        if j < n_b:
                            x = work[r, T.Cast("int64", cand[r, base + j])]
                            e = T.exp(x - vf[0])
                            if _key(x) >= thr and e >= min_p:
                                acc[0] = acc[0] + e
                    red[tx] = acc[0]
                    T.tvm_storage_sync("shared")
                    if tx == 0:
                        acc[1] = T.float32(0)  # mass of the chunks before
                        acci[0] = T.int64(-1)  # the chosen chunk (the last one with mass if rounding finds none)
                        acci[1] = T.int64(0)  # found
                        for c in range(NT):
                            acc[0] = red[c]
                            if acc[0] > T.float32(0) and acci[1] == 0:
                                acci[0] = T.Cast("int64", c)
                                if acc[1] + acc[0] > acc[2]:
                                    acci[1] = T.int64(1)
                                else:
                                    acc[1] = acc[1] + acc[0]
                        chunk_of[0] = T.max(acci[0], T.int64(0))
                        found_in[0] = acci[1]
                        target_in[0] = acc[2] - acc[1]
                    T.tvm_storage_sync("shared")
                    acci[0] = chunk_of[0]
                    acci[1] = found_in[0]
                    acc[1] = target_in[0]
                    if T.Cast("int64", tx) == acci[0]:
                        acc[0] = T.float32(0)
                        acci[2] = T.int64(0)  # stop
                        for jj in range(chunk):
                            j = tx * chunk + jj
                            if j < n_b and acci[2] == 0:
                                c = T.Cast("int64", cand[r, base + j])
                                x = work[r, c]
                                e = T.exp(x - vf[0])
                                if _key(x) >= thr and e >= min_p:
                                    acc[0] = acc[0] + e
                                    vi[0] = c
                                    if acc[0] > acc[1] and acci[1] == 1:
                                        acci[2] = T.int64(1)
                        token_of[0] = vi[0]
                    T.tvm_storage_sync("shared")
                    vi[0] = token_of[0]
                else:
                    # 3b. the thresholds by a key search over the candidates (or all tokens); the candidates' scores
                    # are copied next to them first (cand is free once dense holds the ids): contiguous loads
                    if not full:
                        for it in range(T.ceildiv(n, T.int64(NT))):
                            j = it * NT + tx
                            if j < n:
                                cand[r, j] = T.reinterpret("int32", work[r, T.Cast("int64", dense[r, j])])
                        T.tvm_storage_sync("shared")
                    vi[3] = KEY_MIN
                    vf[2] = vf[1]
                    if k_on:  # top-k threshold: the largest key with at least top_k tokens at or above it
                        vi[1] = KEY_MIN
                        vi[2] = _key(vf[0]) + 1
                        key_search(r, n, full, cand, work, vf, vi, tx, piv, accp, redp, red, sums, False, 0, KEY_MIN,
                                   T.Cast("float32", top_k))
                        vi[3] = vi[1]
                        acc[0] = T.float32(0)
                        for it in range(T.ceildiv(n, T.int64(NT))):
                            j = it * NT + tx
                            if j < n:
                                x = _cand_score(full, work, cand, r, j)
                                if _key(x) >= vi[3]:
                                    acc[0] = acc[0] + T.exp(x - vf[0])
                        red[tx] = acc[0]
                        block_sum(red, tx, NT, _log2(NT))
                        vf[2] = red[0]
                        T.tvm_storage_sync("shared")
                    # top-p threshold: smallest key whose strictly larger (top-k kept) mass is < top_p * Zk
                    vi[1] = vi[3] - 1
                    vi[2] = T.if_then_else(top_p < T.float32(1), _key(vf[0]), vi[3])
                    key_search(r, n, full, cand, work, vf, vi, tx, piv, accp, redp, red, sums,
                               True, 1, vi[3], top_p * vf[2])
                    # the draw in id order: per-thread contiguous chunks; thread 0 finds the chunk, its thread
                    # walks it
                    chunk = T.ceildiv(n, T.int64(NT))
                    thr = T.max(vi[3], vi[2])
                    acc[0] = T.float32(0)
                    for jj in range(chunk):
                        j = tx * chunk + jj
                        if j < n:
                            x = _cand_score(full, work, cand, r, j)
                            e = T.exp(x - vf[0])
                            if _key(x) >= thr and e >= min_p:
                                acc[0] = acc[0] + e
                    red[tx] = acc[0]
                    T.tvm_storage_sync("shared")
                    if tx == 0:
                        acc[1] = T.float32(0)
                        for c in range(NT):
                            acc[1] = acc[1] + red[c]
                        target = fp[r, F_UNIFORM] * acc[1]
                        acc[1] = T.float32(0)  # mass of the chunks before
                        acci[0] = T.int64(-1)  # the chosen chunk (the last one with mass if rounding finds none)
                        acci[1] = T.int64(0)  # found
                        for c in range(NT):
                            acc[0] = red[c]
                            if acc[0] > T.float32(0) and acci[1] == 0:
                                acci[0] = T.Cast("int64", c)
                                if acc[1] + acc[0] > target:
                                    acci[1] = T.int64(1)
                                else:
                                    acc[1] = acc[1] + acc[0]
                        chunk_of[0] = T.max(acci[0], T.int64(0))  # none kept only for non-finite scores
                        found_in[0] = acci[1]
                        target_in[0] = target - acc[1]
                    T.tvm_storage_sync("shared")
                    acci[0] = chunk_of[0]
                    acci[1] = found_in[0]
                    acc[1] = target_in[0]
                    if T.Cast("int64", tx) == acci[0]:
                        acc[0] = T.float32(0)
                        acci[2] = T.int64(0)  # stop
                        for jj in range(chunk):
                            j = tx * chunk + jj
                            if j < n and acci[2] == 0:
                                x = _cand_score(full, work, cand, r, j)
                                e = T.exp(x - vf[0])
                                if _key(x) >= thr and e >= min_p:
                                    acc[0] = acc[0] + e
                                    vi[0] = T.if_then_else(full, j, T.Cast("int64", dense[r, j]))
                                    if acc[0] > acc[1] and acci[1] == 1:
                                        acci[2] = T.int64(1)
                        token_of[0] = vi[0]
                    T.tvm_storage_sync("shared")
                    vi[0] = token_of[0]
            if tx == 0:
                out_tok[r, 0] = T.Cast("int32", vi[0])
                out_lp[r, 0] = T.float32(0)
            if top_n >= 0:
                log_z = vf[0] + T.log(vf[1])
                if tx == 0:
                    out_lp[r, 0] = work[r, vi[0]] - log_z
                # 4. top-n logprobs: n block-argmax rounds below the previous pick (ties: lower id first)
                acc[1] = POS_INF
                acci[1] = T.int64(-1)
                for n_top in range(T.min(top_n, T.int64(MAX_TOP))):
                    acc[0] = NEG_INF
                    acci[0] = T.int64(-1)
                    for it in range(T.ceildiv(vocab, T.int64(NT))):
                        i = it * NT + tx
                        if i < vocab:
                            s = work[r, i]
                            if (s < acc[1] or (s == acc[1] and i > acci[1])) and (acci[0] < 0 or s > acc[0]):
                                acc[0] = s
                                acci[0] = i
                    redi[tx] = _argmax_key(acc[0], acci[0])
                    block_max(redi, tx, NT, _log2(NT))
                    # no token below the previous pick (index -1 everywhere) only for NaN scores: token 0
                    acci[1] = T.if_then_else(redi[0] == T.min_value("int64"), T.int64(0), _argmax_index(redi[0]))
                    T.tvm_storage_sync("shared")
                    acc[1] = work[r, acci[1]]
                    if tx == 0:
                        out_tok[r, n_top + 1] = T.Cast("int32", acci[1])
                        out_lp[r, n_top + 1] = acc[1] - log_z

    return kernel


def top_p_search_enabled() -> bool:
    """Whether GPU libraries get `search_pass` (the multi-block top-p search): TOP_P_SEARCH_ENV=1 / 0, else
    TOP_P_SEARCH_DEFAULT."""
    return compile_switch(TOP_P_SEARCH_ENV, TOP_P_SEARCH_DEFAULT, "the multi-block top-p search")


def add_sampler(mod: tvm.IRModule, target: tvm.target.Target, top_p_search: bool | None = None) -> tvm.IRModule:
    """`mod` plus the relax function `sample_tokens` (symbolic rows and vocabulary); for the target backends with
    `has_sampler` (compile/backend.py). `top_p_search` (GPU targets; default: `top_p_search_enabled()`): the top-p
    threshold of flat rows searched over many blocks per row (`search_pass`) instead of in the select block."""
    gpu = "gpu" in target.keys
    if top_p_search is None:
        top_p_search = top_p_search_enabled()
    kernel = gpu_kernel(top_p_search) if gpu else cpu_kernel()
    bb = relax.BlockBuilder(mod)
    gv = bb.add_func(kernel, "sample_tokens_kernel")
    rows, vocab = tirx.Var("batch_size", "int64"), tirx.Var("vocab_size", "int64")
    nb, npen, nmask, words = (tirx.Var(n, "int64") for n in ("n_bias", "n_penalty", "n_mask", "mask_words"))

    def arg(name, shape, dtype):
        return relax.Var(name, relax.TensorType(shape, dtype))

    args = [arg("logits", [rows, vocab], "float32"), arg("fparams", [rows, F_COLS], "float32"),
            arg("iparams", [rows, I_COLS], "int32"), arg("bias_tokens", [nb], "int32"),
            arg("bias_values", [nb], "float32"), arg("penalty_tokens", [npen], "int32"),
            arg("penalty_counts", [npen], "int32"), arg("bitmask", [nmask, words], "int32")]
    out_types = [relax.TensorType([rows, MAX_TOP + 1], "int32"),
                 relax.TensorType([rows, MAX_TOP + 1], "float32")]
    # workspaces (outputs nobody reads): the CPU's scores and exp(x - max) planes, or the GPU's scores plane
    # and per-block partials; both keep candidate ids
    if gpu:
        out_types += [relax.TensorType([rows, vocab], "float32"), relax.TensorType([rows, vocab], "int32"),
                      relax.TensorType([rows, vocab], "int32"), relax.TensorType([rows, MAX_SPLITS, 2], "float32"),
                      relax.TensorType([rows, MAX_SPLITS, 2], "int32"), relax.TensorType([rows, 2], "float32"),
                      relax.TensorType([rows, SEARCH_PASSES + 1, MAX_SPLITS, PIVOTS], "float32"),
                      relax.TensorType([rows, SEARCH_PASSES + 1, 4], "int64")]
    else:
        out_types += [relax.TensorType([rows, 2, vocab], "float32"), relax.TensorType([rows, vocab], "int32")]
    with bb.function(FUNCTION, args):
        with bb.dataflow():
            out = bb.emit(relax.call_tir(gv, relax.Tuple(args), out_types))
            result = bb.emit_output(relax.Tuple([bb.emit(relax.TupleGetItem(out, 0)),
                                                 bb.emit(relax.TupleGetItem(out, 1))]))
        bb.emit_func_output(result)
    return bb.get()
