"""Weight initializers for the conv DSL (``init=`` argument).

Every function here is pure: it returns a *new* ``torch.float32`` tensor and
never modifies a tensor it was given.  Random initializers are deterministic
given a ``torch.Generator`` (``generator=None`` uses torch's global RNG).

Conventions
-----------
A conv weight has shape ``[out, in_g, *k]`` where ``in_g = in_channels /
groups`` and ``k`` holds ``d = len(k)`` spatial sizes (``1 <= d <= 3``).  The
spatial axes are ordered ``(..., z, y, x)``: the *last* axis is ``x``
(columns), the one before it ``y`` (rows, growing downwards, image style), the
one before that ``z``.  Kernel coordinates are centred: position ``i`` on an
axis of size ``n`` has coordinate ``i - (n - 1) / 2``.

Initializers
------------
``he(shape, fan_in)``            normal(0, sqrt(2 / fan_in)) -- default for conv.
``xavier(shape, fan_in, fan_out)`` Glorot uniform, bound sqrt(6 / (fan_in + fan_out)).
``normal(shape, std, mean)``     normal(mean, std).
``uniform(shape, a, b)``         uniform on [a, b).
``zeros(shape)``                 all zeros.
``gaussian(shape, sigma)``       per-channel normalized Gaussian blur.
``gaussian_factors(shapes, sigma)`` the 1-D factors of ``gaussian`` for
                                 separable convs.
``edges(shape)``                 Sobel-like oriented edge detectors.
``gabor(shape, orientations, frequencies, phases)`` a Gabor filter bank
                                 (Deep Learning book, eq. 9.16-9.18).
``fan_in_out(shape, groups)``    fan-in / fan-out helper for ``he``/``xavier``.
"""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "he",
    "xavier",
    "normal",
    "uniform",
    "zeros",
    "gaussian_kernel_1d",
    "gaussian",
    "gaussian_factors",
    "edges",
    "sobel_derivative_1d",
    "binomial_1d",
    "gabor",
    "gabor_bank_params",
    "default_gabor_frequencies",
    "gabor_sigma",
    "fan_in_out",
]

_DTYPE = torch.float32
ShapeLike = Union[Sequence[int], torch.Size]
Number = Union[int, float]


# --------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _shape(shape, name: str = "shape") -> Tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of ints, got {shape!r}") from None
    for s in dims:
        if not _is_int(s) or s < 0:
            raise ValueError(f"{name} must contain non-negative ints, got {list(dims)}")
    return tuple(int(s) for s in dims)


def _conv_shape(shape, func: str, max_d: int = 3) -> Tuple[int, int, Tuple[int, ...]]:
    """Validate a conv weight shape ``[out, in_g, *k]`` (1 <= len(k) <= max_d)."""
    dims = _shape(shape)
    if not 3 <= len(dims) <= 2 + max_d:
        raise ValueError(
            f"{func} needs a conv weight shape [out, in_per_group, *kernel] with 1 to "
            f"{max_d} spatial dims, got {list(dims)}"
        )
    if any(s <= 0 for s in dims):
        raise ValueError(f"{func}: all dims of the weight shape must be positive, got {list(dims)}")
    return dims[0], dims[1], dims[2:]


def _positive_real(v, name: str) -> float:
    if not _is_real(v) or not math.isfinite(float(v)) or float(v) <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    return float(v)


def _nonneg_real(v, name: str) -> float:
    if not _is_real(v) or not math.isfinite(float(v)) or float(v) < 0:
        raise ValueError(f"{name} must be a non-negative finite number, got {v!r}")
    return float(v)


