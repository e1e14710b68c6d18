"""Vector post-training quantization of one linear layer into VPTQ's tensors (vptq-format.md sections 2-4).

The algorithm follows the VPTQ paper (microsoft/VPTQ, branch `algorithm`), written from scratch:

1. norm (`enable_norm`): each input column is mapped to [0, 1] by its min and range, which become
   `weight_bias` / `weight_scale`, so one codebook serves columns of very different magnitude;
2. perm (`enable_perm`): columns are reordered by decreasing Hessian diagonal (activation energy), so the
   error-feedback pass quantizes the most sensitive columns first and outliers/groups hold similar columns;
3. codebooks: weighted k-means (kmeans.py) over the v-long vectors that run down the output dimension
   (vector i of column c = rows i*v .. i*v+v-1), each weighted by its column's Hessian diagonal times the
   squared norm scale, i.e. by its share of the proxy loss `tr(E H E^T)`; the residual codebook is fit on what
   the main codebook leaves; outlier columns (the first `outlier_size` after perm) get their own codebook;
4. assignment with error feedback (the GPTQ/VPTQ pass): columns are quantized one at a time, main code then
   residual code, and each column's error is spread over the columns not yet quantized through the upper
   Cholesky factor of H^-1, which minimises the proxy loss instead of the plain weight error.

Without a Hessian, H is taken as the identity: the feedback vanishes and this is plain k-means VQ. Codebooks and
norm vectors are rounded to the storage dtype before assignment, so the error feedback sees exactly the values
the checkpoint will hold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from vptq_mlc.checkpoint.layer_config import Variant, VPTQLayerConfig
from vptq_mlc.checkpoint.packing import pack_indices
from vptq_mlc.errors import QuantizeError
from vptq_mlc.quantize.kmeans import KMeansOptions, Searcher, fit_codebook

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearQuantOptions:
    """How to quantize a linear; `variant` gives v, K and Kr, the rest are VPTQ's LayerCfg flags."""

    variant: Variant
    enable_norm: bool = False
    enable_perm: bool = True
    group_num: int = 1
    outlier_size: int = 0  # leading (post-perm) columns coded with the outlier codebook
    outlier_vector_len: int = 4
    outlier_centroids: int = 256
    damp: float = 0.01  # Hessian dampening, a fraction of its mean diagonal
    block_size: int = 128  # columns per lazy error-feedback block
    kmeans: KMeansOptions = field(default_factory=KMeansOptions)
    dtype: torch.dtype = torch.float16  # storage dtype of codebooks and norm vectors


@dataclass
class QuantizedLinear:
    cfg: VPTQLayerConfig
    tensors: dict[str, np.ndarray]  # short names (`centroids.weight`, `indices`, ...), ready for write_checkpoint
    weight: torch.Tensor  # [O, I] float32: the dense weight these tensors encode (before storage rounding)
    proxy_error: float  # tr(E H E^T) / tr(W H W^T) (plain squared error ratio without a Hessian)


@dataclass
class _Part:
    """A run of pre-perm columns sharing one codebook (the outlier block, or one group)."""

    start: int
    stop: int
    v: int
    K: int
    Kr: int
    C: torch.Tensor | None = None
    Cr: torch.Tensor | None = None
    fixed: torch.Tensor | None = None  # [n_cols, N] codes when the codebook holds every distinct vector

    def vectors(self, X: torch.Tensor) -> torch.Tensor:
        """Columns [start, stop) of X [O, I] as vectors [n_cols, N, v] (rows zero-padded to N*v)."""
        cols = X[:, self.start : self.stop]
        O = cols.shape[0]
        pad = (-O) % self.v
        if pad:
            cols = torch.cat([cols, cols.new_zeros(pad, cols.shape[1])])
        return cols.t().reshape(cols.shape[1], -1, self.v)


