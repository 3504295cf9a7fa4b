"""An IR graph as inline SVG: Graphviz `dot` when it is installed, else a simple
layered drawing in pure Python, so the explorer always has a picture.

Every op becomes an SVG `<g>` with `id`, `class="irnode"`, `data-keys` and
`data-lines`, which is what the page's script links to the source and kernels.
"""
from __future__ import annotations

import html
import re
import shutil
import subprocess
from dataclasses import dataclass

from ..ir.printer import to_dot
from .collect import op_label

DOT_TIMEOUT_S = 30

# Sizes in SVG user units (px) of the pure-Python drawing.
CHAR_W, LINE_H, PAD, GAP_X, GAP_Y = 7.0, 14, 6, 18, 42


@dataclass(frozen=True)
class NodeLinks:
    """What the page needs on a node's picture."""

    element_id: str
    keys: str  # space-separated node keys (collect.node_key)
    lines: str  # space-separated source lines


def graph_svg(graph, links: dict[int, NodeLinks], prefix: str,
              use_dot: bool | None = None) -> str:
    """The graph as an `<svg>` element (text, no XML prolog); `prefix` keeps its own
    element ids unique on a page with several pictures. `use_dot=None` uses Graphviz
    when `dot` is on PATH; False forces the pure-Python drawing."""
    if use_dot is None:
        use_dot = shutil.which("dot") is not None
    if use_dot:
        svg = _dot_svg(graph, links, prefix)
        if svg is not None:
            return svg
    return layered_svg(graph, links, f"{prefix}arrow")


# -- Graphviz ------------------------------------------------------------------------------

_DOT_NODE = re.compile(r'^(\s*)n(\d+) \[', re.MULTILINE)
_SVG_GROUP = re.compile(r'<g id="([^"]+)" class="node">')
_DOT_OWN_ID = re.compile(r'id="((?:graph|node|edge|clust|a_)\w*)"')  # Graphviz's numbering


def _dot_svg(graph, links: dict[int, NodeLinks], prefix: str) -> str | None:
    """Render the printer's dot text with ids on the nodes; None if dot fails."""
    def tag(match: re.Match) -> str:
        node_id = int(match.group(2))
        link = links.get(node_id)
        extra = f'id="{link.element_id}", ' if link else ""
        return f"{match.group(1)}n{node_id} [{extra}"

    dot_text = _DOT_NODE.sub(tag, to_dot(graph))
    try:
        done = subprocess.run([shutil.which("dot") or "dot", "-Tsvg"], input=dot_text,
                              capture_output=True, text=True, timeout=DOT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0 or "<svg" not in done.stdout:
        return None
    svg = done.stdout[done.stdout.index("<svg"):]  # drop the XML prolog and doctype
    by_element = {link.element_id: link for link in links.values()}

    def annotate(match: re.Match) -> str:
        link = by_element.get(match.group(1))
        if link is None:
            return match.group(0)
        return (f'<g id="{link.element_id}" class="node irnode" '
                f'data-keys="{link.keys}" data-lines="{link.lines}">')

    svg = _DOT_OWN_ID.sub(lambda m: f'id="{prefix}{m.group(1)}"', svg)
    return _SVG_GROUP.sub(annotate, svg)


# -- the pure-Python drawing ---------------------------------------------------------------

def _label(graph, node) -> list[str]:
    """The same facts the dot printout shows: op (or input name), layer, types."""
    head = f"input {node.attrs['name']}" if node.op == "_input" else op_label(node)
    lines = [head]
    if node.layer:
        lines.append(node.layer)
    lines.append(", ".join(str(t) for t in node.types))
    return lines


def _layers(graph) -> list[list[int]]:
    """Nodes by longest distance from an input, each layer ordered to follow the
    average position of its operands (one barycenter sweep: fewer crossings)."""
    depth: dict[int, int] = {}
    for node in graph.nodes():  # topological order
        depth[node.id] = 1 + max((depth[r.node] for r in node.inputs), default=-1)
    layers: list[list[int]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for node_id in sorted(depth):
        layers[depth[node_id]].append(node_id)
    position: dict[int, float] = {}
    for layer in layers:
        def centre(node_id: int) -> float:
            refs = [position[r.node] for r in graph.node(node_id).inputs if r.node in position]
            return sum(refs) / len(refs) if refs else float(node_id)
        layer.sort(key=lambda n: (centre(n), n))
        for rank, node_id in enumerate(layer):
            position[node_id] = rank
    return layers


def layered_svg(graph, links: dict[int, NodeLinks], marker_id: str) -> str:
    """Boxes in layers from the inputs down, edges as curves with arrowheads."""
    layers = _layers(graph)
    labels = {n.id: _label(graph, n) for n in graph.nodes()}
    size = {n: (max(len(s) for s in lines) * CHAR_W + 2 * PAD, len(lines) * LINE_H + 2 * PAD)
            for n, lines in labels.items()}
    widths = [sum(size[n][0] for n in layer) + GAP_X * (len(layer) - 1) for layer in layers]
    total_w = max(widths, default=0) + 2 * GAP_X
    boxes: dict[int, tuple[float, float, float, float]] = {}
    y = GAP_X
    for layer, width in zip(layers, widths):
        x = (total_w - width) / 2
        height = max(size[n][1] for n in layer)
        for node_id in layer:
            w, h = size[node_id]
            boxes[node_id] = (x, y + (height - h) / 2, w, h)
            x += w + GAP_X
        y += height + GAP_Y
    total_h = y - GAP_Y + GAP_X
    outputs = {ref.node for ref in graph.outputs}
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" class="irgraph" '
              f'viewBox="0 0 {total_w:.0f} {total_h:.0f}" width="{total_w:.0f}" '
              f'height="{total_h:.0f}" font-family="monospace" font-size="11">'),
             (f'<defs><marker id="{marker_id}" viewBox="0 0 10 10" refX="10" refY="5" '
              'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
              '<path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>')]
    for node in graph.nodes():
        x1, y1, w1, _ = boxes[node.id]
        for ref in dict.fromkeys(node.inputs):  # an operand used twice: one edge
            x0, y0, w0, h0 = boxes[ref.node]
            sx, sy, tx, ty = x0 + w0 / 2, y0 + h0, x1 + w1 / 2, y1
            bend = (ty - sy) / 2
            parts.append(f'<path class="edge" d="M{sx:.1f},{sy:.1f} C{sx:.1f},{sy + bend:.1f} '
                         f'{tx:.1f},{ty - bend:.1f} {tx:.1f},{ty:.1f}" fill="none" '
                         f'stroke="#555" marker-end="url(#{marker_id})"/>')
    for node in graph.nodes():
        x, y, w, h = boxes[node.id]
        link = links.get(node.id)
        attrs = (f' id="{link.element_id}" data-keys="{link.keys}" data-lines="{link.lines}"'
                 if link else "")
        shape = ("ellipse" if node.op == "_input" else "box") + (" output" if node.id in outputs
                                                                 else "")
        parts.append(f'<g class="irnode {shape}"{attrs}>')
        radius = h / 2 if node.op == "_input" else 3
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" '
                     f'rx="{radius:.1f}" fill="#fff" stroke="#333"/>')
        for index, text in enumerate(labels[node.id]):
            parts.append(f'<text x="{x + w / 2:.1f}" y="{y + PAD + (index + 0.8) * LINE_H:.1f}" '
                         f'text-anchor="middle">{html.escape(text)}</text>')
        parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts)
