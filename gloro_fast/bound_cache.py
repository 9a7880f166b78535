"""Which bounds a :class:`~gloro_fast.GloroNet` uses, and the cache that keeps them.

- **training** (:func:`training_bounds`): K = Π σ̂ of each layer's power iteration, advanced
  by ``n_iter`` steps per call, with autograd, and D (margin: ‖w_j − w_i‖; global: √2σ̂_head);
- **certification** (:func:`cached_bounds`): the kinds of :mod:`gloro_fast.bounds` —
  ``"sound"`` (provable, the default), ``"estimate"`` (converged power iteration),
  ``"uppers"`` (each layer's provable upper bound) and ``"brackets"`` — computed once per
  set of weights and kept in a :class:`BoundCache` on the network, so a changed weight
  (in place, through ``.data``, ``load_state_dict``, ``.to()``) never meets a cached bound.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .bounds import (
    chain_layers,
    compute_estimate,
    compute_sound,
    global_distances,
    is_chain,
    model_tensor,
    upper_bounds,
    with_uppers,
)
from .ops import class_distances
from .ops.same_bits import same_bits_unchecked, snapshot

__all__ = ["BoundCache", "cached_bounds", "cached_chain", "clear_cached_bounds", "training_bounds"]

_KINDS = ("sound", "estimate", "uppers", "brackets")
_SCALARS = frozenset((int, float, bool, str, type(None)))
_CACHE_ATTR = "_bound_cache"   # in the network's __dict__: not a buffer, not in its state_dict


class BoundCache:
    """Computed bounds of one model, valid until any parameter changes.

    The key holds every parameter's storage pointer, version counter, dtype, device and
    shape (host-side, no synchronisation). Version counters miss in-place edits through
    ``p.data``, so a copy of the weights is kept and compared as well: with a host
    decision on the slow path (:meth:`valid_for`, which then recomputes), as a 0-dim
    boolean tensor on the hot path (:meth:`current`), which certification turns into "not
    certified" — a changed weight never meets a cached bound, and no host synchronisation.
    """

    def __init__(self) -> None:
        self._key = None
        self._snapshot: List[torch.Tensor] = []
        self._on_cpu = False
        self.values: Dict[str, object] = {}

    # a copy of the network (copy.deepcopy, pickling, torch.save of the module) starts with
    # an empty cache: its parameters live elsewhere, so the key could never match, and the
    # snapshot would double the size of what is saved
    def __getstate__(self):
        return {}

    def __setstate__(self, state) -> None:
        self.__init__()

    @staticmethod
    def _key_of(params, extra):
        return tuple([(p.data_ptr(), p._version, p.dtype, p.device, p.shape) for p in params]) + tuple(extra)

    def _refresh(self, key, params) -> None:
        self._key = key
        self._snapshot = snapshot(params)
        # the key pins every parameter's device: while it holds, so does this
        self._on_cpu = all(p.device.type == "cpu" for p in params)
        self.values = {}

    def _same(self, params) -> bool:
        """Whether ``params`` hold the snapshot's bits (host decision: on an accelerator it
        synchronises)."""
        if self._on_cpu:  # called while the key holds, so the devices are the snapshot's
            return same_bits_unchecked(self._snapshot, params, "cpu")
        return all(torch.equal(a, b) for a, b in zip(self._snapshot, params))

    def valid_for(self, params: List[torch.Tensor], extra=()) -> Dict[str, object]:
        """The values, emptied first unless ``params`` (a model's parameters, in a fixed
        order) are exactly those cached (slow path: the value comparison synchronises with
        the host)."""
        key = self._key_of(params, extra)
        if not (self._key == key and len(self._snapshot) == len(params) and self._same(params)):
            self._refresh(key, params)
        return self.values

    def current(self, params: List[torch.Tensor], extra=()):
        """``(values, same)`` for ``params`` (a model's parameters, in a fixed order) without
        a host synchronisation when the key is unchanged:
        on an accelerator ``same`` is a 0-dim bool tensor, False when a weight was edited
        behind the version counter (the caller then certifies nothing); on the CPU, where
        there is no device to wait for, such an edit empties the values at once, as a
        changed key does (``same`` is then None)."""
        if torch.compiler.is_compiling():
            # torch.compile cannot trace storage pointers or version counters: the bounds
            # computed eagerly become constants of the graph, and the value comparison alone
            # keeps them from meeting other weights (the graph then certifies nothing until
            # an eager query, e.g. model.sound_bounds(), refreshes them and it recompiles)
            if self._key is None or len(self._snapshot) != len(params) or tuple(extra) != self._key[-len(extra):]:
                raise RuntimeError(
                    "compute the bounds once eagerly before compiling certification (e.g. "
                    "model.sound_bounds() or model.estimate_bounds()), and again after changing "
                    "the network's layers or settings: they are constants of the compiled graph"
                )
            same = torch.stack([torch.eq(a, b).all() for a, b in zip(self._snapshot, params)]).all()
            return self.values, same
        # the guard runs on every call: one walk over the parameters, a key of host-side
        # attributes and the bit comparison (2C2F: 100 -> 41 us once the walk, the key and
        # same_bits' argument checks were done once each, not two or three times)
        key = self._key_of(params, extra)
        if self._key == key and len(self._snapshot) == len(params):
            if self._on_cpu:
                # no device to synchronise with: one host-side pass (same_bits: memcmp split
                # between threads, 0.44 ms for 6C2F's 2.2 M weights where torch.equal takes
                # 1.0 ms), and an edited weight recomputes the bounds at once
                if same_bits_unchecked(self._snapshot, params, "cpu"):
                    return self.values, None
            else:
                same = torch.stack([torch.eq(a, b).all() for a, b in zip(self._snapshot, params)]).all()
                return self.values, same
        self._refresh(key, params)
        return self.values, None


def guarded_state(net) -> Tuple[tuple, List[torch.nn.Parameter]]:
    """``(structure, params)`` of a network in one walk over its modules, what the bounds
    are keyed on:

    - ``structure``: what the bounds depend on besides the weights: each module under the
      network (the body and the head) by identity and class, with its settings (its public
      attributes of plain types: a convolution's stride, padding, dilation, groups; a
      pool's window; a custom layer's constants), ``training`` aside. Swapping a
      parameterless layer (an average pool for a max pool) or editing a setting in place
      changes no parameter, yet changes the network and its Lipschitz constant: the bounds
      must not survive it;
    - ``params``: ``list(net.parameters())``, in its order, each once.

    One walk instead of a structure walk and ``parameters()``' own (a generator over
    ``named_modules``): 213 -> 156 us for 6C2F (the key included) right after a forward
    has left Python's objects out of the caches, 78 -> 53 us for 2C2F."""
    out: list = []
    params: list = []
    seen: set = set()
    d = net.__dict__
    _take(d["_parameters"], params, seen)
    for child in d["_modules"].values():
        if child is not None:
            _walk(child, out, params, seen)
    return tuple(out), params


