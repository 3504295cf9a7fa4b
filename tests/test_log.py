"""CONVDSL_LOG: topic logging to stderr, off by default (convdsl.log)."""
from __future__ import annotations

import re

import pytest

import convdsl
from convdsl import log


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch):
    # Parsing is cached per value (so a bad topic warns once); start each test clean.
    monkeypatch.delenv(log.ENV_VAR, raising=False)
    log._parse.cache_clear()
    yield
    log._parse.cache_clear()


def test_off_by_default(capsys):
    assert not any(log.enabled(topic) for topic in log.TOPICS)
    log.emit("passes", "not shown")
    assert capsys.readouterr() == ("", "")


def test_one_topic(monkeypatch, capsys):
    monkeypatch.setenv(log.ENV_VAR, "kernels")
    assert log.enabled("kernels")
    assert not log.enabled("passes") and not log.enabled("cache")
    log.emit("kernels", "lowered k0")
    log.emit("passes", "hidden")
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "[convdsl:kernels] lowered k0\n"


def test_several_topics_and_all(monkeypatch):
    monkeypatch.setenv(log.ENV_VAR, " passes, cache ")
    assert log.active() == {"passes", "cache"}
    monkeypatch.setenv(log.ENV_VAR, "all")
    assert log.active() == {"passes", "kernels", "autotune", "cache"} == set(log.TOPICS)


def test_multiline_messages_are_prefixed_per_line(monkeypatch, capsys):
    monkeypatch.setenv(log.ENV_VAR, "passes")
    log.emit("passes", "dce: removed 2 nodes\n  %3 relu\n  %4 conv")
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["[convdsl:passes] dce: removed 2 nodes", "[convdsl:passes]   %3 relu",
                     "[convdsl:passes]   %4 conv"]


def test_callable_messages_are_built_only_when_on(monkeypatch, capsys):
    calls = []

    def message():
        calls.append(1)
        return "costly"

    log.emit("autotune", message)
    assert calls == []
    monkeypatch.setenv(log.ENV_VAR, "autotune")
    log.emit("autotune", message)
    assert calls == [1]
    assert capsys.readouterr().err == "[convdsl:autotune] costly\n"


def test_unknown_topic_warns_once_and_lists_valid_ones(monkeypatch, capsys):
    monkeypatch.setenv(log.ENV_VAR, "kernel,cache")   # `kernel` is misspelt
    assert log.enabled("cache")
    assert not log.enabled("kernels")
    log.enabled("passes")
    err = capsys.readouterr().err
    assert err.count("warning") == 1
    assert "'kernel'" in err
    for topic in (*log.TOPICS, "all"):
        assert topic in err


def test_a_misspelt_topic_in_code_is_a_bug():
    with pytest.raises(ValueError, match="unknown log topic 'kernel'"):
        log.enabled("kernel")


NET = """
net Small(x: f32[N, 2, 6, 6]) {
    h = relu(conv(x, 3, kernel=3))
    return dense(flatten(maxpool(h, 2)), 4)
}
"""


def test_kernels_topic_logs_one_line_per_lowered_plan(monkeypatch, capsys):
    monkeypatch.setenv(log.ENV_VAR, "kernels")
    net = convdsl.compile(NET, backend="triton")
    lines = capsys.readouterr().err.splitlines()
    plans = net._program.inference.plans
    assert len(lines) == len(plans) > 0
    for line, plan in zip(lines, plans):
        assert line.startswith(f"[convdsl:kernels] forward {plan.name}: family {plan.family}, ")
        for node in plan.nodes:
            assert re.search(rf"%{node}\b", line)
    # IR nodes are named with their op, layer and source line (a step the lowering
    # expands out of a fused node has only its id).
    assert re.search(r"%\d+ \w+.* \((h|dense)\) @<string>:\d", "\n".join(lines))

    # Training lowers the training forward and the backward program too (as the
    # first training step would, without running the kernels).
    net._program.programs(net)
    kinds = {line.split()[1] for line in capsys.readouterr().err.splitlines()}
    assert kinds == {"training", "backward"}


def test_kernels_topic_is_silent_when_off(capsys):
    convdsl.compile(NET, backend="triton")
    assert capsys.readouterr().err == ""
