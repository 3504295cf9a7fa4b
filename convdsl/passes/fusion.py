"""Fusion passes: ops that one kernel can compute together become one `_fused`
node (ops/fused.py), so the values between them never reach global memory.

- fuse-epilogue: conv / deconv / dense / local / tiled (and, in a backward
  graph, a pooling gradient) absorb the elementwise ops that follow —
  activations, `+ residual`, scalar arithmetic.
- fuse-depthwise-pointwise: a depthwise conv (with its epilogue) feeding a
  1×1 conv becomes one kernel; the depthwise result stays in registers.
- fuse-pooling: conv (with its epilogue) feeding a pooling op becomes one
  kernel that computes each pooling window's conv outputs on chip.

A node is absorbed only when the value between is read by that one node and
is not a net output, and the merged kernel stays one that a family computes
(see ops/fused.py, `_triton`).
"""
from __future__ import annotations

from ..ir import Graph, Node, ValueRef
from ..ops.conv import conv_family
from ..ops.fused import ANCHORS, FUSED, POOLS, pattern

ACTIVATIONS = ("relu", "sigmoid", "tanh", "leaky_relu", "elu", "softplus", "identity")
EPILOGUE_OPS = ACTIVATIONS + ("_add", "_sub", "_scalar")
# Gradients of activations: the epilogue of an input gradient in a backward graph.
GRADIENT_EPILOGUE = tuple(f"_{a}_dx" for a in ACTIVATIONS if a != "identity")
# Backward ops whose kernels can apply such an epilogue: the gradient flowing
# into a layer's input meets the previous layer's activation derivative there.
GRADIENT_ANCHORS = ("_pool_dx", "_conv_dx", "_dense_dx")
# Pool fusion recomputes the conv outputs that overlapping windows share: at
# most this many conv evaluations per conv output (3×3 windows at stride 2: 2.25).
MAX_RECOMPUTE = 2.25


def steps_of(node: Node) -> list[dict]:
    """A node as fused steps: a fused node's own, or one step for a plain node."""
    if node.op == FUSED:
        return [dict(s) for s in node.attrs["steps"]]
    return [{"op": node.op, "attrs": node.attrs,
             "operands": tuple(f"in{i}" for i in range(len(node.inputs))),
             "layer": node.layer, "binding": node.binding}]


def anchor_op(node: Node) -> str:
    return steps_of(node)[0]["op"]


def _single_user(graph: Graph, node: Node) -> Node | None:
    """The one node reading `node`'s value, if the value is read by exactly one
    node and is not a net output (then it may stay on chip)."""
    ref = ValueRef(node.id, 0)
    if ref in graph.output_set():
        return None
    users = [u for u in graph.users(node.id) if ref in u.inputs]
    if len(users) != 1 or any(ValueRef(node.id, k) in u.inputs
                              for u in graph.users(node.id) for k in range(1, len(node.types))):
        return None
    return users[0]


def absorb(graph: Graph, node: Node, *users: Node) -> None:
    """Make `node` compute `users` too (a chain: each user reads the value of
    `node` or of the user before it): `node` becomes (or grows) a fused node,
    keeps its id, and takes over the last user's readers; the users are removed.

    Linear in the steps: the existing steps are copied once, and the result
    types come from the nodes' own types (each user's inputs are unchanged, so
    its types still hold); no shape rule re-runs over the whole chain."""
    steps = steps_of(node)
    spans = _step_spans(node, 0)
    params = _step_params(node, 0)
    inputs = list(node.inputs)
    position = {ref: i for i, ref in enumerate(inputs)}
    # The value of step k is result 1 + k of the fused node, the last one result 0.
    values = list(node.types[1:]) if node.op == FUSED else []
    chain = {ValueRef(node.id, 0): len(steps) - 1}  # a value made inside → its step
    last_type = node.types[0]

    def operand(ref: ValueRef) -> str:
        if ref in chain:
            return f"s{chain[ref]}"
        if ref not in position:
            position[ref] = len(inputs)
            inputs.append(ref)
        return f"in{position[ref]}"

    for user in users:
        first = len(steps)
        user_inputs = [operand(r) for r in user.inputs]
        for step in steps_of(user):
            renamed = tuple(user_inputs[int(o[2:])] if o.startswith("in")
                            else f"s{int(o[1:]) + first}" for o in step["operands"])
            steps.append(dict(step, operands=renamed))
        spans.update(_step_spans(user, first))
        params.update(_step_params(user, first))
        own = user.types if user.op == FUSED else user.types[:1]
        values += [last_type, *own[1:]]
        last_type = own[0]
        chain[ValueRef(user.id, 0)] = len(steps) - 1
        node.binding = user.binding or node.binding

    node.op, node.inputs = FUSED, inputs
    node.attrs = {"pattern": pattern(steps), "steps": tuple(steps)}
    node.params, node.arg_spans = params, spans
    node.types = [last_type, *values]
    graph.rewire(node)
    for user in users:
        graph.replace_uses(ValueRef(user.id, 0), ValueRef(node.id, 0))
        graph.remove(user.id)


def _step_spans(node: Node, offset: int) -> dict:
    if node.op == FUSED:
        found = {}
        for key, span in node.arg_spans.items():
            head, _, rest = key.partition(".")
            k = int(head[4:]) + offset
            found[f"step{k}" + (f".{rest}" if rest else "")] = span
        return found
    found = {f"step{offset}": node.span}
    found.update({f"step{offset}.{arg}": span for arg, span in node.arg_spans.items()})
    return found