def _finite_real(v, name: str) -> float:
    if not _is_real(v) or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _sigmas(sigma, d: int) -> List[float]:
    """A scalar sigma, or one sigma per spatial dim."""
    if _is_real(sigma):
        return [_positive_real(sigma, "sigma")] * d
    try:
        seq = list(sigma)
    except TypeError:
        raise ValueError(f"sigma must be a positive number or a list of them, got {sigma!r}") from None
    if len(seq) != d:
        raise ValueError(f"sigma list must have one entry per spatial dim ({d}), got {len(seq)}")
    return [_positive_real(s, "sigma") for s in seq]


# --------------------------------------------------------------------------
# random / constant initializers
# --------------------------------------------------------------------------

def he(shape: ShapeLike, fan_in: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """He (Kaiming) normal: N(0, sqrt(2 / fan_in))."""
    dims = _shape(shape)
    fan_in = _positive_real(fan_in, "fan_in")
    std = math.sqrt(2.0 / fan_in)
    return torch.randn(dims, generator=generator, dtype=_DTYPE) * std


def xavier(shape: ShapeLike, fan_in: int, fan_out: int,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Glorot/Xavier uniform on [-b, b), b = sqrt(6 / (fan_in + fan_out))."""
    dims = _shape(shape)
    fan_in = _positive_real(fan_in, "fan_in")
    fan_out = _positive_real(fan_out, "fan_out")
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return uniform(dims, -bound, bound, generator=generator)


def normal(shape: ShapeLike, std: Number, mean: Number = 0.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """N(mean, std).  ``std`` must be >= 0 (0 gives a constant tensor)."""
    dims = _shape(shape)
    std = _nonneg_real(std, "std")
    mean = _finite_real(mean, "mean")
    return torch.randn(dims, generator=generator, dtype=_DTYPE) * std + mean


def uniform(shape: ShapeLike, a: Number, b: Number,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Uniform on [a, b); ``a <= b`` required (a == b gives a constant)."""
    dims = _shape(shape)
    a = _finite_real(a, "a")
    b = _finite_real(b, "b")
    if a > b:
        raise ValueError(f"uniform(a, b) needs a <= b, got a={a}, b={b}")
    return torch.rand(dims, generator=generator, dtype=_DTYPE) * (b - a) + a


def zeros(shape: ShapeLike) -> torch.Tensor:
    """All zeros."""
    return torch.zeros(_shape(shape), dtype=_DTYPE)


def fan_in_out(shape_out_in_k: ShapeLike, groups: int = 1) -> Tuple[int, int]:
    """Fan-in and fan-out of a weight ``[out, in_g, *k]`` (``k`` may be empty).

    ``fan_in  = in_g * prod(k)``             (inputs feeding one output unit)
    ``fan_out = (out // groups) * prod(k)``  (outputs fed by one input unit;
    in a grouped conv each input channel only reaches ``out / groups`` outputs).
    """
    dims = _shape(shape_out_in_k)
    if len(dims) < 2:
        raise ValueError(f"fan_in_out needs a shape [out, in_per_group, *kernel], got {list(dims)}")
    if not _is_int(groups) or groups <= 0:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    out, in_g = dims[0], dims[1]
    if out % groups:
        raise ValueError(f"out channels ({out}) must be divisible by groups ({groups})")
    receptive = math.prod(dims[2:])
    return in_g * receptive, (out // groups) * receptive


# --------------------------------------------------------------------------
# Gaussian blur
# --------------------------------------------------------------------------

def gaussian_kernel_1d(size: int, sigma: Number) -> torch.Tensor:
    """Sampled Gaussian of std ``sigma`` centred at ``(size - 1) / 2``, summing to 1."""
    if not _is_int(size) or size <= 0:
        raise ValueError(f"gaussian kernel size must be a positive int, got {size!r}")
    sigma = _positive_real(sigma, "sigma")
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(x * x) / (2.0 * sigma * sigma))
    return (g / g.sum()).to(_DTYPE)


def _outer(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    out = vectors[0]
    for v in vectors[1:]:
        out = out.unsqueeze(-1) * v
    return out


def gaussian(shape: ShapeLike, sigma) -> torch.Tensor:
    """Per-channel Gaussian blur ``[out, in_g, *k]``.

    Output channel ``o`` blurs input channel ``o % in_g`` with the normalized
    d-dimensional Gaussian (outer product of ``gaussian_kernel_1d``); all other
    connections are zero.  ``sigma`` is a number or one number per spatial dim.
    """
    out, in_g, k = _conv_shape(shape, "gaussian")
    sig = _sigmas(sigma, len(k))
    kern = _outer([gaussian_kernel_1d(n, s) for n, s in zip(k, sig)])
    w = torch.zeros((out, in_g) + k, dtype=_DTYPE)
    for o in range(out):
        w[o, o % in_g] = kern
    return w


def gaussian_factors(shape_list: Sequence[ShapeLike], sigma) -> List[torch.Tensor]:
    """Factors ``[out, in_g, k_i]`` (i = 0..d-1) of a separable Gaussian blur.

    Factor i holds the 1-D Gaussian of size ``k_i`` on the diagonal connection
    ``(o, o % in_g)`` and zeros elsewhere, so that the outer product over the
    spatial axes, ``W[o, c, x_0, .., x_{d-1}] = prod_i F_i[o, c, x_i]``, equals
    ``gaussian([out, in_g, k_0, .., k_{d-1}], sigma)``.
    """
    try:
        shapes = [_shape(s, "factor shape") for s in shape_list]
    except TypeError:
        raise ValueError(f"shape_list must be a list of factor shapes, got {shape_list!r}") from None
    if not 1 <= len(shapes) <= 3:
        raise ValueError(f"gaussian_factors needs 1 to 3 factor shapes, got {len(shapes)}")
    for s in shapes:
        if len(s) != 3 or any(v <= 0 for v in s):
            raise ValueError(
                f"each factor shape must be [out, in_per_group, k] with positive sizes, got {list(s)}"
            )
    out, in_g = shapes[0][0], shapes[0][1]
    if any(s[:2] != (out, in_g) for s in shapes):
        raise ValueError(
            f"all factor shapes must share [out, in_per_group], got {[list(s) for s in shapes]}"
        )
    sig = _sigmas(sigma, len(shapes))
    factors = []
    for s, sg in zip(shapes, sig):
        f = torch.zeros(s, dtype=_DTYPE)
        g = gaussian_kernel_1d(s[2], sg)
        for o in range(out):
            f[o, o % in_g] = g
        factors.append(f)
    return factors


# --------------------------------------------------------------------------
# Sobel-like edge detectors
# --------------------------------------------------------------------------

def binomial_1d(size: int) -> torch.Tensor:
    """Binomial smoothing weights (row ``size-1`` of Pascal's triangle): [1,2,1] for 3."""
    if not _is_int(size) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    return torch.tensor([math.comb(size - 1, i) for i in range(size)], dtype=torch.float64)


def sobel_derivative_1d(size: int) -> torch.Tensor:
    """Sobel-style derivative: binomial(size-1) convolved with [-1, 1].

    size 1 -> [0], 2 -> [-1, 1], 3 -> [-1, 0, 1], 4 -> [-1, -1, 1, 1],
    5 -> [-1, -2, 0, 2, 1].  Anti-symmetric and zero-sum.
    """
    if not _is_int(size) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if size == 1:
        return torch.zeros(1, dtype=torch.float64)
    b = binomial_1d(size - 1)
    d = torch.zeros(size, dtype=torch.float64)
    d[1:] += b
    d[:-1] -= b
    return d


def _axis_edge(k: Tuple[int, ...], axis: int) -> torch.Tensor:
    """Derivative along spatial ``axis``, binomial smoothing on the others."""
    vecs = [sobel_derivative_1d(n) if i == axis else binomial_1d(n) for i, n in enumerate(k)]
    return _outer(vecs)


def _ring_indices(n: int, r: int) -> List[Tuple[int, int]]:
    """Clockwise (in image coords, y down) cells of ring ``r`` of an odd n x n grid,
    starting at its top-left corner."""
    c = (n - 1) // 2
    lo, hi = c - r, c + r
    cells = [(lo, j) for j in range(lo, hi)]            # top row, left -> right
    cells += [(i, hi) for i in range(lo, hi)]           # right col, top -> bottom
    cells += [(hi, j) for j in range(hi, lo, -1)]       # bottom row, right -> left
    cells += [(i, lo) for i in range(hi, lo, -1)]       # left col, bottom -> top
    return cells


def _rotate_rings_45(w: torch.Tensor) -> torch.Tensor:
    """Rotate an odd square kernel by 45 deg (x towards +y) by shifting ring r by r cells.

    On 3x3 this turns Sobel x into the diagonal Sobel [[-2,-1,0],[-1,0,1],[0,1,2]].
    """
    n = w.shape[0]
    out = w.clone()
    for r in range(1, (n - 1) // 2 + 1):
        cells = _ring_indices(n, r)
        vals = [w[i, j].item() for i, j in cells]
        m = len(cells)
        for p, (i, j) in enumerate(cells):
            out[i, j] = vals[(p - r) % m]
    return out


def _oriented_dog(kh: int, kw: int, theta: float) -> torch.Tensor:
    """Sampled directional derivative of an (anisotropic) Gaussian, for kernels
    where ring rotation does not apply; envelope variance matches the binomial
    smoothing, ((n - 1) / 4 per axis), L1 norm matched to the axis-aligned kernels."""
    y = torch.arange(kh, dtype=torch.float64) - (kh - 1) / 2.0
    x = torch.arange(kw, dtype=torch.float64) - (kw - 1) / 2.0
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    vy = max((kh - 1) / 4.0, 0.25)
    vx = max((kw - 1) / 4.0, 0.25)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    w = u * torch.exp(-xx * xx / (2 * vx) - yy * yy / (2 * vy))
    w = torch.where(w.abs() < 1e-12, torch.zeros_like(w), w)
    l1 = w.abs().sum()
    target = max(_axis_edge((kh, kw), 0).abs().sum().item(), _axis_edge((kh, kw), 1).abs().sum().item())
    if l1 > 0 and target > 0:
        w = w * (target / l1)
    return w


def _edge_kernel(k: Tuple[int, ...], o: int) -> torch.Tensor:
    d = len(k)
    if d == 1:
        return sobel_derivative_1d(k[0])
    if d == 3:
        # o % 3: 0 -> x (last axis), 1 -> y, 2 -> z (first spatial axis)
        return _axis_edge(k, 2 - (o % 3))
    kh, kw = k
    orient = o % 4  # 0 -> 0 deg, 1 -> 90 deg, 2 -> 45 deg, 3 -> 135 deg
    if orient == 0:
        return _axis_edge(k, 1)  # d/dx, smoothing along y: Sobel x
    if orient == 1:
        return _axis_edge(k, 0)  # d/dy, smoothing along x: Sobel y
    if kh == kw and kh % 2 == 1 and kh >= 3:
        w45 = _rotate_rings_45(_axis_edge(k, 1))
    else:
        w45 = _oriented_dog(kh, kw, math.pi / 4)
    if orient == 2:
        return w45
    return torch.flip(w45, dims=[1])  # 135 deg: left-right mirror of 45 deg


def edges(shape: ShapeLike) -> torch.Tensor:
    """Hand-designed Sobel-like oriented edge detectors ``[out, in_g, *k]``.

    * 1-D: one orientation, the Sobel derivative (``[-1, 0, 1]`` for size 3,
      binomial(k-1) * [-1, 1] in general).
    * 2-D: orientation cycles with ``o % 4`` over 0, 90, 45, 135 degrees, where
      angle t points along (x, y) = (cos t, sin t), x = columns, y = rows
      (downwards).  0 deg = derivative along x with binomial smoothing along y
      (exactly Sobel x for 3x3), 90 deg = Sobel y.  45 deg: for odd square
      kernels, Sobel x rotated by 45 deg ring by ring (on 3x3 exactly
      [[-2,-1,0],[-1,0,1],[0,1,2]]); otherwise the sampled directional
      derivative of a Gaussian (scaled to the L1 norm of the axis kernels).
      135 deg is the left-right mirror of 45 deg.
    * 3-D: ``o % 3`` picks the derivative axis x (last), y, z (first spatial
      axis); binomial smoothing on the other two (3-D Sobel).

    Each kernel is anti-symmetric along its direction and sums to zero.  The
    same kernel goes to every input channel of the group, divided by ``in_g``,
    so the output is the edge response of the channel mean.
    """
    out, in_g, k = _conv_shape(shape, "edges")
    if all(n == 1 for n in k):
        raise ValueError(f"edges needs a kernel with some spatial size > 1, got {list(k)}")
    w = torch.empty((out, in_g) + k, dtype=_DTYPE)
    period = {1: 1, 2: 4, 3: 3}[len(k)]
    kernels = [(_edge_kernel(k, o) / in_g).to(_DTYPE) for o in range(min(out, period))]
    for o in range(out):
        w[o] = kernels[o % period]  # broadcasts over in_g
    return w


# --------------------------------------------------------------------------
# Gabor bank
# --------------------------------------------------------------------------

def _size_of(size) -> int:
    if _is_int(size):
        s = int(size)
    else:
        try:
            sizes = [int(v) for v in size]
        except (TypeError, ValueError):
            raise ValueError(f"size must be a positive int or a list of them, got {size!r}") from None
        if not sizes:
            raise ValueError("size list must not be empty")
        s = max(sizes)
    if s <= 0:
        raise ValueError(f"kernel size must be positive, got {size!r}")
    return s


def default_gabor_frequencies(size) -> List[float]:
    """Default frequencies (radians/pixel): [pi/2] for kernels smaller than 7,
    else [pi/2, pi/4] (wavelengths of 4 and 8 pixels)."""
    s = _size_of(size)
    return [math.pi / 2] if s < 7 else [math.pi / 2, math.pi / 4]


def gabor_sigma(size) -> float:
    """Gaussian envelope std of the Gabor bank: sigma = size / 4, where size is
    the largest kernel side; beta_x = beta_y = 1 / (2 sigma^2)."""
    return _size_of(size) / 4.0


def _param_list(v, name: str, from_count) -> List[float]:
    if _is_int(v):
        if v <= 0:
            raise ValueError(f"{name} count must be a positive int, got {v}")
        return from_count(int(v))
    if _is_real(v):
        raise ValueError(f"{name} must be an int count or a list of numbers, got {v!r}")
    try:
        vals = list(v)
    except TypeError:
        raise ValueError(f"{name} must be an int count or a list of numbers, got {v!r}") from None
    if not vals:
        raise ValueError(f"{name} list must not be empty")
    return [_finite_real(x, f"{name} entry") for x in vals]


def gabor_bank_params(orientations=4, frequencies=None, phases=None,
                      size=3) -> List[Tuple[float, float, float]]:
    """The (tau, f, phi) triples of the Gabor bank, orientation outermost, then
    frequency, then phase.

    * ``orientations``: int n -> tau_i = i * pi / n (i = 0..n-1), or a list of
      angles in radians.
    * ``frequencies``: int n -> f_i = pi / 2**(i+1) (octaves: pi/2, pi/4, ...),
      a list of non-negative radians/pixel, or None -> ``default_gabor_frequencies(size)``.
    * ``phases``: int n -> phi_i = i * pi / n (phi and phi + pi only differ in
      sign, so this spans the distinct phases; n=2 gives [0, pi/2]), a list in
      radians, or None -> [0, pi/2].
    """
    taus = _param_list(orientations, "orientations", lambda n: [i * math.pi / n for i in range(n)])
    if frequencies is None:
        freqs = default_gabor_frequencies(size)
    else:
        freqs = _param_list(frequencies, "frequencies",
                            lambda n: [math.pi / 2 ** (i + 1) for i in range(n)])
        for f in freqs:
            if f < 0:
                raise ValueError(f"frequencies must be non-negative, got {f}")
    if phases is None:
        phis = [0.0, math.pi / 2]
    else:
        phis = _param_list(phases, "phases", lambda n: [i * math.pi / n for i in range(n)])
    return [(t, f, p) for t in taus for f in freqs for p in phis]


def _unit(w: torch.Tensor) -> torch.Tensor:
    n = torch.linalg.vector_norm(w)
    return w / n if n > 0 else w


def gabor(shape: ShapeLike, orientations=4, frequencies=None, phases=None) -> torch.Tensor:
    """A Gabor filter bank ``[out, in_g, kh, kw]`` (or 1-D ``[out, in_g, k]``).

    2-D (Deep Learning book eq. 9.16-9.18)::

        w(x, y) = alpha * exp(-beta_x x'^2 - beta_y y'^2) * cos(f x' + phi)
        x' =  (x - x0) cos(tau) + (y - y0) sin(tau)
        y' = -(x - x0) sin(tau) + (y - y0) cos(tau)

    with x the column index, y the row index, (x0, y0) the kernel centre
    ((kw-1)/2, (kh-1)/2), beta_x = beta_y = 1/(2 sigma^2), sigma =
    ``gabor_sigma`` = max(kh, kw) / 4, and alpha chosen so that each kernel has
    unit L2 norm (left unscaled if it is all zeros).

    1-D: ``w(x) = alpha * exp(-beta x^2) * cos(f x + phi)`` with x centred;
    there is no orientation, so the bank is frequency x phase (tau = 0) and
    ``orientations`` is only validated.

    The bank is ``gabor_bank_params(orientations, frequencies, phases, size)``;
    output channel o uses entry ``o % len(bank)``.  The same kernel goes to
    every input channel of the group, divided by ``in_g``.
    """
    out, in_g, k = _conv_shape(shape, "gabor", max_d=3)
    if len(k) == 3:
        raise ValueError("gabor needs a 1-D or 2-D kernel")
    size = max(k)
    if len(k) == 1:
        gabor_bank_params(orientations, frequencies, phases, size)  # validation
        bank = gabor_bank_params([0.0], frequencies, phases, size)
    else:
        bank = gabor_bank_params(orientations, frequencies, phases, size)
    sigma = gabor_sigma(size)
    beta = 1.0 / (2.0 * sigma * sigma)

    if len(k) == 1:
        x = torch.arange(k[0], dtype=torch.float64) - (k[0] - 1) / 2.0
        kernels = [_unit(torch.exp(-beta * x * x) * torch.cos(f * x + phi)) for _, f, phi in bank]
    else:
        kh, kw = k
        y = torch.arange(kh, dtype=torch.float64) - (kh - 1) / 2.0
        x = torch.arange(kw, dtype=torch.float64) - (kw - 1) / 2.0
        yy, xx = torch.meshgrid(y, x, indexing="ij")
        kernels = []
        for tau, f, phi in bank:
            c, s = math.cos(tau), math.sin(tau)
            xp = xx * c + yy * s
            yp = -xx * s + yy * c
            g = torch.exp(-beta * xp * xp - beta * yp * yp) * torch.cos(f * xp + phi)
            kernels.append(_unit(g))

    w = torch.empty((out, in_g) + k, dtype=_DTYPE)
    for o in range(out):
        w[o] = (kernels[o % len(kernels)] / in_g).to(_DTYPE)
    return w
