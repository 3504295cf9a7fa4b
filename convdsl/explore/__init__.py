"""The IR explorer: `convdsl explore FILE -o report.html`.

One self-contained HTML page per net: the source, each line linked to its IR
nodes; the IR after every pass, forward and backward, as text and as a picture;
every generated kernel (inference, training and backward programs) linked to
the nodes it computes, with its analytic cost and, with a target, its
ahead-of-time compile report.

    from convdsl.explore import write_report
    write_report("examples/lenet5.cdsl", "lenet5.html", net="LeNet5", sizes={"N": 8})

collect.py gathers, layout.py draws the graphs, page.py writes the page.
"""
from __future__ import annotations

from pathlib import Path

from .collect import Exploration, explore_net
from .page import render


def explore(source, *, net: str | None = None, sizes: dict[str, int] | None = None,
            target: str | None = None, use_dot: bool | None = None,
            progress: bool | None = None) -> str:
    """The explorer page for one net of `source` (a path or .cdsl text), as HTML text.

    `sizes`: values of the size symbols for the cost model (unset ones: 32).
    `target`: e.g. "sm_90" to compile every kernel ahead of time and show registers,
    spills and shared memory (slow: tens of seconds per net).
    `use_dot`: draw graphs with Graphviz (None: when `dot` is installed)."""
    found = explore_net(source, net=net, sizes=sizes, target=target, progress=progress)
    return render(found, use_dot=use_dot)


def write_report(source, output, **options) -> Exploration:
    """Write the page to `output`; returns what it shows (options as in `explore`)."""
    use_dot = options.pop("use_dot", None)
    found = explore_net(source, **options)
    Path(output).write_text(render(found, use_dot=use_dot), encoding="utf-8")
    return found


__all__ = ["Exploration", "explore", "write_report"]
