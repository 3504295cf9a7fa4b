"""CompiledNet as a PyTorch citizen: autograd, optimizers, save/load, DDP, training."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import convdsl
from convdsl import CompiledNet

SRC = """net Small(x: f32[N, 1, 8, 8]) {
    h = relu(conv(x, 4, kernel=3, pad=same))
    p = maxpool(h, 2)
    return dense(flatten(p), 3)
}"""


def test_compile_returns_a_module_with_backend_auto_choosing_torch():
    net = convdsl.compile(SRC)
    assert isinstance(net, CompiledNet) and isinstance(net, torch.nn.Module)
    assert net.backend == "torch" and net.kernels == {}


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend"):
        convdsl.compile(SRC, backend="cuda")


def test_compile_accepts_path_objects_and_text(tmp_path):
    path = tmp_path / "s.cdsl"
    path.write_text(SRC)
    assert convdsl.compile(path).name == convdsl.compile(SRC).name == "Small"


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    net = convdsl.compile(SRC)
    x = torch.randn(32, 1, 8, 8)
    target = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_whole_net_gradcheck_in_float64():
    net = convdsl.compile("""net G(x: f32[N, 2, 5, 5]) {
        h = tanh(conv(x, 3, kernel=3, stride=2, pad=same))
        return dense(flatten(avgpool(h, 2, pad=1)), 2)
    }""").double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: net(t), (x,))


def test_torch_save_whole_module(tmp_path):
    net = convdsl.compile(SRC)
    x = torch.randn(2, 1, 8, 8)
    path = tmp_path / "net.pt"
    torch.save(net, path)
    loaded = torch.load(path, weights_only=False)
    torch.testing.assert_close(loaded(x), net(x))


def test_to_and_dtype_moves():
    net = convdsl.compile(SRC).to("cpu")
    assert net(torch.randn(1, 1, 8, 8)).dtype == torch.float32
    net.double()
    assert net(torch.randn(1, 1, 8, 8, dtype=torch.float64)).dtype == torch.float64
    net.float()
    with pytest.raises(convdsl.ConvDSLInputError):
        net(torch.randn(1, 1, 8, 8, dtype=torch.float64))


def test_multiple_outputs_are_a_tuple():
    net = convdsl.compile("net T(x: f32[N, 4, 4, 4]) {\n  a, b = split(x, [1, 3])\n"
                          "  return relu(a), b\n}")
    a, b = net(torch.randn(2, 4, 4, 4))
    assert a.shape == (2, 1, 4, 4) and b.shape == (2, 3, 4, 4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = torch.nn.parallel.DistributedDataParallel(convdsl.compile(SRC))
        torch.manual_seed(rank + 1)
        x = torch.randn(4, 1, 8, 8)
        net(x).sum().backward()
        grad = dict(net.module.named_parameters())["h.weight"].grad
        results[rank] = grad.clone()
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_data_parallel_averages_gradients():
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(world, _free_port(), results), nprocs=world, join=True)
        grads = [results[r] for r in range(world)]
    torch.testing.assert_close(grads[0], grads[1])  # DDP all-reduced them
