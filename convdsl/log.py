"""What each stage did, on stderr, when asked for — like PyTorch's TORCH_LOGS.

    CONVDSL_LOG=passes,kernels python train.py      # or CONVDSL_LOG=all

prints lines such as `[convdsl:kernels] forward k0_conv_relu: family conv, nodes ...`.
Logging is off by default. The variable is read on every call (tests and
notebooks may change it at any time); parsing is cached per value, so an
unknown topic is reported once, not on every call.

Stages log through `enabled(topic)` and `emit(topic, message)`; `message` may
be a zero-argument callable, so text that is costly to build is only built
when its topic is on.
"""
from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

ENV_VAR = "CONVDSL_LOG"

TOPICS = {
    "passes": "each IR pass that ran and what it changed",
    "kernels": "each kernel plan lowered: its name, family and IR nodes",
    "autotune": "each autotuning trial and the configuration it picked",
    "cache": "kernel cache hits, misses and writes, with their paths",
}
ALL = "all"


@functools.lru_cache(maxsize=16)
def _parse(value: str) -> frozenset[str]:
    wanted = [w.strip() for w in value.replace(" ", ",").split(",") if w.strip()]
    unknown = [w for w in wanted if w not in TOPICS and w != ALL]
    if unknown:
        valid = ", ".join([*TOPICS, ALL])
        names = ", ".join(repr(w) for w in unknown)
        print(f"[convdsl] warning: unknown {ENV_VAR} topic {names} ignored; "
              f"valid topics: {valid}", file=sys.stderr)
    if ALL in wanted:
        return frozenset(TOPICS)
    return frozenset(w for w in wanted if w in TOPICS)


def active() -> frozenset[str]:
    """The topics CONVDSL_LOG turns on now."""
    return _parse(os.environ.get(ENV_VAR, ""))


def enabled(topic: str) -> bool:
    """Whether `topic`'s messages are printed; a misspelt topic in code is a bug."""
    if topic not in TOPICS:
        raise ValueError(f"unknown log topic '{topic}'; topics are {', '.join(TOPICS)}")
    return topic in active()


def emit(topic: str, message: str | Callable[[], str]) -> None:
    """Print `[convdsl:topic] message` to stderr if the topic is on; every line
    of a multi-line message gets the prefix, so the output greps cleanly."""
    if not enabled(topic):
        return
    text = message() if callable(message) else message
    prefix = f"[convdsl:{topic}] "
    sys.stderr.write("".join(prefix + line + "\n" for line in str(text).splitlines() or [""]))


__all__ = ["ALL", "ENV_VAR", "TOPICS", "active", "emit", "enabled"]
