"""Canonical forms: depthwise is a conv with groups=C; pad=valid/full become
numbers, and pad=same too where the input sizes are known (with symbolic
sizes its amount depends on the size, so it stays a word until run time)."""
from __future__ import annotations

from ..ir.types import static_value
from ..ops.spatial import resolve_pads

# Ops whose `pad` follows the conv rule (deconv has its own geometry).
_PADDED = {"conv": "kernel", "depthwise": "kernel", "local": "kernel", "tiled": "kernel",
           "maxpool": "window", "avgpool": "window", "lppool": "window", "wavgpool": "window"}


def canonicalize(graph) -> bool:
    changed = False
    for node in graph.nodes():
        if node.op == "depthwise":
            node.op, node.origin = "conv", "depthwise"
            changed = True
        window = _PADDED.get(node.op)
        pad = node.attrs.get("pad")
        if window and isinstance(pad, str):
            sizes = graph.type_of(node.inputs[0]).spatial
            if pad != "same" or all(static_value(s) is not None for s in sizes):
                pads = resolve_pads(pad, sizes, node.attrs[window],
                                    node.attrs["stride"], node.attrs.get("dilation"))
                node.attrs["pad"] = tuple((int(b), int(a)) for b, a in pads)
                changed = True
    return changed
