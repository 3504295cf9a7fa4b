"""The kernel cache (convdsl/triton/loader.py): keyed by source, Triton
version and device kind; atomic writes; entries verified on load and rebuilt
when corrupt, without ever running what a corrupt file holds; LRU eviction
under CONVDSL_CACHE_MAX_MB; safe when several processes load at once."""
from __future__ import annotations

import multiprocessing
import os
import warnings
from pathlib import Path

import pytest
import torch

import convdsl
from convdsl.triton import loader

from . import cache_worker


def kernel_source(tag: int, padding: int = 0) -> str:
    """A small valid kernel module; `tag` makes the text (and the key) unique."""
    return (f'"""test kernel {tag}{" " * padding}"""\nimport triton\nimport triton.language as tl\n\n\n'
            f"@triton.jit\ndef k_test_{tag}(x_ptr, n, BLOCK: tl.constexpr):\n"
            f"    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)\n"
            f"    mask = offsets < n\n"
            f"    x = tl.load(x_ptr + offsets, mask=mask)\n"
            f"    tl.store(x_ptr + offsets, x + {tag}, mask=mask)\n")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "kernels"
    monkeypatch.setenv("CONVDSL_CACHE_DIR", str(directory))
    monkeypatch.delenv("CONVDSL_CACHE_MAX_MB", raising=False)
    monkeypatch.setattr(loader, "_MODULES", {})  # nothing loaded in this process yet
    return directory


def run_kernel(source: str, tag: int) -> None:
    kernel = loader.load_kernel(source, f"k_test_{tag}", interpret=True)
    x = torch.zeros(100)
    kernel[(1,)](x, 100, BLOCK=128)
    assert torch.equal(x, torch.full((100,), float(tag)))


def entries(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{loader.ENTRY_PREFIX}*.py"))


def test_entries_are_keyed_by_source_triton_version_and_device(cache, monkeypatch):
    source = kernel_source(1)
    base = loader.entry_key(source, True)
    assert base == loader.entry_key(source, True)
    assert base != loader.entry_key(kernel_source(2), True)
    assert base != loader.entry_key(source, False)  # interpreter vs compiled
    monkeypatch.setattr(loader, "_triton_version", lambda: "0.0.0-other")
    assert base != loader.entry_key(source, True)


def test_an_entry_holds_exactly_the_source_and_nothing_is_left_over(cache):
    source = kernel_source(3)
    run_kernel(source, 3)
    (entry,) = entries(cache)
    assert entry.read_text() == source
    assert not list(cache.glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "other kernel", "hostile"])
def test_a_corrupt_entry_is_rebuilt_and_never_run(cache, damage, tmp_path):
    source = kernel_source(4)
    run_kernel(source, 4)
    (entry,) = entries(cache)
    marker = tmp_path / "ran"
    entry.write_text({
        "truncated": source[: len(source) // 2],
        "garbage": "\x00\xff not python at all",
        "empty": "",
        "other kernel": kernel_source(5),
        "hostile": f"open({str(marker)!r}, 'w').write('x')\n" + source,
    }[damage])
    loader._MODULES.clear()  # as a new process would
    run_kernel(source, 4)
    assert entry.read_text() == source and not marker.exists()


def test_a_writer_that_dies_leaves_no_entry_and_no_temporary(cache, monkeypatch):
    source = kernel_source(6)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(loader.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        loader.load_kernel(source, "k_test_6", interpret=True)
    assert not entries(cache) and not list(cache.glob(".tmp-*"))
    monkeypatch.undo()
    monkeypatch.setenv("CONVDSL_CACHE_DIR", str(cache))
    run_kernel(source, 6)


def test_eviction_drops_the_least_recently_used_and_only_entries(cache, monkeypatch):
    size = len(kernel_source(10, padding=2000))
    monkeypatch.setenv("CONVDSL_CACHE_MAX_MB", str(3.5 * size / 2**20))  # room for three
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "autotune").mkdir()  # another tool's files share the directory
    (cache / "autotune" / "tuned.json").write_text("{}")
    (cache / "notes.txt").write_text("x" * 10 * size)
    sources = {tag: kernel_source(tag, padding=2000) for tag in (10, 11, 12, 13)}
    for i, tag in enumerate((10, 11, 12)):
        run_kernel(sources[tag], tag)
        os.utime(loader.entry_path(sources[tag], True, cache), (1000 + i, 1000 + i))
    loader._MODULES.clear()
    run_kernel(sources[10], 10)  # a hit: 10 is now the most recently used
    run_kernel(sources[13], 13)  # a fourth entry: the least recently used (11) goes
    kept = {p.name for p in entries(cache)}
    assert kept == {loader.entry_path(sources[t], True, cache).name for t in (10, 12, 13)}
    assert (cache / "autotune" / "tuned.json").exists() and (cache / "notes.txt").exists()
    assert sum(p.stat().st_size for p in entries(cache)) <= 3.5 * size


def test_stale_temporaries_of_dead_writers_are_cleaned(cache):
    cache.mkdir(parents=True)
    stale, fresh = cache / ".tmp-dead.py", cache / ".tmp-busy.py"
    stale.write_text("partial")
    fresh.write_text("partial")
    os.utime(stale, (1000, 1000))
    loader.evict(cache)
    assert not stale.exists() and fresh.exists()  # a live writer's file stays


def test_an_unusable_cache_directory_falls_back_to_a_private_one(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("CONVDSL_CACHE_DIR", str(blocker / "kernels"))
    monkeypatch.setattr(loader, "_MODULES", {})
    run_kernel(kernel_source(7), 7)


def test_processes_loading_the_same_kernels_at_once(tmp_path):
    """Three processes (spawn) load the same four kernels five times each,
    starting together, under a bound that evicts as they go."""
    sources = [(kernel_source(20 + i, padding=1500), f"k_test_{20 + i}") for i in range(4)]
    env_before = os.environ.get("CONVDSL_CACHE_MAX_MB")
    os.environ["CONVDSL_CACHE_MAX_MB"] = str(2.5 * len(sources[0][0]) / 2**20)
    try:
        context = multiprocessing.get_context("spawn")
        barrier = context.Manager().Barrier(3)
        with context.Pool(3) as pool:
            results = pool.starmap(cache_worker.load_sources,
                                   [(str(tmp_path), sources, barrier, 5)] * 3)
    finally:
        if env_before is None:
            os.environ.pop("CONVDSL_CACHE_MAX_MB", None)
        else:
            os.environ["CONVDSL_CACHE_MAX_MB"] = env_before
    assert results == [[name for _ in range(5) for _, name in sources]] * 3
    for path in entries(tmp_path):  # whatever survived eviction is whole
        assert path.read_text() in {source for source, _ in sources}
    assert not list(tmp_path.glob(".tmp-*"))


NET = """net C(x: f32[N, 2, 6, 6]) {
    h = relu(conv(x, 4, kernel=3, pad=same))
    return dense(flatten(maxpool(h, 2)), 3)
}"""


@pytest.mark.slow
def test_processes_compiling_the_same_net_at_once(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = convdsl.compile(NET, backend="torch")
    x = torch.randn(2, 2, 6, 6)
    want = net(x).detach()
    context = multiprocessing.get_context("spawn")
    barrier = context.Manager().Barrier(4)
    with context.Pool(4) as pool:
        outputs = pool.starmap(cache_worker.compile_and_run,
                               [(str(tmp_path), NET, net.state_dict(), x, barrier)] * 4)
    for got in outputs:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for path in entries(tmp_path):
        assert path.read_text().startswith('"""Generated by convdsl.')
    assert not list(tmp_path.glob(".tmp-*"))
