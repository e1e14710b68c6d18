"""Stacked routed experts: the VQ tensors of a mixture-of-experts layer's routed experts concatenated per projection,
so that one kernel launch can run whichever experts the router picked (the expert's matrix index locates its codes
and codebooks; docs/architectures.md, "Gathered experts").

A layer `P = <prefix>.mlp.experts` whose routed experts `P.<e>.{gate,up,down}_proj` (e = 0..E-1) are all VPTQ layers
gets, instead of the per-expert tensors, `P.gate_up_proj.<suffix>` (2E matrices: expert e's gate at 2e, its up at
2e + 1; when every gate and up share one layer config) or `P.gate_proj` and `P.up_proj` (E matrices each), and
`P.down_proj` (E matrices), each with one layer config for all its matrices. Experts whose configs differ keep the
per-expert tensors (and the model runs every expert densely). Converter and model builder both decide with
`expert_stacks`, from the per-layer configs that mlc-chat-config.json keeps unchanged.

Tensor shapes for M matrices: the generic layout's code and codebook tensors concatenated along their first axis
(`centroids [M*G, K, v]`, `codes [M*N, G*S]`, `outlier_codes [M*No, osz]`, ...: matrix m's group g is row
`m*G + g`), and the per-column / per-row vectors stacked (`perm`, `col_scale`, `weight_bias` `[M, I]`, `bias [M, O]`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vptq_mlc.artifact.vq_layout import Shapes, vq_operand_shapes
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig

_EXPERT = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")
# per-matrix vectors: stacked (a new leading axis); every other tensor is concatenated along its first axis
STACKED_VECTORS = ("perm", "col_scale", "weight_bias", "bias")


@dataclass(frozen=True)
class ExpertStack:
    """One stacked projection: `members[m]` is the per-expert linear path of matrix m; `cfg` is theirs (shared)."""

    path: str  # e.g. model.layers.3.mlp.experts.gate_up_proj
    members: tuple[str, ...]
    cfg: VPTQLayerConfig

    @property
    def matrices(self) -> int:
        return len(self.members)


def expert_stacks(layers: Mapping[str, VPTQLayerConfig]) -> dict[str, ExpertStack]:
    """Stack path -> ExpertStack for every MoE layer whose routed experts can be stacked (module docstring)."""
    found: dict[str, dict[str, dict[int, str]]] = {}
    for path in layers:
        m = _EXPERT.match(path)
        if m:
            found.setdefault(m["prefix"], {}).setdefault(m["proj"], {})[int(m["e"])] = path
    stacks: dict[str, ExpertStack] = {}
    for prefix, projs in found.items():
        if set(projs) != {"gate_proj", "up_proj", "down_proj"}:
            continue
        n = len(projs["gate_proj"])
        if any(sorted(p) != list(range(n)) for p in projs.values()):
            continue
        cols = {name: [projs[name][e] for e in range(n)] for name in projs}
        if any(len({layers[p] for p in paths}) != 1 for paths in cols.values()):
            continue
        if layers[cols["gate_proj"][0]] == layers[cols["up_proj"][0]]:
            gate_up = tuple(p for e in range(n) for p in (cols["gate_proj"][e], cols["up_proj"][e]))
            groups = {"gate_up_proj": gate_up}
        else:
            groups = {"gate_proj": tuple(cols["gate_proj"]), "up_proj": tuple(cols["up_proj"])}
        groups["down_proj"] = tuple(cols["down_proj"])
        for name, members in groups.items():
            stacks[f"{prefix}.{name}"] = ExpertStack(f"{prefix}.{name}", members, layers[members[0]])
    return stacks


def stacked_members(layers: Mapping[str, VPTQLayerConfig]) -> set[str]:
    """The per-expert linear paths that live inside a stack (no tensors of their own in the model dir)."""
    return {p for s in expert_stacks(layers).values() for p in s.members}


def stacked_operand_shapes(cfg: VPTQLayerConfig, matrices: int) -> Shapes:
    """The code/codebook tensors of `matrices` stacked layers of config `cfg`, in call order (`vq_operand_shapes`
    with the first axis times `matrices`)."""
    return {name: ((shape[0] * matrices, *shape[1:]), dt) for name, (shape, dt) in vq_operand_shapes(cfg).items()}


def stack_layouts(layouts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Suffix -> stacked array from the members' generic layouts (`vq_layout.generic_layout`), in matrix order."""
    return {suffix: (np.stack if suffix in STACKED_VECTORS else np.concatenate)([lay[suffix] for lay in layouts])
            for suffix in layouts[0]}
