"""same_bits: bit equality of lists of tensors — the reference against an independent byte
comparison (numpy ``tobytes``), the compiled CPU kernel against the reference (dtypes,
NaN and signed zeros, layouts, a difference at every position of a multi-thread split,
mismatched dtypes and shapes), the argument checks, and the stale-bound guard built on it."""
from __future__ import annotations

import pytest
import torch

from gloro_fast.ops import same_bits, same_bits_reference, use_backend
from tests.ops.cpp_helpers import has_cpu_kernels

needs_cpp = pytest.mark.skipif(not has_cpu_kernels("same_bits"), reason="gloro_fast._C without same_bits")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool]
BACKENDS = ["reference", pytest.param("cpp", marks=needs_cpp)]


def as_bytes(t: torch.Tensor) -> bytes:
    """The elements' bytes in row-major order (independent of the op: numpy's copy)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def independent(a, b) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and x.shape == y.shape and as_bytes(x) == as_bytes(y)
                                    for x, y in zip(a, b))


def sample(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    return torch.randint(0, 100, shape, generator=g).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_equal_and_edited_copies(backend, dtype):
    a = [sample(dtype, s, i) for i, s in enumerate([(3, 4), (17,), (2, 3, 5, 5), (0, 4)])]
    b = [t.clone() for t in a]
    with use_backend(backend):
        assert same_bits(a, b) and independent(a, b)
        flat = b[2].view(-1)
        flat[7] = flat[7] == 0 if dtype == torch.bool else flat[7] + 1
        assert not same_bits(a, b) and not independent(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bits_not_values(backend):
    """NaN equals the same NaN; −0.0 differs from +0.0 (torch.equal says the opposite)."""
    nan = torch.tensor([1.0, float("nan"), 2.0])
    zeros = (torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0]))
    with use_backend(backend):
        assert same_bits([nan], [nan.clone()]) and not torch.equal(nan, nan.clone())
        assert not same_bits([zeros[0]], [zeros[1]]) and torch.equal(*zeros)
    assert independent([nan], [nan.clone()]) and not independent([zeros[0]], [zeros[1]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mismatched_dtypes_shapes_and_layouts(backend):
    x = torch.randn(6, 4)
    with use_backend(backend):
        assert not same_bits([x], [x.double()])
        assert not same_bits([x], [x.reshape(4, 6)])
        assert not same_bits([x], [x.view(torch.int32)])  # same bits, another dtype
        # the same values in another memory layout, and a strided view of the same storage
        t = x.t().contiguous().t()
        assert not t.is_contiguous() and same_bits([x], [t])
        assert same_bits([x[:, ::2]], [x[:, ::2].clone()])
        edited = t.clone()
        edited[5, 3] += 1
        assert not same_bits([x], [edited])
        assert same_bits([], [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("position", [0, 1, 300, 8 * 2 * 5 * 7 - 1])
def test_channels_last_pairs(backend, position):
    """Convolution weights in channels_last and their snapshot compare as one byte span each
    (the CPU kernel's memcmp path); an edit at any memory position is found, and the same
    values in another layout still compare equal."""
    x = torch.randn(8, 2, 5, 7).contiguous(memory_format=torch.channels_last)
    y = x.clone()
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    with use_backend(backend):
        assert same_bits([x], [y]) and same_bits([x], [x.contiguous()])
        y.as_strided((y.numel(),), (1,))[position] += 1
        assert not same_bits([x], [y]) and not independent([x], [y])
        assert not same_bits([x.contiguous()], [y])


@needs_cpp
@pytest.mark.parametrize("position", [0, 1, 16383, 16384, (1 << 20) - 1, 1 << 20, 1_500_000, 2_999_999])
def test_cpp_finds_a_difference_anywhere_in_a_parallel_split(position):
    """12 MB over three tensors: the kernel splits the bytes between threads in 4 MiB tasks
    and 64 KiB pieces; a one-bit change at each boundary (int32 positions 16384 and 2²⁰), at
    a tensor boundary and at the ends is found."""
    a = [torch.randn(1_500_000), torch.randn(1000, 1000), torch.randn(500_000)]
    b = [t.clone() for t in a]
    with use_backend("cpp"):
        assert same_bits(a, b)
        flat = torch.cat([t.view(-1) for t in b]).view(torch.int32)
        flat[position] ^= 1
        parts = flat.view(torch.float32).split([t.numel() for t in b])
        edited = [p.view(t.shape) for p, t in zip(parts, b)]
        assert not same_bits(a, edited)
        assert same_bits_reference(a, edited) is False


@needs_cpp
def test_the_dispatched_op_matches():
    a = [torch.randn(5, 5), torch.arange(7)]
    b = [t.clone() for t in a]
    with use_backend("cpp"):
        assert torch.ops.gloro_fast.same_bits(a, b) is True
        b[1][3] = -1
        assert torch.ops.gloro_fast.same_bits(a, b) is False


def test_argument_checks():
    x = torch.randn(3)
    with pytest.raises(ValueError, match="a and b must have the same length"):
        same_bits([x], [])
    with pytest.raises(TypeError, match="a must be a sequence of tensors"):
        same_bits([1.0], [x])
    with pytest.raises(ValueError, match="one device"):
        same_bits([x], [x.to("meta")])


def test_requires_grad_inputs_are_compared_without_a_graph():
    w = torch.randn(4, 4, requires_grad=True)
    assert same_bits([w], [w.detach().clone()])


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_form_agrees_on_parameters_that_require_grad(backend):
    """The guard's entry point (no argument checks, no detaching) answers as the checked
    one, and records nothing for autograd."""
    from gloro_fast.ops.same_bits import same_bits_unchecked

    params = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(5))]
    snapshot = [p.detach().clone() for p in params]
    with use_backend(backend):
        assert same_bits_unchecked(snapshot, params, "cpu") is True
        params[1].data[4] = -params[1].data[4]
        assert same_bits_unchecked(snapshot, params, "cpu") is False
        assert same_bits_unchecked([], [], "cpu") is True
    assert all(p.grad is None and p.grad_fn is None for p in params)


def test_snapshot_copies_bits_strides_and_dtypes():
    """Large CPU snapshots share one mapping that starts on a huge-page boundary; small ones,
    and tensors that are not dense, are plain clones. Every copy holds the original's dtype,
    shape and bits (and strides, where the original is dense), owns its memory and records
    nothing for autograd."""
    from gloro_fast.ops.same_bits import snapshot

    g = torch.Generator().manual_seed(0)
    big = [torch.nn.Parameter(torch.randn(300, 700, generator=g)),           # 840 kB
           torch.randn(3, generator=g).to(torch.bfloat16),                    # odd byte count
           torch.randn(16, 3, 5, 5, generator=g).contiguous(memory_format=torch.channels_last),
           torch.randn(7, dtype=torch.float64, generator=g),
           torch.randn(6, 8, generator=g)[:, ::2],                           # not dense
           torch.empty(0, 4),
           torch.arange(9) % 2 == 0]
    small = [torch.randn(5, 5, generator=g), torch.randn(5, generator=g)]
    for tensors, packed in ((big, True), (small, False)):
        copies = snapshot(tensors)
        assert len(copies) == len(tensors)
        for t, c in zip(tensors, copies):
            assert (c.dtype, c.shape, c.requires_grad) == (t.dtype, t.shape, False)
            assert c.stride() == (t.stride() if t is not big[4] else (4, 1))   # dense: its layout
            assert independent([t.detach()], [c])
            assert t.numel() == 0 or c.data_ptr() != t.data_ptr()
        storages = [c.untyped_storage().data_ptr() for c in copies]
        if packed:   # the non-empty dense ones in one mapping, the strided view on its own
            arena = {storages[i] for i in (0, 1, 2, 3, 6)}
            assert len(arena) == 1 and storages[4] not in arena
            assert copies[0].data_ptr() % (1 << 21) == 0
        else:
            assert len(set(storages)) == len(small)
        with torch.no_grad():
            tensors[0].add_(1.0)
        assert not same_bits([tensors[0]], [copies[0]])


def test_guarded_state_lists_the_parameters_in_their_order():
    """The guard's one walk gives exactly ``list(net.parameters())`` (a parameter of the
    network itself, a shared module and a shared parameter each once, in order), and a
    structure that changes with a layer's setting but not with its mode."""
    from gloro_fast import GloroNet
    from gloro_fast import nn as gnn
    from gloro_fast.bound_cache import guarded_state

    torch.manual_seed(0)
    shared = gnn.Linear(4, 4)
    body = gnn.Sequential(gnn.Linear(6, 4), gnn.MinMax(), shared, gnn.MinMax(), shared)
    net = GloroNet(body, gnn.Linear(4, 3), epsilon=0.1)
    net.body[0].weight2 = net.body[0].weight     # a parameter registered twice
    net.extra = torch.nn.Parameter(torch.ones(2))
    structure, params = guarded_state(net)
    expected = list(net.parameters())
    assert len(params) == len(expected) and all(p is q for p, q in zip(params, expected))
    net.eval()
    assert guarded_state(net)[0] == structure
    net.body[1].some_setting = 2
    assert guarded_state(net)[0] != structure


def test_guard_recomputes_after_a_data_edit():
    """The CPU stale-bound guard uses same_bits: an edit through ``.data`` (invisible to the
    version counter) empties the cached values."""
    from gloro_fast.bound_cache import BoundCache

    net = torch.nn.Linear(3, 2)
    cache = BoundCache()
    values, same = cache.current(list(net.parameters()))
    values["k"] = 1.0
    assert cache.current(list(net.parameters()))[0] == {"k": 1.0}
    net.weight.data[0, 0] += 1.0
    assert cache.current(list(net.parameters())) == ({}, None)