def structure_of(net) -> tuple:
    """The ``structure`` of :func:`guarded_state` (what compiled certification reads once,
    when it traces)."""
    return guarded_state(net)[0]


def _take(parameters: dict, params: list, seen: set) -> None:
    for p in parameters.values():
        if p is not None and id(p) not in seen:
            seen.add(id(p))
            params.append(p)


def _walk(module, out: list, params: list, seen: set) -> None:
    # the _modules dicts directly: named_modules() builds a name per module, 1.4x slower
    d = module.__dict__
    out.append((id(module), module.__class__.__qualname__,
                tuple([(k, v) for k, v in d.items()
                       if k[0] != "_" and k != "training" and (type(v) in _SCALARS or _plain_tuple(v))])))
    _take(d["_parameters"], params, seen)
    for child in d["_modules"].values():
        if child is not None:
            _walk(child, out, params, seen)


def _plain_tuple(value) -> bool:
    """A tuple of numbers, strings, None or such tuples: a setting whose == is a bool (a
    tuple holding a tensor would compare elementwise)."""
    return type(value) is tuple and all(type(v) in _SCALARS or _plain_tuple(v) for v in value)


# under torch.compile the structure is read once, when the graph is traced (Dynamo's guards
# on the modules retrace it after a swap), and compared with the one the bounds were made for
_traced_structure_of = torch._dynamo.assume_constant_result(structure_of)


def training_bounds(net):
    """``(K, D)`` for a training step: K = Π σ̂ after ``net.n_iter`` more power-iteration
    steps (0-dim, the model's dtype, with autograd through σ̂) and D (C, C)."""
    lipschitz = model_tensor(net, net.body.lipschitz_bound(net.n_iter))
    if net.bound == "margin":
        distances = class_distances(net.head.weight)
    else:
        distances = global_distances(net, net.head.lipschitz_bound(net.n_iter))
    return lipschitz, distances


def cached_bounds(net, kind: str, hot: bool = False):
    """The certification bounds of ``kind`` (``"sound"``, ``"estimate"``, ``"uppers"``,
    ``"brackets"``) of ``net``, computed on first use and recomputed after any change of a
    parameter or of the settings they depend on (bound, tol, max_iter, input_shape).

    ``hot=True`` returns ``(value, same)`` without a host synchronisation once cached, where
    ``same`` (a 0-dim bool tensor, or None) is False if a weight changed behind the version
    counters since: the caller must then certify nothing (:meth:`BoundCache.current`)."""
    cache = net.__dict__.setdefault(_CACHE_ATTR, BoundCache())
    if torch.compiler.is_compiling():
        structure, params = _traced_structure_of(net), list(net.parameters())
    else:
        structure, params = guarded_state(net)
    extra = (net.bound, net.tol, net.max_iter, net.input_shape, structure)
    if hot:
        values, same = cache.current(params, extra)
    else:
        values, same = cache.valid_for(params, extra), None
    if kind not in values:
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        with torch.no_grad():
            if kind in ("sound", "uppers") and "uppers" not in values:
                values["uppers"] = upper_bounds(net)
            if kind == "sound":
                values[kind] = compute_sound(net, values["uppers"])
            elif kind == "estimate":
                values[kind] = compute_estimate(net)
            elif kind == "brackets":
                values[kind] = with_uppers(net, cached_bounds(net, "estimate").brackets,
                                           cached_bounds(net, "uppers"))
    return (values[kind], same) if hot else values[kind]


def cached_chain(net) -> Optional[list]:
    """The body's leaf layers in order (:func:`gloro_fast.bounds.chain_layers`) when the body
    is a chain of them (:func:`gloro_fast.bounds.is_chain`), else None; kept with the bounds.
    Call it right after :func:`cached_bounds`, whose key (the network's structure included)
    has just been checked, so the list is the network's own. The walk over
    ``named_modules`` costs 13 µs for 2C2F warm and ~90 µs after a batch of 1024 has left
    the caches cold: it is made once per set of weights and structure instead."""
    if torch.compiler.is_compiling():  # read while tracing: no cost per call
        return chain_layers(net) if is_chain(net) else None
    values = net.__dict__[_CACHE_ATTR].values
    if "chain" not in values:
        values["chain"] = chain_layers(net) if is_chain(net) else None
    return values["chain"]


def clear_cached_bounds(net) -> None:
    """Forget every cached bound of ``net`` (recomputed when next needed)."""
    net.__dict__.pop(_CACHE_ATTR, None)
