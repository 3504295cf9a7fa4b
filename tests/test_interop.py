"""A CompiledNet among PyTorch's tools: optimizers, autocast, saving and
loading, .to()/.double(), DistributedDataParallel and torch.compile, on both
backends. Each result is checked against an independent run: the other
backend, plain eager execution, or a single process."""
from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import convdsl
from convdsl import ConvDSLError, ConvDSLInputError

SMALL = """
net Small(x: f32[N, 2, 6, 6]) {
    h = relu(conv(x, 3, kernel=3, pad=same))
    h = maxpool(h, 2)
    return dense(flatten(h), 4)
}
"""
BACKENDS = ["torch", "triton"]


def small(backend: str, seed: int = 0) -> convdsl.CompiledNet:
    torch.manual_seed(seed)
    return convdsl.compile(SMALL, backend=backend)


def batch(seed: int = 1, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, generator=generator), torch.randn(n, 4, generator=generator)


def loss_of(net, x, target) -> torch.Tensor:
    return torch.nn.functional.mse_loss(net(x), target)


def grads(net) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in net.named_parameters()}


def assert_all_close(found: dict, expected: dict, atol=1e-5, rtol=1e-4):
    assert found.keys() == expected.keys()
    for name, value in found.items():
        torch.testing.assert_close(value, expected[name], atol=atol, rtol=rtol, msg=name)


# -- torch.optim --------------------------------------------------------------------------

def test_optimizer_steps_lower_the_loss():
    net, x, target = small("torch"), *batch()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = loss_of(net, x, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9
    assert len(optimizer.state) == len(list(net.parameters()))


def test_sgd_steps_agree_across_backends():
    x, target = batch()
    trained, losses = {}, {}
    for backend in BACKENDS:
        net = small(backend)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            optimizer.zero_grad()
            loss = loss_of(net, x, target)
            loss.backward()
            optimizer.step()
            losses.setdefault(backend, []).append(loss.item())
        trained[backend] = {k: v.detach() for k, v in net.state_dict().items()}
    assert_all_close(trained["triton"], trained["torch"])
    assert losses["triton"][-1] < losses["triton"][0]


# -- autocast -----------------------------------------------------------------------------

def test_autocast_bf16_on_the_torch_backend():
    net, x, target = small("torch"), *batch()
    with torch.no_grad():
        full = net(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(x)
        loss = torch.nn.functional.mse_loss(low.float(), target)
    assert low.dtype == torch.bfloat16          # conv and dense ran in bf16
    torch.testing.assert_close(low.float(), full, atol=0.05, rtol=0.05)
    assert not torch.equal(low.float(), full)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in net.parameters())  # master weights stay f32


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_accepts_inputs_in_the_autocast_dtype(backend):
    # An earlier autocast op hands the net a bf16 tensor; an f32 input takes it, upcast.
    net = small(backend)
    x = batch()[0].bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        from_low, from_full = net(x), net(x.float())
    torch.testing.assert_close(from_low, from_full, atol=0, rtol=0)
    with pytest.raises(ConvDSLInputError, match="declared f32 but got bf16"):
        net(x)   # outside autocast there are still no silent casts


def test_autocast_on_the_triton_backend_runs_the_kernels_in_f32():
    # The kernels are one custom op autocast does not list: they compute in the
    # declared dtype and give exactly what they give without autocast.
    net, x, target = small("triton"), *batch()
    loss_of(net, x, target).backward()
    plain = grads(net)
    net.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
        loss = torch.nn.functional.mse_loss(y, target)
    assert y.dtype == torch.float32
    loss.backward()
    assert_all_close(grads(net), plain, atol=1e-6, rtol=1e-6)


# -- saving and loading ---------------------------------------------------------------------

def roundtrip(obj, weights_only: bool):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=weights_only)


def test_state_dict_roundtrip():
    net, x = small("torch", seed=0), batch()[0]
    state = roundtrip(net.state_dict(), weights_only=True)
    fresh = small("torch", seed=7)
    assert not torch.equal(fresh(x), net(x))
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), net(x), atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_module_save_and_load(backend):
    net, x, target = small(backend), *batch()
    net(x)  # caches built by a first call must not break pickling
    loaded = roundtrip(net, weights_only=False)
    assert isinstance(loaded, convdsl.CompiledNet) and loaded.backend == backend
    torch.testing.assert_close(loaded(x), net(x), atol=0, rtol=0)
    loss_of(loaded, x, target).backward()    # and it still trains
    loss_of(net, x, target).backward()
    assert_all_close(grads(loaded), grads(net), atol=0, rtol=0)
    assert loaded.ir() == net.ir()


# -- .to() and .double() ----------------------------------------------------------------------

