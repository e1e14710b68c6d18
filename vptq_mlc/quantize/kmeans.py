"""Weighted k-means for VPTQ codebooks, vectorised in torch (CPU or GPU).

Points are the `v`-long weight vectors of one layer (one group), each with a weight: its column's Hessian
diagonal times the squared norm scale, so that minimising `sum w * |x - c|^2` minimises the layer's proxy loss.
Seeding is k-means++ (D^2 sampling); it draws `ceil(K/16)` seeds per round instead of one (Gumbel
top-k), which costs about one Lloyd pass and keeps 65536-centroid codebooks practical on a CPU. Lloyd iterations then
move every centroid to the weighted mean of its points; an emptied cluster is re-seeded at the point with the
largest weighted error. Fitting subsamples the points when there are many more than centroids.

With fewer than 2 (8) points per centroid, Lloyd is skipped (capped at 2 iterations): the seeds are data
points already, and each iteration would cost a full search. When a group has no more distinct vectors than
K (a 576x192 layer has 13824 vectors of length 8, fewer than a 65536-entry codebook) the codebook simply
holds every distinct vector: quantization is then lossless.
Everything draws from one `torch.Generator`, so a seed fixes the result.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from vptq_mlc.quantize import nn_kernel

log = logging.getLogger(__name__)

CHUNK_ELEMS = 1 << 24  # distance-matrix elements per chunk (64 MiB of fp32)


@dataclass(frozen=True)
class KMeansOptions:
    iters: int = 8  # Lloyd iterations after seeding
    points_per_centroid: int = 24  # fit on at most max(K * this, min_fit_points) points
    min_fit_points: int = 32768
    tol: float = 1e-4  # stop when the weighted inertia improves by less than this fraction
    seeds_per_round_div: int = 16  # k-means++ draws ceil(K / this) seeds per round


class Searcher:
    """Exact nearest-row search in a fixed codebook `C [K, v]`: the C kernel on CPU, chunked matmuls otherwise."""

    def __init__(self, C: torch.Tensor) -> None:
        self.C = C.float()
        self._index = nn_kernel.CodebookIndex(self.C) if C.device.type == "cpu" and nn_kernel.available() else None
        self._c_sq = None if self._index is not None else (self.C * self.C).sum(1)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index int64 [M], squared distance [M]) of the nearest codebook row for each row of `x [M, v]`."""
        if self._index is not None:
            return self._index.search(x)
        x = x.float()
        K = self.C.shape[0]
        M = x.shape[0]
        idx = torch.empty(M, dtype=torch.int64, device=x.device)
        d2 = torch.empty(M, dtype=x.dtype, device=x.device)
        step = max(1, CHUNK_ELEMS // max(K, 1))
        Ct = self.C.t()
        for s in range(0, M, step):
            xs = x[s : s + step]
            val, arg = torch.addmm(self._c_sq, xs, Ct, beta=1.0, alpha=-2.0).min(dim=1)  # |c|^2 - 2 x.c
            idx[s : s + step] = arg
            d2[s : s + step] = (val + (xs * xs).sum(1)).clamp_min_(0)
        return idx, d2


def nearest(x: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest row of `C [K, v]` for each row of `x [M, v]`, and the squared distance to it."""
    return Searcher(C)(x)


def _sq_dist_to(x: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """min over rows of C of |x - c|^2, for each row of x."""
    return nearest(x, C)[1]


def _sample(p: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n distinct indices drawn with probability proportional to p (Gumbel top-k; p on any device)."""
    u = torch.rand(p.shape[0], generator=gen).to(p.device).clamp_(1e-20, 1.0)
    keys = torch.log(p.clamp_min(0)) - torch.log(-torch.log(u))
    return torch.topk(keys, n).indices


def kmeans_pp(x: torch.Tensor, w: torch.Tensor, K: int, gen: torch.Generator, div: int = 16) -> torch.Tensor:
    """K seeds by weighted D^2 sampling, `ceil(K/div)` per round (the generator lives on the CPU)."""
    chosen = [x[_sample(w, 1, gen)]]
    d2 = _sq_dist_to(x, chosen[0])
    n = 1
    per_round = max(1, math.ceil(K / div))
    while n < K:
        p = w * d2
        nz = int((p > 0).sum())
        if nz == 0:  # fewer distinct points than K: pad below
            break
        b = min(per_round, K - n, nz)
        new = x[_sample(p, b, gen)]
        chosen.append(new)
        d2 = torch.minimum(d2, _sq_dist_to(x, new))
        n += b
    C = torch.cat(chosen)
    if C.shape[0] < K:
        C = torch.cat([C, C[torch.arange(K - C.shape[0], device=C.device) % C.shape[0]]])
    return C[:K].clone()


def lloyd(
    x: torch.Tensor, w: torch.Tensor, C: torch.Tensor, iters: int, tol: float = 1e-4
) -> tuple[torch.Tensor, float]:
    """Weighted Lloyd iterations from `C`; returns the centroids and the final weighted inertia."""
    K, v = C.shape
    prev = math.inf
    inertia = math.inf
    for it in range(iters):
        idx, d2 = nearest(x, C)
        inertia = float((w * d2).sum())
        if prev < math.inf and prev - inertia <= tol * prev:
            break
        prev = inertia
        sums = torch.zeros(K, v, dtype=x.dtype, device=x.device).index_add_(0, idx, x * w[:, None])
        cnt = torch.zeros(K, dtype=x.dtype, device=x.device).index_add_(0, idx, w)
        empty = cnt <= 0
        C = torch.where(empty[:, None], C, sums / cnt.clamp_min(1e-30)[:, None])
        n_empty = int(empty.sum())
        if n_empty:  # re-seed at the points that are worst served now
            worst = torch.topk(w * d2, min(n_empty, x.shape[0])).indices
            C[empty.nonzero().squeeze(1)[: worst.numel()]] = x[worst]
        log.debug("lloyd it %d: inertia %.6g, %d empty", it, inertia, n_empty)
    return C, inertia


def fit_codebook(
    x: torch.Tensor, w: torch.Tensor, K: int, gen: torch.Generator, opts: KMeansOptions = KMeansOptions()
) -> torch.Tensor:
    """A `[K, v]` codebook for points `x [M, v]` with weights `w [M]` (see module docstring)."""
    x = x.float()
    w = w.float().clamp_min(1e-12)
    M = x.shape[0]
    if M <= 2 * K:  # maybe no more distinct vectors than centroids: then keep them all (lossless)
        uniq = torch.unique(x, dim=0)
        if uniq.shape[0] <= K:
            reps = torch.arange(K, device=x.device) % uniq.shape[0]
            return uniq[reps].clone()
    fit_n = max(K * opts.points_per_centroid, opts.min_fit_points)
    if M > fit_n:
        sel = torch.randperm(M, generator=gen, device="cpu")[:fit_n].to(x.device)
        xs, ws = x[sel], w[sel]
    else:
        xs, ws = x, w
    C = kmeans_pp(xs, ws, K, gen, opts.seeds_per_round_div)
    # With few points per centroid the D^2 seeds already sit on the data (most points are seeds themselves);
    # Lloyd passes then cost a full search each and barely move anything (SmolLM2's MLP at K = 65536: 1.7).
    ratio = xs.shape[0] / K
    iters = 0 if ratio < 2 else min(opts.iters, 2) if ratio < 8 else opts.iters
    C, inertia = lloyd(xs, ws, C, iters, opts.tol)
    log.debug("k-means K=%d on %d of %d points: inertia %.6g", K, xs.shape[0], M, inertia)
    return C
