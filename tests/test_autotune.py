"""Launch-config autotuning (convdsl/triton/autotune.py): on a CPU the first
candidate runs untimed; on a GPU (here: a fake device and a fake timer) the
fastest candidate wins, is stored atomically on disk and read back by a new
process; a corrupt cache file is ignored and rewritten."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import convdsl
from convdsl.triton import autotune
from convdsl.triton.autotune import Autotuner, TuneKey
from convdsl.triton.families.conv import Tile

CANDIDATES = [{"BLOCK": 512, "num_warps": 4}, {"BLOCK": 1024, "num_warps": 4},
              {"BLOCK": 2048, "num_warps": 8}]
# Milliseconds the fake timer reports per BLOCK: the second candidate is fastest.
TIMES = {512: 3.0, 1024: 1.0, 2048: 2.0}
PLAN = SimpleNamespace(name="k_pool_max_3", source="def k_pool_max_3(): pass\n")


class FakeTimer:
    """Runs the candidate once (as do_bench would) and reports a fixed time for it."""

    def __init__(self, times=TIMES):
        self.times, self.calls, self.launched = times, 0, []

    def run(self, config):
        self.launched.append(config)

    def __call__(self, fn):
        self.calls += 1
        fn()
        return self.times[self.launched[-1]["BLOCK"]]


def no_timing(fn):
    raise AssertionError("a launch config was timed")


def key(sizes=((8, 16, 32, 32),)):
    return TuneKey("k_pool_max_3-abc123", "Fake GPU 80GB", [[list(s), "float32"] for s in sizes])


class FakeCudaTensor:
    """What autotune.choose reads of an operand, on a device this machine lacks."""

    def __init__(self, t: torch.Tensor):
        self._t, self.device = t, torch.device("cuda", 0)
        self.shape, self.dtype = t.shape, t.dtype

    def __getattr__(self, name):  # is_contiguous, dim, stride
        return getattr(self._t, name)


@pytest.fixture
def tuner(tmp_path, monkeypatch):
    """A fresh module-level tuner with a fake timer, its cache under tmp_path."""
    timer = FakeTimer()
    fresh = Autotuner(tmp_path / "autotune", timer)
    monkeypatch.setattr(autotune, "TUNER", fresh)
    monkeypatch.setattr(autotune, "device_name", lambda device: "Fake GPU 80GB")
    return fresh


def test_cpu_takes_the_first_config_without_timing(monkeypatch, tmp_path):
    monkeypatch.setattr(autotune, "TUNER", Autotuner(tmp_path, no_timing))
    ran = []
    x = torch.zeros(2, 3, 8, 8)
    chosen = autotune.choose(PLAN, {"gpu": CANDIDATES, "cpu": [{"BLOCK": 4096}]}, (x,), ran.append)
    assert chosen == {"BLOCK": 4096}
    assert autotune.choose(PLAN, CANDIDATES, (x,), ran.append) is CANDIDATES[0]
    assert ran == [] and not any(tmp_path.iterdir())


def test_a_net_on_cpu_runs_its_default_configs_untimed(monkeypatch, tmp_path):
    """Pooling, softmax and concat kernels (families with several GPU configs) under
    the interpreter: right answers, no timing, nothing written to the autotune cache."""
    monkeypatch.setenv("CONVDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "TUNER", Autotuner(None, no_timing))
    source = """
    net T(x: f32[N, 3, 8, 8]) {
        a = maxpool(x, 2)
        b = avgpool(x, 2)
        return softmax(flatten(concat(a, b)))
    }"""
    x = torch.randn(2, 3, 8, 8)
    got = convdsl.compile(source, backend="triton")(x)
    a, b = torch.nn.functional.max_pool2d(x, 2), torch.nn.functional.avg_pool2d(x, 2)
    want = torch.softmax(torch.cat([a, b], 1).flatten(1), dim=1)
    torch.testing.assert_close(got, want)
    assert not (tmp_path / "autotune").exists()


def test_fastest_config_wins_is_stored_and_reloaded(tmp_path):
    timer = FakeTimer()
    first = Autotuner(tmp_path, timer)
    assert first.choose(key(), CANDIDATES, timer.run) is CANDIDATES[1]
    assert timer.calls == 3 and timer.launched == CANDIDATES
    # remembered in memory: no more timing
    assert first.choose(key(), CANDIDATES, timer.run) is CANDIDATES[1]
    assert timer.calls == 3
    # on disk, keyed by device and Triton version in the file, kernel and sizes inside
    path = first.path("Fake GPU 80GB")
    doc = json.loads(path.read_text())
    assert doc["device"] == "Fake GPU 80GB" and doc["triton"] == autotune._triton_version()
    (entry,) = doc["entries"].values()
    assert entry["config"] == CANDIDATES[1] and entry["timings_ms"] == [3.0, 1.0, 2.0]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    # a new process (a new tuner) reads it back without timing
    second = Autotuner(tmp_path, no_timing)
    assert second.choose(key(), CANDIDATES, timer.run) == CANDIDATES[1]
    # other sizes are tuned afresh, and both entries are kept
    third = Autotuner(tmp_path, FakeTimer())
    third.choose(key(((4, 16, 32, 32),)), CANDIDATES, third.timer.run)
    assert third.timer.calls == 3
    assert len(json.loads(path.read_text())["entries"]) == 2


def test_a_corrupt_cache_file_is_ignored_and_rewritten(tmp_path):
    timer = FakeTimer()
    tuner = Autotuner(tmp_path, timer)
    path = tuner.path("Fake GPU 80GB")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"format": 1, "entries": {"trunc')
    assert tuner.choose(key(), CANDIDATES, timer.run) is CANDIDATES[1]
    assert timer.calls == 3
    doc = json.loads(path.read_text())
    (entry,) = doc["entries"].values()
    assert entry["config"] == CANDIDATES[1]


def test_a_stored_choice_of_another_triton_version_is_not_used(tmp_path, monkeypatch):
    timer = FakeTimer()
    Autotuner(tmp_path, timer).choose(key(), CANDIDATES, timer.run)
    monkeypatch.setattr(autotune, "_triton_version", lambda: "9.9.9")
    timer = FakeTimer()
    assert Autotuner(tmp_path, timer).choose(key(), CANDIDATES, timer.run) is CANDIDATES[1]
    assert timer.calls == 3  # tuned again, into its own file
    assert len(list(tmp_path.iterdir())) == 2


def test_a_changed_candidate_list_is_matched_by_value_or_retuned(tmp_path):
    timer = FakeTimer()
    Autotuner(tmp_path, timer).choose(key(), CANDIDATES, timer.run)
    # the same configs reordered: the stored winner is found without timing
    assert Autotuner(tmp_path, no_timing).choose(key(), CANDIDATES[::-1], None) == CANDIDATES[1]
    # the winner is gone from the list: tuned again
    timer = FakeTimer()
    fewer = [CANDIDATES[0], CANDIDATES[2]]
    assert Autotuner(tmp_path, timer).choose(key(), fewer, timer.run) is CANDIDATES[2]
    assert timer.calls == 2


def test_a_failing_candidate_is_skipped(tmp_path):
    timer = FakeTimer()

    def run(config):
        if config["BLOCK"] == 1024:
            raise RuntimeError("out of resources: shared memory")
        timer.run(config)

    assert Autotuner(tmp_path, timer).choose(key(), CANDIDATES, run) is CANDIDATES[2]


def test_tiles_are_stored_and_recognised(tmp_path):
    tiles = [Tile(64, 64, 32, num_warps=4, num_stages=3), Tile(128, 64, 32, num_warps=8,
                                                              num_stages=3)]
    times = iter([2.0, 1.0])
    Autotuner(tmp_path, lambda fn: next(times)).choose(key(), tiles, lambda t: None)
    assert Autotuner(tmp_path, no_timing).choose(key(), tiles, None) == tiles[1]


def test_choose_tunes_on_a_gpu_keyed_by_source_and_sizes(tuner):
    x = FakeCudaTensor(torch.zeros(8, 16, 32, 32))
    timer = tuner.timer
    assert autotune.choose(PLAN, {"gpu": CANDIDATES, "cpu": []}, (x,), timer.run) \
        is CANDIDATES[1]
    assert timer.calls == 3
    (entry_key,) = tuner.load("Fake GPU 80GB")
    kernel, sizes = json.loads(entry_key)
    assert kernel.startswith("k_pool_max_3-") and sizes == [[[[8, 16, 32, 32], "float32",
                                                               "contiguous"]], []]
    # another source of the same name is another kernel
    other = SimpleNamespace(name=PLAN.name, source=PLAN.source + "# changed\n")
    autotune.choose(other, CANDIDATES, (x,), timer.run)
    assert timer.calls == 6


def test_autotune_off_takes_the_first_config(tuner, monkeypatch):
    monkeypatch.setenv("CONVDSL_AUTOTUNE", "0")
    x = FakeCudaTensor(torch.zeros(8, 16, 32, 32))
    assert autotune.choose(PLAN, CANDIDATES, (x,), tuner.timer.run) is CANDIDATES[0]
    assert tuner.timer.calls == 0


def test_layout_classes():
    x = torch.zeros(2, 3, 4, 5)
    assert autotune.layout(x) == "contiguous"
    assert autotune.layout(x.to(memory_format=torch.channels_last)) == "channels_last"
    assert autotune.layout(x.transpose(2, 3)) == "strided:0132:unit"
    assert autotune.layout(x[..., ::2]) == "strided:0123"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_pooling_tunes_once_and_matches_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "TUNER", Autotuner())
    net = convdsl.compile("net P(x: f32[N, 8, H, W]) { return maxpool(x, 3, stride=2) }",
                          backend="triton")
    x = torch.randn(16, 8, 64, 64, device="cuda")
    torch.testing.assert_close(net(x), torch.nn.functional.max_pool2d(x, 3, 2))
    (path,) = (tmp_path / "autotune").iterdir()
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 1
    torch.testing.assert_close(net(x), torch.nn.functional.max_pool2d(x, 3, 2))


def test_trials_and_choices_are_logged(tmp_path, monkeypatch, capsys):
    pytest.importorskip("convdsl.log")
    monkeypatch.setenv("CONVDSL_LOG", "autotune")
    timer = FakeTimer()
    Autotuner(tmp_path, timer).choose(key(), CANDIDATES, timer.run)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and all(line.startswith("[convdsl:autotune] ") for line in lines)
    assert "1.0000 ms" in lines[1] and lines[3].endswith("(tuned)")


def test_a_tuned_launch_takes_the_fast_path(tuner, monkeypatch):
    """After the first choice, a launch of the same plan at the same sizes builds no
    key (no JSON, no hash of the source); new sizes or another plan object do."""
    x = FakeCudaTensor(torch.zeros(8, 16, 32, 32))
    keys = []
    real = autotune.operand_sizes
    monkeypatch.setattr(autotune, "operand_sizes", lambda *a: keys.append(a) or real(*a))
    timer = tuner.timer
    for _ in range(3):
        assert autotune.choose(PLAN, CANDIDATES, (x,), timer.run) is CANDIDATES[1]
    assert len(keys) == 1 and timer.calls == 3
    autotune.choose(PLAN, CANDIDATES, (FakeCudaTensor(torch.zeros(4, 16, 32, 32)),), timer.run)
    assert len(keys) == 2
    twin = SimpleNamespace(name=PLAN.name, source=PLAN.source)  # same kernel: stored choice
    assert autotune.choose(twin, CANDIDATES, (x,), no_timing) is CANDIDATES[1]
    assert len(keys) == 3