def _step_params(node: Node, offset: int) -> dict:
    if node.op == FUSED:
        found = {}
        for role, name in node.params.items():
            k, _, rest = role.partition(".")
            found[f"{int(k) + offset}.{rest}"] = name
        return found
    return {f"{offset}.{role}": name for role, name in node.params.items()}


# -- the passes ------------------------------------------------------------------------------

def _is_epilogue_anchor(node: Node) -> bool:
    steps = steps_of(node)
    return steps[0]["op"] in ANCHORS and steps[-1]["op"] not in POOLS


def _epilogue_user(graph: Graph, head: Node, end: Node) -> Node | None:
    """The node that may join the epilogue of `head`, whose chain of absorbable
    users so far ends at `end` (`head` itself when there are none yet)."""
    user = _single_user(graph, end)
    if user is None or user.types[0].dtype != end.types[0].dtype:
        return None
    if anchor_op(head) in GRADIENT_ANCHORS:
        # an input gradient, then the activation's derivative at the same positions.
        ok = user.op in GRADIENT_EPILOGUE and user.inputs[0] == ValueRef(end.id, 0)
        return user if ok else None
    if user.op not in EPILOGUE_OPS:
        return None
    # A residual operand must come from earlier in the program: the fused node
    # then keeps its place (head's), and layers are still checked in source order.
    if any(r.node > head.id for r in user.inputs if r != ValueRef(end.id, 0)):
        return None
    return user


def _epilogue_chain(graph: Graph, head: Node) -> list[Node]:
    """Every node the epilogue of `head` can absorb, in order. Collected first
    and absorbed at once, so a chain of n ops fuses in O(n), not O(n^2)."""
    chain = [head]
    while (user := _epilogue_user(graph, head, chain[-1])) is not None:
        chain.append(user)
    return chain[1:]


def fuse_epilogue(graph: Graph) -> bool:
    changed = False
    for node in list(graph.nodes()):
        if node.id not in graph or node.op not in ANCHORS + (FUSED,):
            continue
        if not _is_epilogue_anchor(node):
            continue
        if chain := _epilogue_chain(graph, node):
            absorb(graph, node, *chain)
            changed = True
    return changed


def _is_depthwise(step: dict, channels) -> bool:
    a = step["attrs"]
    return (step["op"] == "conv" and not a["separable"] and a["table"] is None
            and a["groups"] > 1 and a["groups"] == channels)


def _is_pointwise(step: dict) -> bool:
    a = step["attrs"]
    return (step["op"] == "conv" and not a["separable"] and a["table"] is None
            and a["groups"] == 1 and all(k == 1 for k in a["kernel"])
            and all(s == 1 for s in a["stride"]) and not isinstance(a["pad"], str)
            and all(tuple(p) == (0, 0) for p in a["pad"]))


def _plain_epilogue(steps: list[dict]) -> bool:
    """Only one-operand elementwise steps after the anchor (no residual)."""
    return all(s["op"] in EPILOGUE_OPS and len(s["operands"]) == 1 for s in steps[1:])


def fuse_depthwise_pointwise(graph: Graph) -> bool:
    changed = False
    for node in list(graph.nodes()):
        if node.id not in graph or node.op not in ("conv", FUSED):
            continue
        steps = steps_of(node)
        channels = graph.type_of(node.inputs[0]).channels
        if not (_is_depthwise(steps[0], channels) and _plain_epilogue(steps)):
            continue
        user = _single_user(graph, node)
        if user is None or user.op not in ("conv", FUSED) or user.inputs[0] != ValueRef(node.id, 0):
            continue
        user_steps = steps_of(user)
        if _is_pointwise(user_steps[0]) and _plain_epilogue(user_steps):
            absorb(graph, node, user)
            changed = True
    return changed


def pool_recompute(pool_attrs: dict) -> float:
    """Conv evaluations per conv output when each pooling window computes its own."""
    window, stride = pool_attrs["window"], pool_attrs["stride"]
    factor = 1.0
    for w, s in zip(window, stride):
        factor *= max(1.0, w / s)
    return factor


def fuse_pooling(graph: Graph) -> bool:
    changed = False
    for node in list(graph.nodes()):
        if node.id not in graph or node.op not in ("conv", FUSED):
            continue
        steps = steps_of(node)
        x_type = graph.type_of(node.inputs[0])
        if steps[0]["op"] != "conv" or not _plain_epilogue(steps):
            continue
        if conv_family(steps[0]["attrs"], [x_type]) != "conv":
            continue  # implicit-GEMM convs only
        user = _single_user(graph, node)
        if user is None or user.op not in POOLS or "output" in user.attrs:
            continue
        if pool_recompute(user.attrs) > MAX_RECOMPUTE:
            continue
        absorb(graph, node, user)
        changed = True
    return changed


def fuse_backward_epilogue(graph: Graph) -> bool:
    """In a backward graph: an input gradient (of pooling, a conv, a dense
    layer) absorbs the activation derivative that follows it — max routing
    and relu' in one kernel; dx of a conv and the previous layer's relu'."""
    changed = False
    for node in list(graph.nodes()):
        if node.id not in graph or node.op not in GRADIENT_ANCHORS:
            continue
        if chain := _epilogue_chain(graph, node):
            absorb(graph, node, *chain)
            changed = True
    return changed


__all__ = [
    "absorb",
    "fuse_backward_epilogue",
    "fuse_depthwise_pointwise",
    "fuse_epilogue",
    "fuse_pooling",
    "steps_of",
]
