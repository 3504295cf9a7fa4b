"""Deterministic IR dumps: text (one op per line), Graphviz dot, and JSON."""
from __future__ import annotations

import json
from pathlib import Path

import sympy

from .graph import Graph, Node


def _attr_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_attr_text(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, sympy.Basic):
        return str(value)
    return str(value)


# Bookkeeping a backward op carries for its lowering; `from=` already says it.
_HIDDEN = frozenset({"fattrs", "forward", "input_type", "param_shapes"})


def _attrs(node: Node) -> str:
    return _attr_list(node.op, node.attrs)


def _attr_list(op: str, attrs: dict) -> str:
    parts = []
    for key in attrs:
        value = attrs[key]
        if key in ("type", "name") and op == "_input" or key in _HIDDEN or op == "_fused":
            continue
        if value is None:
            continue
        if key == "table" and value is not None:
            value = f"<{len(value)} rows, {sum(len(r) for r in value)} connections>"
        parts.append(f"{key}={_attr_text(value)}")
    return " ".join(parts)


def _location(node: Node) -> str:
    return f"{Path(node.span.filename).name}:{node.span.line}"


def _op_name(node: Node) -> str:
    if node.op == "_fused":
        return f"fused[{node.attrs['pattern']}]"
    return node.op.lstrip("_")


def _fused_steps(node: Node) -> list[str]:
    """One line per step of a fused node: `s1 = relu(s0)`."""
    lines = []
    for k, step in enumerate(node.attrs["steps"]):
        attrs = _attr_list(step["op"], step["attrs"])
        layer = f" layer={step['layer']}" if step.get("layer") else ""
        lines.append(f"      | s{k} = {step['op'].lstrip('_')}({', '.join(step['operands'])})"
                     + (f" {attrs}" if attrs else "") + layer)
    return lines


def format_node(graph: Graph, node: Node) -> str:
    results = ", ".join(f"%{node.id}" if i == 0 else f"%{node.id}#{i}" for i in range(len(node.types)))
    if node.op == "_input":
        head = f"{results} = input {node.attrs['name']}"
    else:
        args = ", ".join(str(r) for r in node.inputs)
        head = f"{results} = {_op_name(node)}({args})"
        attrs = _attrs(node)
        if attrs:
            head += f" {attrs}"
    if node.layer:
        head += f" layer={node.layer}"
        if node.params:
            head += " params=[" + ", ".join(node.params[r] for r in sorted(node.params)) + "]"
    if node.origin:
        head += f" from={node.origin}"
    types = ", ".join(str(t) for t in node.types)
    name = f"  # {node.binding}" if node.binding and node.op != "_input" else ""
    line = f"  {head} : {types}  @{_location(node)}{name}"
    if node.op == "_fused":
        line = "\n".join([line] + _fused_steps(node))
    return line


def to_text(graph: Graph) -> str:
    inputs = ", ".join(f"{graph.node(i).attrs['name']}: {graph.node(i).types[0]}" for i in graph.inputs)
    lines = [f"net {graph.name}({inputs}) {{"]
    for node in graph.nodes():
        lines.append(format_node(graph, node))
    names = graph.output_names or [None] * len(graph.outputs)
    lines.append("  return " + ", ".join(str(r) + (f" ({n})" if n else "")
                                         for r, n in zip(graph.outputs, names)))
    lines.append("}")
    if graph.params:
        lines.append(f"params ({graph.parameter_count():,} in all):")
        for name in graph.params:
            p = graph.params[name]
            flags = [] if p.trainable else ["frozen"]
            if p.mask is not None:
                flags.append(f"table: {p.count:,} real")
            init = p.init[0] + (f"({', '.join(f'{k}={v}' for k, v in p.init[1].items())})"
                                if p.init[1] else "")
            extra = f" [{', '.join(flags)}]" if flags else ""
            lines.append(f"  {name}: {list(p.shape)} init={init}{extra}")
    return "\n".join(lines) + "\n"


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def to_dot(graph: Graph) -> str:
    lines = [f'digraph "{_dot_escape(graph.name)}" {{', "  rankdir=TB;",
             '  node [shape=box, fontname="monospace", fontsize=10];']
    for node in graph.nodes():
        parts = [_op_name(node) if node.op != "_input" else f"input {node.attrs['name']}"]
        if node.layer:
            parts.append(node.layer)
        parts.append(", ".join(str(t) for t in node.types))
        label = "\\n".join(_dot_escape(p) for p in parts)
        shape = ', shape=ellipse' if node.op == "_input" else ""
        lines.append(f'  n{node.id} [label="{label}"{shape}];')
    for node in graph.nodes():
        for index, ref in enumerate(node.inputs):
            lines.append(f"  n{ref.node} -> n{node.id};")
    for index, ref in enumerate(graph.outputs):
        lines.append(f'  out{index} [label="return {index}", shape=ellipse];')
        lines.append(f"  n{ref.node} -> out{index};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _json_value(value):
    if isinstance(value, sympy.Basic):
        return int(value) if value.is_Integer else str(value)
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if hasattr(value, "to_json"):
        return value.to_json()
    return value


def to_json(graph: Graph) -> str:
    doc = {
        "net": graph.name,
        "inputs": [{"name": graph.node(i).attrs["name"], **graph.node(i).types[0].to_json()}
                   for i in graph.inputs],
        "nodes": [{
            "id": node.id,
            "op": _op_name(node),
            "inputs": [{"node": r.node, "result": r.index} for r in node.inputs],
            "attrs": {k: _json_value(v) for k, v in node.attrs.items()
                      if not (node.op == "_input" and k == "type")},
            "types": [t.to_json() for t in node.types],
            "layer": node.layer,
            "params": dict(sorted(node.params.items())),
            "binding": node.binding,
            "origin": node.origin,
            "source": {"file": node.span.filename, "line": node.span.line,
                       "column": node.span.column},
        } for node in graph.nodes()],
        "outputs": [{"node": r.node, "result": r.index} for r in graph.outputs],
        "params": {name: {"shape": list(p.shape), "trainable": p.trainable, "count": p.count,
                          "init": p.init[0], "layer": p.layer}
                   for name, p in graph.params.items()},
        "parameter_count": graph.parameter_count(),
    }
    return json.dumps(doc, indent=2) + "\n"


FORMATS = {"text": to_text, "dot": to_dot, "json": to_json}
