"""``same_bits(a, b)``: whether two lists of tensors hold the same bits.

    same_bits(a, b) = len(a) = len(b) and, for every i, a[i] and b[i] have the same dtype,
                      the same shape and bitwise identical elements

Bit equality, not ``==``: a NaN equals the same NaN and −0.0 differs from +0.0 (two tensors
with the same bits compute the same function; that is what a cache of bounds needs to
know). It is the CPU stale-bound guard of certification (:class:`gloro_fast.bound_cache.BoundCache`
compares every parameter with the copy its bounds came from on each ``certify`` call):
``torch.equal`` compares floating-point elements one by one, the C++ kernel compares bytes
(``memcmp``, the bytes split between threads, stopping at the first difference).

The op ``torch.ops.gloro_fast.same_bits`` answers with a Python bool: no autograd, no fake
kernel, not traceable by torch.compile (the guard's compiled form is ``torch.eq(...).all()``).
Kernels: the reference below (any device) and the C++ CPU kernel (csrc/cpu/same_bits.cpp).

:func:`snapshot` makes the copies the guard compares against: on the CPU, large ones share
one anonymous mapping advised for transparent huge pages, so that the comparison of 6C2F's
9 MB crosses ~5 page-table entries instead of ~2,300.
"""
from __future__ import annotations

import mmap
from typing import List, Sequence

import torch

from ._backend import kernels_for
from ._library import define_query_op

__all__ = ["same_bits", "same_bits_reference", "same_bits_unchecked", "snapshot"]

SCHEMA = "(Tensor[] a, Tensor[] b) -> bool"

# an integer dtype of each element width: torch.equal on it compares bits
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.element_size()]) if t.element_size() in _BITS else t


def same_bits_reference(a: List[torch.Tensor], b: List[torch.Tensor]) -> bool:
    """Reference in torch ops: ``torch.equal`` of integer views of the same width."""
    if len(a) != len(b):
        return False
    return all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(_as_bits(x), _as_bits(y))
               for x, y in zip(a, b))


def _check(a, b) -> str:
    for name, seq in (("a", a), ("b", b)):
        if not all(isinstance(t, torch.Tensor) for t in seq):
            raise TypeError(f"{name} must be a sequence of tensors")
    if len(a) != len(b):
        raise ValueError(f"a and b must have the same length, got {len(a)} and {len(b)}")
    devices = {t.device for t in a} | {t.device for t in b}
    if len(devices) > 1:
        raise ValueError(f"a and b must be on one device, got {sorted(map(str, devices))}")
    return devices.pop().type if devices else "cpu"


def same_bits(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    """True iff every ``a[i]`` and ``b[i]`` have the same dtype, shape and bits (see the
    module docstring). ``a`` and ``b``: sequences of tensors of one length, on one device.
    Runs the chosen kernel directly (the op has no autograd or fake kernel to go through)."""
    a, b = list(a), list(b)
    device_type = _check(a, b)
    a = [t.detach() if t.requires_grad else t for t in a]
    b = [t.detach() if t.requires_grad else t for t in b]
    return same_bits_unchecked(a, b, device_type)


def same_bits_unchecked(a: List[torch.Tensor], b: List[torch.Tensor], device_type: str) -> bool:
    """:func:`same_bits` for a caller that already holds its contract: lists of one length,
    every tensor on ``device_type`` (the stale-bound guard, whose cache key pins each
    parameter's device and shape). No argument checks and no detaching: the kernel reads
    bits, and a tensor that requires grad is read like any other."""
    if not a:
        return True
    return bool(kernels_for("same_bits", device_type).forward(a, b))


# below this many bytes a snapshot is a plain clone per tensor: a few hundred 4 KiB pages
# cost the comparison little, and a huge page would hold mostly nothing
_ARENA_MIN_BYTES = 1 << 19
_HUGE_PAGE = 1 << 21
_ALIGN = 64   # each copy starts on its own cache line


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` fills ``numel`` elements from its data pointer on (so its bytes are one
    span, and a copy with its strides compares with one ``memcmp``)."""
    return (type(t) is torch.Tensor and t.layout == torch.strided and not t.is_quantized
            and (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
                 or t.is_contiguous(memory_format=torch.channels_last_3d)))


def snapshot(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Copies of ``tensors`` (same dtype, shape and bits, detached; the same strides where
    the original is dense) to compare with :func:`same_bits` later: the stale-bound guard's
    record of the weights its bounds came from.

    On the CPU, when the dense ones (contiguous or channels_last) hold at least 512 KiB
    together, their copies are views into one anonymous mapping advised ``MADV_HUGEPAGE``
    before it is first written (Linux; elsewhere, or where transparent huge pages are off,
    an ordinary mapping). After a forward pass has evicted the caches, comparing 6C2F's
    weights with such a snapshot took 0.75 ms against 0.90 ms with per-tensor clones (the
    2-core Xeon of benchmarks/RESULTS-*, medians of 20): the comparison's cost is reading
    both copies, and 4 KiB pages add a page walk per 4 KiB.
    """
    tensors = [t.detach() for t in tensors]
    packed = [i for i, t in enumerate(tensors) if t.device.type == "cpu" and t.numel() > 0 and _dense(t)]
    sizes = [tensors[i].numel() * tensors[i].element_size() for i in packed]
    total = sum(-(-n // _ALIGN) * _ALIGN for n in sizes)
    if total < _ARENA_MIN_BYTES or not hasattr(mmap, "MAP_PRIVATE"):  # small, or not a POSIX mmap
        return [t.clone() for t in tensors]
    # room to start on a huge-page boundary and to end on one (the kernel backs a 2 MiB
    # range with a huge page only when the mapping holds all of it)
    # private: a shared anonymous mapping is shared memory, which gets no transparent huge pages
    area = mmap.mmap(-1, -(-total // _HUGE_PAGE) * _HUGE_PAGE + _HUGE_PAGE, flags=mmap.MAP_PRIVATE)
    try:
        area.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # no such advice here (not Linux): only page walks are lost
        pass
    raw = torch.frombuffer(area, dtype=torch.uint8)   # the tensors keep the mapping alive
    pos = -raw.data_ptr() % _HUGE_PAGE
    copies = {}
    for i, n in zip(packed, sizes):
        t = tensors[i]
        copies[i] = raw[pos:pos + n].view(t.dtype).as_strided(t.shape, t.stride()).copy_(t)
        pos += -(-n // _ALIGN) * _ALIGN
    return [copies[i] if i in copies else t.clone() for i, t in enumerate(tensors)]


_OP = define_query_op("same_bits", SCHEMA, reference=same_bits_reference)
