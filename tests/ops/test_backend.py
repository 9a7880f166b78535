"""The backend table: one op per op whose kernels come from the table, the selection
(use_backend / set_backend / GLORO_FAST_BACKEND), the choice made once, the reference kernels
of every op against autograd of the reference, and the import structure of the ops and the
kernel providers (no cycle, no private name from elsewhere)."""
from __future__ import annotations

import ast
import pathlib

import pytest
import torch

from gloro_fast import ops
from gloro_fast.ops import registry

F64 = torch.float64
ROOT = pathlib.Path(__file__).resolve().parents[2]
OPS = ("class_distances", "bottom_logit", "power_iteration_linear", "power_iteration_conv")


# ---- selection ----


def test_use_backend_restores_the_previous_selection_also_on_error():
    before = ops.get_backend()
    with ops.use_backend("reference") as name:
        assert name == "reference" and ops.get_backend() == "reference"
        with pytest.raises(RuntimeError, match="inner"):
            with ops.use_backend("cpp"):
                assert ops.get_backend() == "cpp"
                raise RuntimeError("inner")
        assert ops.get_backend() == "reference"
    assert ops.get_backend() == before


def test_environment_is_read_when_no_backend_is_set(monkeypatch):
    before = ops.get_backend()
    monkeypatch.setenv("GLORO_FAST_BACKEND", "reference")
    with ops.use_backend(None):  # back to the environment, read afresh
        assert ops.get_backend() == "reference"
        assert ops.resolve_backend(torch.device("cpu"), "class_distances") == "reference"
    monkeypatch.setenv("GLORO_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"GLORO_FAST_BACKEND must be one of .* got 'fastest'"):
        with ops.use_backend(None):
            pass
    monkeypatch.delenv("GLORO_FAST_BACKEND")
    with ops.use_backend(None):
        assert ops.get_backend() == "auto"
    assert ops.get_backend() == before


def test_unknown_backend_is_refused_by_name():
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'cuda'"):
        ops.set_backend("cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.use_backend(3):
            pass


def test_the_choice_is_made_once_and_again_after_a_registration():
    from gloro_fast.ops._backend import kernels_for

    with ops.use_backend("reference"):
        first = kernels_for("class_distances", "cpu")
        assert kernels_for("class_distances", "cpu") is first
        assert first is registry.kernels("class_distances", "reference")
        calls = []
        original = registry.kernels("class_distances", "reference")

        def counting(weight, exact):
            calls.append(exact)
            return original.forward(weight, exact)

        try:
            registry.register_kernels("class_distances", "reference", forward=counting, backward=original.backward)
            torch.ops.gloro_fast.class_distances(torch.randn(3, 2), True)
            assert calls == [True]  # the new kernels run without a new selection
        finally:
            registry.register_kernels("class_distances", "reference", *original)


# ---- the one op, on each backend ----


def _backends():
    out = ["reference"]
    with ops.use_backend("cpp"):
        if all(ops.resolve_backend(torch.device("cpu"), op) == "cpp" for op in OPS):
            out.append("cpp")
    return out


@pytest.mark.parametrize("name", _backends())
def test_op_gradients_equal_autograd_of_the_reference(name, gen):
    """The op's forward and backward kernels (reference and C++) against autograd through the
    reference functions (torch ops only)."""
    w = torch.randn(6, 5, generator=gen, dtype=F64, requires_grad=True)
    f = torch.randn(9, 6, generator=gen, dtype=F64, requires_grad=True)
    k = torch.tensor(1.3, dtype=F64, requires_grad=True)
    cls = torch.randint(0, 6, (9,), generator=gen)
    g = torch.randn(9, generator=gen, dtype=F64)

    def margin(d, bottom):
        return (bottom * g).sum() + (d * d).sum()

    with ops.use_backend(name):
        d = torch.ops.gloro_fast.class_distances(w, True)
        bottom, i_star, j = torch.ops.gloro_fast.bottom_logit(f, d, k, 0.3, cls)
        margin(d, bottom).backward()
    got = [t.grad.clone() for t in (w, f, k)]
    for t in (w, f, k):
        t.grad = None
    d_ref = ops.class_distances_reference(w, exact=True)
    b_ref, i_ref = ops.bottom_logit_reference(f, d_ref, k, 0.3, cls)
    margin(d_ref, b_ref).backward()
    assert torch.equal(i_star, i_ref) and torch.equal(j, cls)
    torch.testing.assert_close(bottom, b_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, (w.grad, f.grad, k.grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", _backends())
def test_power_iteration_ops_equal_autograd_of_the_reference(name, gen):
    ws = [torch.randn(5, 4, generator=gen, dtype=F64, requires_grad=True),
          torch.randn(3, 7, generator=gen, dtype=F64, requires_grad=True)]
    us = [torch.nn.functional.normalize(torch.randn(n, generator=gen, dtype=F64), dim=0) for n in (4, 7)]
    kernels = torch.randn(2 * 4, 2, 3, 3, generator=gen, dtype=F64, requires_grad=True)  # 2 layers stacked
    iterates = torch.nn.functional.normalize(torch.randn(2, 2 * 5 * 6, generator=gen, dtype=F64), dim=1)
    iterates = iterates.reshape(2, 2, 5, 6)
    geometry = ([2, 1], [1, 0, 0, 1], [1, 1], 1, False)
    with ops.use_backend(name):
        nus, nss, _ = torch.ops.gloro_fast.power_iteration_linear(ws, us, 2)
        cu, cs, _ = torch.ops.gloro_fast.power_iteration_conv(kernels, iterates, 2, *geometry)
        (nss[0] + 3 * nss[1] + cs[0] - 2 * cs[1]).backward()
    got = [t.grad.clone() for t in (*ws, kernels)]
    for t in (*ws, kernels):
        t.grad = None
    rus, rss = ops.power_iteration_linear_reference(ws, us, 2)
    per_layer = [ops.power_iteration_conv_reference(kernels[4 * k : 4 * k + 4], iterates[k : k + 1], 2, (2, 1),
                                                    (1, 0, 0, 1), (1, 1), 1, False) for k in range(2)]
    (rss[0] + 3 * rss[1] + per_layer[0][1] - 2 * per_layer[1][1]).backward()
    for a, b in zip(nus + [cu], rus + [torch.cat([p[0] for p in per_layer])]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(got, (*(w.grad for w in ws), kernels.grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", _backends())
def test_opcheck_on_each_backend(name, gen):
    """Schema, fake kernels, autograd registration and AOT dispatch of the one op, with the
    kernels of each backend behind it."""
    w = torch.randn(7, 3, generator=gen, requires_grad=True)
    f = torch.randn(5, 7, generator=gen, requires_grad=True)
    d = torch.rand(7, 7, generator=gen).requires_grad_()
    k = torch.tensor(1.1, requires_grad=True)
    ws = [torch.randn(4, 3, generator=gen, requires_grad=True)]
    us = [torch.nn.functional.normalize(torch.ones(3), dim=0)]
    kw = torch.randn(4, 2, 3, 3, generator=gen, requires_grad=True)
    ku = torch.nn.functional.normalize(torch.ones(1, 2 * 25), dim=1).reshape(1, 2, 5, 5)
    with ops.use_backend(name):
        torch.library.opcheck(torch.ops.gloro_fast.class_distances.default, (w, False))
        torch.library.opcheck(torch.ops.gloro_fast.bottom_logit.default, (f, d, k, 0.2, None))
        torch.library.opcheck(torch.ops.gloro_fast.power_iteration_linear.default, (ws, us, 1))
        torch.library.opcheck(torch.ops.gloro_fast.power_iteration_conv.default,
                              (kw, ku, 1, [1, 1], [1, 1, 1, 1], [1, 1], 1, False))


def test_one_op_per_op():
    """No second op of the same computation: the gloro_fast namespace holds the ops and their
    backward ops only, and the compiled kernels carry exactly the op's schema."""
    for op in OPS:
        for name in (op, f"{op}_backward"):
            schema = str(getattr(torch.ops.gloro_fast, name).default._schema)
            assert schema.startswith(f"gloro_fast::{name}(")
            if "cpp" in _backends():
                kernel = str(getattr(torch.ops._gloro_fast_cpp, name).default._schema)
                assert kernel.split("::", 1)[1] == schema.split("::", 1)[1]
    for suffix in ("_triton", "_backward_triton"):
        assert not hasattr(torch.ops.gloro_fast, f"bottom_logit{suffix}")


# ---- import structure ----


def _imports(path: pathlib.Path, package: str):
    """(module, name) of every import in a file (function-level ones included), absolute."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:
                yield module, alias.name


def _modules():
    out = {}
    for folder, package in ((ROOT / "gloro_fast" / "ops", "gloro_fast.ops"), (ROOT / "kernels", "gloro_fast.kernels")):
        for path in folder.glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = (path, package)
    return out


def test_no_import_cycle_among_ops_and_kernels():
    modules = _modules()
    graph = {}
    for name, (path, package) in modules.items():
        deps = set()
        for module, imported in _imports(path, package):
            for candidate in (f"{module}.{imported}" if imported else None, module):
                if candidate in modules and candidate != name:
                    deps.add(candidate)
                    break
        graph[name] = deps - {package}  # a submodule's package is imported first by Python itself
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in graph[node]:
            if state.get(dep) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(stack + [node, dep])}")
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])


def test_kernels_import_no_private_name_from_gloro_fast():
    for name, (path, package) in _modules().items():
        if not name.startswith("gloro_fast.kernels"):
            continue
        for module, imported in _imports(path, package):
            if module.startswith("gloro_fast.") and not module.startswith("gloro_fast.kernels"):
                parts = module.split(".") + ([imported] if imported else [])
                assert not any(p.startswith("_") for p in parts), f"{name} imports {'.'.join(parts)}"


# ---- the autograd kernel's shortcut ----


def _linear_args(gen, requires_grad=False):
    ws = [torch.randn(5, 4, generator=gen, dtype=F64, requires_grad=requires_grad)]
    us = [torch.nn.functional.normalize(torch.randn(4, generator=gen, dtype=F64), dim=0)]
    return ws, us, 2


@pytest.mark.parametrize("name", _backends())
def test_a_call_without_graph_skips_the_redispatch_and_nothing_else(name, gen, monkeypatch):
    """A call that builds no graph (no input requiring grad, or grad mode off) on plain CPU
    tensors runs the chosen kernels straight from the op's autograd kernel; a call that
    builds one, and any call under a dispatch mode, goes the general way (the redispatch
    below autograd, where modes, fake and functional tensors see the op). Same values,
    same kernels either way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    op = torch.ops.gloro_fast.power_iteration_linear.default
    redispatched = []
    original = torch._ops.OpOverload.redispatch

    def spy(self, *args, **kwargs):
        redispatched.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch._ops.OpOverload, "redispatch", spy)

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    ws, us, n_iter = _linear_args(gen)
    want_u, want_s = ops.power_iteration_linear_reference(ws, us, n_iter)
    with ops.use_backend(name):
        (u,), (s,), _ = op(ws, us, n_iter)  # no input requires grad
        assert redispatched == [] and not s.requires_grad
        ws_grad = [w.detach().requires_grad_() for w in ws]
        with torch.no_grad():
            (u_ng,), (s_ng,), _ = op(ws_grad, us, n_iter)  # grad mode off
        assert redispatched == [] and not s_ng.requires_grad
        (u_g,), (s_g,), _ = op(ws_grad, us, n_iter)  # a graph: torch's autograd kernel, redispatch
        assert redispatched == [op] and s_g.requires_grad
        redispatched.clear()
        with Seen() as mode:
            (u_m,), (s_m,), _ = op(ws, us, n_iter)
        assert redispatched == [op] and op in mode.ops
    for got_u, got_s in ((u, s), (u_ng, s_ng), (u_g, s_g), (u_m, s_m)):
        torch.testing.assert_close(got_u, want_u[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_s, want_s[0], rtol=1e-12, atol=1e-12)
