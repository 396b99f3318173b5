"""Hookpoint names: ``<kind>.<layer>`` where kind says which tensor of block ``layer`` to read.

- ``resid_pre.L``: the residual stream entering block L (the block's input).
- ``resid_post.L``: the residual stream leaving block L (the block's output).
- ``attn_out.L`` / ``mlp_out.L``: what the attention / MLP sublayer of block L adds to the
  residual stream. In post-norm encoders (BERT) that is the sublayer's output projection,
  before its dropout, residual add and LayerNorm.
"""

from __future__ import annotations

from typing import NamedTuple

from sasa.errors import SasaError

KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out")


class Hookpoint(NamedTuple):
    kind: str
    layer: int

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.layer}"

    @property
    def stop_point(self) -> tuple[int, int]:
        """Where the forward may stop once this tensor is captured: (block, 0) on entering the
        block for ``resid_pre``, (block, 1) after the block for the others. Comparable."""
        return (self.layer, 0 if self.kind == "resid_pre" else 1)


def parse_hookpoint(name: str) -> Hookpoint:
    kind, _, layer = str(name).strip().rpartition(".")
    if kind not in KINDS or not layer.isdigit():
        raise SasaError(f"bad hookpoint {name!r}; write KIND.LAYER with KIND one of "
                        f"{', '.join(KINDS)} (e.g. resid_post.3)")
    return Hookpoint(kind, int(layer))
