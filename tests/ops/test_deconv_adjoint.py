"""deconv is the transpose of conv (eq. 9.12–9.14): <conv(x), y> == <x, deconv(y)>
for every padding rule and every size= the stride leaves open."""
import math

import pytest
import torch
import torch.nn.functional as F

import convdsl

from ..reference import tf_same_pads

# Every output size o a `same` conv maps back to m = ceil(o / s).
SAME_CASES = [(out, k, s) for out in (9, 10, 11, 12) for k, s in ((3, 2), (4, 2), (5, 3), (1, 2))]


@pytest.mark.parametrize("out,k,s", SAME_CASES)
def test_same_deconv_is_adjoint_of_same_conv(out, k, s):
    m = math.ceil(out / s)
    net = convdsl.compile(f"""net D(y: f32[N, 3, {m}, {m}]) {{
        return deconv(y, 2, kernel={k}, stride={s}, pad=same, size={out}, bias=none)
    }}""").double()
    weight = net.state_dict()["deconv.weight"]  # [in=3, out=2, k, k]
    x = torch.randn(1, 2, out, out, dtype=torch.float64)
    y = torch.randn(1, 3, m, m, dtype=torch.float64)
    before, after = tf_same_pads(out, k, s)
    conv_x = F.conv2d(F.pad(x, (before, after, before, after)), weight, stride=s)
    assert conv_x.shape == y.shape
    lhs = (conv_x * y).sum()
    rhs = (x * net(y)).sum()
    torch.testing.assert_close(lhs, rhs)


@pytest.mark.parametrize("pad,extra", [((1, 2), 0), ((0, 0), 1), ((2, 1), 1)])
def test_explicit_pad_deconv_is_adjoint_of_conv(pad, extra):
    k, s, m = 4, 2, 5
    out = (m - 1) * s + k - sum(pad) + extra
    net = convdsl.compile(f"""net D(y: f32[N, 3, {m}]) {{
        return deconv(y, 2, kernel={k}, stride={s}, pad=({pad},), size={out}, bias=none)
    }}""").double()
    weight = net.state_dict()["deconv.weight"]
    x = torch.randn(2, 2, out, dtype=torch.float64)
    y = torch.randn(2, 3, m, dtype=torch.float64)
    # The conv that this deconv transposes: pad (before, after + extra), then a valid conv.
    conv_x = F.conv1d(F.pad(x, (pad[0], pad[1] + 0)), weight, stride=s)[..., :m]
    torch.testing.assert_close((conv_x * y).sum(), (x * net(y)).sum())
