"""The explorer's page: one self-contained HTML file (inline CSS, script and SVG;
nothing fetched from the network), rendered with Jinja's autoescaping so no
text from the .cdsl file (comments, strings, the file name) can become markup.

Linking: every source line is an element `L<line>`; everything tied to source
lines (IR printout lines, graph nodes, kernels) carries `data-lines`, and
everything tied to IR nodes carries `data-keys` (collect.node_key: the same node
in every stage, and the kernels that compute it). page.js does the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import jinja2

from .collect import (
    Exploration,
    Stage,
    is_continuation,
    node_key,
    node_lines,
    op_label,
    text_node_id,
)
from .layout import NodeLinks, graph_svg


@dataclass
class TextLine:
    """One line of an IR printout, and the node it belongs to (if any)."""

    text: str
    element_id: str | None = None
    keys: str = ""
    lines: str = ""


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["count"] = _count
    return env


def _count(value, unit: str) -> str:
    """1234567 → '1.23 M' + unit; None → '—'."""
    if value is None:
        return "—"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value} {unit}"


def _links(stage: Stage) -> dict[int, tuple[str, str]]:
    """node id → (keys, lines) for one stage's nodes."""
    found = {}
    for node in stage.graph.nodes():
        found[node.id] = (node_key(stage.direction, node.id),
                          " ".join(str(n) for n in node_lines(node)))
    return found


def _text_lines(stage: Stage, links: dict[int, tuple[str, str]]) -> list[TextLine]:
    """The printout line by line; a node's line, and the continuation lines under it
    (a fused node's steps), link to that node."""
    out, current = [], None
    for line in stage.text.splitlines():
        node_id = text_node_id(line)
        if node_id is not None or not is_continuation(line):
            current = node_id if node_id in links else None
        if current is None:
            out.append(TextLine(line))
            continue
        keys, lines = links[current]
        element = f"s{stage.index}t{current}" if node_id is not None else None
        out.append(TextLine(line, element, keys, lines))
    return out


def _stage_view(stage: Stage, use_dot: bool | None) -> dict:
    links = _links(stage)
    svg_links = {n: NodeLinks(f"s{stage.index}g{n}", keys, lines)
                 for n, (keys, lines) in links.items()}
    return {"stage": stage, "lines": _text_lines(stage, links),
            "svg": graph_svg(stage.graph, svg_links, f"s{stage.index}", use_dot),
            "nodes": len(links)}


def _kernel_rows(found: Exploration) -> tuple[list[dict], list[dict]]:
    """(table rows grouped by program, one listing per distinct generated source)."""
    programs: dict[str, list[dict]] = {}
    listings: dict[str, dict] = {}
    graphs = {s.direction: s.graph for s in found.stages}  # the last stage of each direction
    for index, kernel in enumerate(found.kernels):
        graph = graphs[kernel.direction]
        nodes = [graph.node(n) for n in kernel.nodes if n in graph]
        keys = " ".join(node_key(kernel.direction, n) for n in kernel.nodes)
        lines = " ".join(str(n) for n in sorted({line for node in nodes
                                                 for line in node_lines(node)}))
        intensity = (kernel.flops / kernel.bytes
                     if kernel.flops is not None and kernel.bytes else None)
        row = {"id": f"k{index}", "kernel": kernel, "node_keys": keys, "lines": lines,
               "ops": ", ".join(f"%{node.id} {op_label(node)}" for node in nodes),
               "intensity": intensity}
        programs.setdefault(kernel.program, []).append(row)
        if kernel.source:
            listing = listings.setdefault(kernel.source_id, {
                "id": kernel.source_id, "names": [], "source": kernel.source,
                "node_keys": set(), "lines": set(), "family": kernel.family})
            if kernel.name not in listing["names"]:
                listing["names"].append(kernel.name)
            listing["node_keys"].update(keys.split())
            listing["lines"].update(lines.split())
    for listing in listings.values():
        listing["node_keys"] = " ".join(sorted(listing["node_keys"]))
        listing["lines"] = " ".join(sorted(listing["lines"], key=int))
    groups = [{"program": name, "rows": rows,
               "flops": sum(r["kernel"].flops or 0 for r in rows),
               "bytes": sum(r["kernel"].bytes or 0 for r in rows)}
              for name, rows in programs.items()]
    return groups, list(listings.values())


def _source_lines(found: Exploration) -> list[dict]:
    linked: set[int] = set()
    for stage in found.stages:
        for node in stage.graph.nodes():
            linked.update(node_lines(node))
    return [{"number": number, "text": text, "linked": number in linked}
            for number, text in enumerate(found.source.splitlines(), start=1)]


def render(found: Exploration, use_dot: bool | None = None) -> str:
    """The whole page as text. `use_dot` as in layout.graph_svg."""
    groups, listings = _kernel_rows(found)
    template = _environment().from_string(_asset("page.html.jinja"))
    return template.render(
        found=found, source_lines=_source_lines(found),
        stages=[_stage_view(s, use_dot) for s in found.stages],
        groups=groups, listings=listings, has_aot=found.target is not None,
        style=_asset("page.css"), script=_asset("page.js"))