def layer_config(O: int, I: int, opts: LinearQuantOptions, bias: bool) -> VPTQLayerConfig:
    """The LayerCfg our quantizer produces for an `[O, I]` linear."""
    osz = opts.outlier_size
    return VPTQLayerConfig.from_variant(
        opts.variant,
        in_features=I,
        out_features=O,
        outlier_size=osz,
        outlier_vector_len=opts.outlier_vector_len if osz else -1,
        num_outlier_centroids=opts.outlier_centroids if osz else -1,
        group_num=opts.group_num,
        enable_norm=opts.enable_norm,
        enable_perm=opts.enable_perm,
        is_indice_packed=True,
        bias=bias,
    )


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).to(torch.float32)


def _upper_inv_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp*mean(diag H)*I)^-1 (float64 for stability, returned float32)."""
    Hd = H.to(torch.float64).clone()
    I = Hd.shape[0]
    d = Hd.diagonal()
    lam = damp * float(d.mean()) if float(d.mean()) > 0 else 1.0
    for _attempt in range(6):
        try:
            L = torch.linalg.cholesky(Hd + lam * torch.eye(I, dtype=Hd.dtype, device=Hd.device))
            Hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(Hinv, upper=True).to(torch.float32)
        except RuntimeError:  # not positive definite: dampen harder
            lam *= 10
    raise QuantizeError("the calibration Hessian is not positive definite even after dampening; use more --calib text")


def quantize_linear(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    opts: LinearQuantOptions,
    gen: torch.Generator,
    bias: torch.Tensor | None = None,
    where: str = "",
) -> QuantizedLinear:
    """Quantize `weight [O, I]` (with the input Hessian `X^T X [I, I]`, or None) into VPTQ tensors."""
    dev = weight.device
    W = weight.detach().to(torch.float32)
    O, I = W.shape
    cfg = layer_config(O, I, opts, bias is not None)
    if cfg.enable_perm and I > 65536:
        raise QuantizeError(f"{where}: in_features {I} > 65536 cannot be stored as a packed perm; use --no-perm")

    if hessian is not None:
        H = hessian.detach().to(torch.float32).to(dev).clone()
        diag = H.diagonal().clone()
        dead = diag <= 0
        if bool(dead.any()):  # inputs that never fire: any value is exact for the calibration data
            H[dead, dead] = 1.0
            diag[dead] = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    else:
        H, diag = None, torch.ones(I, device=dev)

    if cfg.enable_norm:
        lo, hi = W.min(0).values, W.max(0).values
        scale = hi - lo
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        scale, shift = _round(scale, opts.dtype), _round(lo, opts.dtype)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    else:
        scale, shift = torch.ones(I, device=dev), torch.zeros(I, device=dev)

    if cfg.enable_perm and H is not None:
        perm = torch.argsort(-diag, stable=True)
    else:
        perm = torch.arange(I, device=dev)
    Wp, sp, bp = W[:, perm], scale[perm], shift[perm]
    col_w = (diag * scale * scale)[perm]  # each column's weight in the proxy loss, in normalized units
    Xn = (Wp - bp) / sp

    parts: list[_Part] = []
    if cfg.has_outliers:
        parts.append(_Part(0, cfg.outlier_size, cfg.outlier_vector_len, cfg.num_outlier_centroids, 0))
    for g in range(cfg.group_num):
        s0 = cfg.outlier_size + g * cfg.group_size
        parts.append(_Part(s0, s0 + cfg.group_size, cfg.vector_len, cfg.num_centroids, cfg.num_res_centroids))

    # codebooks from the (normalized, permuted) original weights
    for p in parts:
        vec = p.vectors(Xn)  # [n, N, v]
        n, N, _ = vec.shape
        flat = vec.reshape(-1, p.v)
        w = col_w[p.start : p.stop].repeat_interleave(N)
        if flat.shape[0] <= 2 * p.K:  # maybe no more distinct vectors than K: store them all, no search needed
            uniq, inv = torch.unique(flat, dim=0, return_inverse=True)
            if uniq.shape[0] <= p.K:
                p.C = _round(uniq[torch.arange(p.K, device=dev) % uniq.shape[0]], opts.dtype)
                p.fixed = inv.reshape(n, N)
                if p.Kr:
                    p.Cr = torch.zeros(p.Kr, p.v, device=dev)
                continue
        p.C = _round(fit_codebook(flat, w, p.K, gen, opts.kmeans), opts.dtype)
        if p.Kr:
            idx0, _ = Searcher(p.C)(flat)
            p.Cr = _round(fit_codebook(flat - p.C[idx0], w, p.Kr, gen, opts.kmeans), opts.dtype)

    if H is None:
        Q, codes, rcodes = _assign_all(Xn, parts)
    else:
        Hp = H[perm][:, perm]
        Q, codes, rcodes = _assign_with_feedback(Wp, sp, bp, Hp, parts, opts)

    Q = Q * sp + bp  # back to weight units (pre-perm order)
    W_hat = torch.empty_like(Q)
    W_hat[:, perm] = Q
    E = W - W_hat
    if H is not None:
        Horig = hessian.to(torch.float32).to(dev)
        num, den = float(((E @ Horig) * E).sum()), float(((W @ Horig) * W).sum())
    else:
        num, den = float((E * E).sum()), float((W * W).sum())
    proxy = num / den if den > 0 else 0.0

    tensors = _pack_tensors(cfg, parts, codes, rcodes, perm, scale, shift, bias, opts.dtype)
    log.debug("%s: proxy error %.4g", where, proxy)
    return QuantizedLinear(cfg=cfg, tensors=tensors, weight=W_hat, proxy_error=proxy)


def _assign_all(Xn: torch.Tensor, parts: list[_Part]) -> tuple[torch.Tensor, dict, dict]:
    """Nearest main (then residual) code for every vector at once: the no-Hessian path."""
    O = Xn.shape[0]
    Q = torch.empty_like(Xn)
    codes: dict[int, torch.Tensor] = {}
    rcodes: dict[int, torch.Tensor] = {}
    for pi, p in enumerate(parts):
        vec = p.vectors(Xn)
        n, N, v = vec.shape
        flat = vec.reshape(-1, v)
        idx = p.fixed.reshape(-1) if p.fixed is not None else Searcher(p.C)(flat)[0]
        q = p.C[idx]
        codes[pi] = idx.reshape(n, N)
        if p.Kr:
            ridx = torch.zeros_like(idx) if p.fixed is not None else Searcher(p.Cr)(flat - q)[0]
            q = q + p.Cr[ridx]
            rcodes[pi] = ridx.reshape(n, N)
        Q[:, p.start : p.stop] = q.reshape(n, N * v)[:, :O].t()
    return Q, codes, rcodes


def _assign_with_feedback(
    Wp: torch.Tensor, sp: torch.Tensor, bp: torch.Tensor, Hp: torch.Tensor, parts: list[_Part], opts: LinearQuantOptions
) -> tuple[torch.Tensor, dict, dict]:
    """Column-by-column assignment with GPTQ-style error feedback (weights in original units, pre-perm order)."""
    O, I = Wp.shape
    U = _upper_inv_cholesky(Hp, opts.damp)
    Wc = Wp.clone()
    Q = torch.empty_like(Wp)
    owner = torch.empty(I, dtype=torch.int64)
    for pi, p in enumerate(parts):
        owner[p.start : p.stop] = pi
    owner_l = owner.tolist()
    search = [Searcher(p.C) if p.fixed is None else None for p in parts]
    rsearch = [Searcher(p.Cr) if p.Kr and p.fixed is None else None for p in parts]
    codes = {pi: torch.empty(p.stop - p.start, -(-O // p.v), dtype=torch.int64) for pi, p in enumerate(parts)}
    rcodes = {pi: torch.empty_like(codes[pi]) for pi, p in enumerate(parts) if p.Kr}
    sp_l, bp_l = sp.tolist(), bp.tolist()
    for b0 in range(0, I, opts.block_size):
        b1 = min(b0 + opts.block_size, I)
        Wb = Wc[:, b0:b1]
        Eb = torch.empty(O, b1 - b0, dtype=Wp.dtype, device=Wp.device)
        Ub = U[b0:b1, b0:b1]
        for k in range(b1 - b0):
            c = b0 + k
            pi = owner_l[c]
            p = parts[pi]
            # the updates from this block's earlier columns, applied lazily (a matvec beats k rank-1 updates)
            w = torch.addmv(Wb[:, k], Eb[:, :k], Ub[:k, k], alpha=-1.0) if k else Wb[:, k]
            xn = (w - bp_l[c]) / sp_l[c]
            pad = (-O) % p.v
            vec = torch.cat([xn, xn.new_zeros(pad)]).view(-1, p.v) if pad else xn.view(-1, p.v)
            # a lossless part keeps its codes: the feedback it receives is fp16 rounding only
            idx = p.fixed[c - p.start] if p.fixed is not None else search[pi](vec)[0]
            q = p.C[idx]
            codes[pi][c - p.start] = idx
            if p.Kr:
                ridx = torch.zeros_like(idx) if p.fixed is not None else rsearch[pi](vec - q)[0]
                q = q + p.Cr[ridx]
                rcodes[pi][c - p.start] = ridx
            qn = q.reshape(-1)[:O]
            Q[:, c] = qn
            Eb[:, k] = (w - (qn * sp_l[c] + bp_l[c])) / Ub[k, k]
        if b1 < I:
            Wc[:, b1:].addmm_(Eb, U[b0:b1, b1:], alpha=-1.0)
    return Q, codes, rcodes


def _pack_tensors(
    cfg: VPTQLayerConfig,
    parts: list[_Part],
    codes: dict[int, torch.Tensor],
    rcodes: dict[int, torch.Tensor],
    perm: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> dict[str, np.ndarray]:
    """The layer's tensors under VPTQ's short names, with the exact dtypes and shapes of vptq-format.md section 2."""
    np_dt = {torch.float16: np.float16, torch.float32: np.float32}.get(dtype)
    if np_dt is None:
        raise QuantizeError(f"storage dtype {dtype} unsupported; use float16 or float32")

    def f(t: torch.Tensor) -> np.ndarray:
        return t.detach().to(dtype).cpu().numpy().astype(np_dt, copy=False)

    out: dict[str, np.ndarray] = {}
    groups = parts[1:] if cfg.has_outliers else parts
    first = 1 if cfg.has_outliers else 0
    idx = np.stack([codes[first + g].t().cpu().numpy() for g in range(len(groups))]).astype(np.int64)  # [G, N, S]
    res = None
    if cfg.has_residual:
        res = np.stack([rcodes[first + g].t().cpu().numpy() for g in range(len(groups))]).astype(np.int64)
    out["centroids.weight"] = np.stack([f(p.C).reshape(-1) for p in groups])
    if cfg.has_residual:
        out["res_centroids.weight"] = np.stack([f(p.Cr).reshape(-1) for p in groups])
    out["indices"] = pack_indices(idx, res, cfg)
    if cfg.has_outliers:
        o = parts[0]
        out["outlier_centroids.weight"] = f(o.C).reshape(1, -1)
        oc = codes[0].t().cpu().numpy().astype(np.uint16)  # [No, osz]
        out["outlier_indices"] = oc[None].view(np.int16)
    if cfg.enable_perm:
        out["perm"] = perm.cpu().numpy().astype(np.uint16).view(np.int16)
    if cfg.enable_norm:
        out["weight_scale"] = f(scale)
        out["weight_bias"] = f(shift)
    if bias is not None:
        out["bias"] = f(bias)
    return out
