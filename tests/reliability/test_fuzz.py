"""Fuzzing: generated and mutated .cdsl programs through `convdsl.compile` and the CLI.

Every outcome must be a compiled net (which then runs forward and backward,
or stops with a ConvDSLError) or a ConvDSLError; the CLI must exit 0 or 1,
never 2 (internal error). Any other exception fails the test, and hypothesis
shrinks the program that raised it.

The default run is bounded and derandomized (the same cases every time);
CONVDSL_FUZZ_EXAMPLES=N runs N random cases per test instead
(docs/reliability.md).
"""
from __future__ import annotations

import collections
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .harness import check_cli, compile_or_error, net_names, run_or_error
from .programs import mutated, programs

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LONG = int(os.environ.get("CONVDSL_FUZZ_EXAMPLES", "0") or 0)


def fuzz_settings(default: int):
    return settings(max_examples=LONG or default, deadline=None, derandomize=not LONG,
                    database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", autouse=True)
def small_tensors():
    """Generated sizes are wild: refuse run-time tensors above 10^7 elements
    (a ConvDSLInputError, an outcome like any other) rather than allocate them."""
    previous = os.environ.get("CONVDSL_MAX_TENSOR_ELEMENTS")
    os.environ["CONVDSL_MAX_TENSOR_ELEMENTS"] = str(10**7)
    yield
    if previous is None:
        os.environ.pop("CONVDSL_MAX_TENSOR_ELEMENTS", None)
    else:
        os.environ["CONVDSL_MAX_TENSOR_ELEMENTS"] = previous


def exercise(text: str, tmp: Path, counts: collections.Counter) -> None:
    """The whole contract for one program; counts what happened."""
    outcome = compile_or_error(text)
    counts[outcome.stage] += 1
    if outcome.net is not None:
        counts[run_or_error(outcome.net).stage] += 1
    counts[f"check exit {check_cli(text, tmp)}"] += 1
    names = net_names(text)
    net_args = ["--net", names[-1]] if len(names) > 1 else []
    counts[f"ir exit {check_cli(text, tmp, ('ir', *net_args, '--stage', 'parsed'))}"] += 1
    if outcome.net is not None and len(text) % 3 == 0:  # a third: the run command too
        sizes = ",".join(f"{s}=3" for s in sorted(outcome.net._graph.symbols))
        args = ("run", *net_args, "--repeat", "0", *(["--shape", sizes] if sizes else []))
        counts[f"run exit {check_cli(text, tmp, args)}"] += 1


def _report(name: str, counts: collections.Counter) -> None:
    print(f"\n{name}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))


def test_generated_programs_compile_or_fail_cleanly():
    counts: collections.Counter = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        @fuzz_settings(150)
        @given(programs())
        def case(text):
            exercise(text, Path(tmp), counts)

        case()
    _report("generated", counts)
    total = counts["compiled"] + counts["compile-error"]
    # The generator is worth running only if it reaches both sides of the compiler.
    assert counts["compiled"] >= total // 10 and counts["ran"] >= total // 20
    assert counts["compile-error"] >= total // 10


SEEDS = sorted(p.name for p in EXAMPLES.glob("*.cdsl"))


def test_mutated_programs_compile_or_fail_cleanly():
    counts: collections.Counter = collections.Counter()
    sources = {name: (EXAMPLES / name).read_text() for name in SEEDS}
    with tempfile.TemporaryDirectory() as tmp:
        @fuzz_settings(150)
        @given(st.data())
        def case(data):
            if data.draw(st.booleans(), label="from an example"):
                seed = sources[data.draw(st.sampled_from(SEEDS), label="example")]
            else:
                seed = data.draw(programs(), label="generated")
            exercise(data.draw(mutated(seed), label="mutated"), Path(tmp), counts)

        case()
    _report("mutated", counts)
    assert counts["compile-error"] > 0 and counts["compiled"] > 0


@pytest.mark.parametrize("text", [
    "",
    "\x00\x01\x02",
    "\ufeffnet A(x: f32[N, 2]) { return x }",
    "net A(x: f32[N, 2]) { return x }\r\n",
    "net \u202eA(x: f32[N, 2]) { return x }",
    "net A(x: f32[N, 2]) { return \"" + "\\" * 9 + "\" }",
    "net A(x: f32[N, 2]) { return x } " * 200,
    "net A(x: f32[N, 2]) { return relu(x, x, x, x, x) }",
    ("table T = [[0], [1]] net A(x: f32[N, 2, 4, 4]) { return conv(x, 2, 1, connect=T, "
     "connect=T) }"),
    "net A(x: f32[N, 2, 4, 4]) { return conv(x, 2, 1, name=\"\\ud800\") }",
    "net A(x: f32[N, 2, 4, 4]) { return conv(x, 2, 1, name=\"\\N{BOGUS}\") }",
    "net A(x: f32[N, 2, 4, 4]) { return conv(x, 2, " + "9" * 5000 + ") }",
    "net A(x: f32[N, 2, 4, 4]) { return x * " + "9" * 400 + ".0 }",
    "net A(x: f32[N, 2, 4, 4]) { return x * (9223372036854775807 * 2) }",
    ("net A(x: f32[N, 2, 4, 4]) { return conv(x, 2, 1, init=gabor(orientations=[], "
     "phases=0.5)) }"),
    "net A(x: f32[N, 2, 4, 4]) { return conv(x, 2, 3, init=gaussian([1, 2, 3])) }",
    "net A(x: f32[N, 2, 4, 4]) { return conv(x, 2, 3, init=normal([1])) }",
    "net A(x: f32[N, 2, 4, 4]) { return wavgpool(x, 2, sigma=1e-300) }",
])
def test_known_hostile_inputs(text, tmp_path):
    """Cases found by hand or by the fuzzer, kept as regressions."""
    counts: collections.Counter = collections.Counter()
    exercise(text, tmp_path, counts)