def test_to_device_and_double_on_the_torch_backend():
    net, x = small("torch"), batch()[0]
    expected = net(x).detach()
    assert net.to("cpu") is net and net.to(torch.device("cpu")) is net
    net.double()
    assert all(p.dtype == torch.float64 for p in net.parameters())
    y = net(x.double())
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, expected.double(), atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert net.h.weight.grad.dtype == torch.float64
    net.to(torch.float32)
    with pytest.raises(ConvDSLInputError, match="declared f32 but got float64"):
        net(x.double())
    torch.testing.assert_close(net(x), expected)


def test_double_on_the_triton_backend_is_a_clear_error():
    net = small("triton").double()
    with pytest.raises(ConvDSLError, match="compile with backend='torch' to run in float64"):
        net(batch()[0].double())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_to_cuda_matches_cpu(backend):
    net, x, target = small(backend), *batch()
    reference = small("torch")
    loss_of(reference, x, target).backward()
    net.to("cuda")
    loss = loss_of(net, x.cuda(), target.cuda())
    loss.backward()
    # GPU matmuls may round through TF32: compare at its precision.
    torch.testing.assert_close(loss.cpu(), loss_of(reference, x, target).detach(), atol=1e-3,
                               rtol=1e-3)
    assert_all_close({k: v.cpu() for k, v in grads(net).items()}, grads(reference), atol=1e-3,
                     rtol=1e-3)


# -- DistributedDataParallel ------------------------------------------------------------------

STEPS = 3


def _train(net, x, target, steps: int) -> list[dict]:
    """SGD steps; the gradients of every step."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    found = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of(net, x, target).backward()
        found.append(grads(net.module if isinstance(net, DistributedDataParallel) else net))
        optimizer.step()
    return found


def _ddp_worker(rank: int, world: int, store: str, out: str, backend: str, steps: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        x, target = batch(n=4 * world)
        shard = slice(rank * 4, (rank + 1) * 4)
        # A different seed per rank: DDP must broadcast rank 0's weights.
        net = DistributedDataParallel(small(backend, seed=rank))
        found = _train(net, x[shard], target[shard], steps)
        torch.save({"grads": found, "state": net.module.state_dict()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _single_process(backend: str, world: int, steps: int) -> list[dict]:
    x, target = batch(n=4 * world)
    return _train(small(backend, seed=0), x, target, steps)


@pytest.mark.parametrize("backend, steps", [("torch", STEPS), ("triton", 1)])
def test_ddp_in_one_process(backend, steps, tmp_path):
    # Fast: one rank, gloo, in this process: the DDP wrapper's gradient hooks with
    # the net's autograd.Function. The all-reduce between ranks is the slow test's.
    _ddp_worker(0, 1, str(tmp_path / "store"), str(tmp_path), backend, steps)
    found = torch.load(tmp_path / "rank0.pt")
    expected = _single_process(backend, 1, steps)
    assert len(found["grads"]) == len(expected) == steps
    for step, reference in zip(found["grads"], expected):
        assert_all_close(step, reference)


@pytest.mark.slow
def test_ddp_two_processes_on_gloo(tmp_path):
    world = 2
    mp.spawn(_ddp_worker, args=(world, str(tmp_path / "store"), str(tmp_path), "torch", STEPS),
             nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    expected = _single_process("torch", world, STEPS)
    for step in range(STEPS):
        # All-reduced: equal across ranks, and equal to one process on the whole batch.
        assert_all_close(ranks[1]["grads"][step], ranks[0]["grads"][step], atol=0, rtol=0)
        assert_all_close(ranks[0]["grads"][step], expected[step])
    assert_all_close(ranks[1]["state"], ranks[0]["state"], atol=0, rtol=0)


# -- torch.compile ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend, compiler", [("torch", "eager"), ("triton", "eager"),
                                               pytest.param("torch", "aot_eager", marks=pytest.mark.slow)])
def test_torch_compile_treats_the_net_as_an_opaque_op(backend, compiler):
    torch._dynamo.reset()
    net, x, target = small(backend), *batch(n=2)
    expected = net(x)
    torch.nn.functional.mse_loss(expected, target).backward()
    expected_grads = grads(net)
    net.zero_grad()

    # The net inside a larger compiled function, with ops around it.
    @torch.compile(backend=compiler)
    def step(x, target):
        y = net(x * 1.0)
        return y, torch.nn.functional.mse_loss(y, target) * 1.0

    y, loss = step(x, target)
    torch.testing.assert_close(y, expected.detach(), atol=1e-6, rtol=1e-6)
    loss.backward()
    assert_all_close(grads(net), expected_grads, atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()
