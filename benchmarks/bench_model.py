"""Model-level benchmarks on the paper architectures (CIFAR-10 shapes, float32):

- Lipschitz-bound step: K = Π_l σ̂_l of the body and its backward (cnn_6C2F, LiResNet),
  with n_iter power iterations per layer;
- training step: forward, TRADES loss (λ = 1), backward and Adam step of a GloRo net vs a
  plain (non-robust, cross-entropy, same body and head) training step;
- certify: certified predictions with cached converged bounds vs a plain forward pass;
- convergence: the evaluation bounds, iterated to tol = 1e-6 from a fresh iterate.

Contenders: naive (public-code forms: per-layer eager power iteration with 10 iterations
and autograd through them, B×C×d margins), eager (careful hand-written PyTorch), compile
(of eager), gloro_fast backends (the package API), and ``plain`` where the case has a
non-robust baseline.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.harness import (
    DEVICE,
    DTYPE,
    QUICK,
    compiled,
    contenders,
    label,
    pick,
    record_skip,
    run_contender,
    run_paired,
    zero_grads,
)
from gloro_fast import losses
from gloro_fast.models import cnn_2C2F, cnn_6C2F, liresnet
from gloro_fast.nn import Linear, PowerIterationModule
from gloro_fast.nn.conv import channels_last
from gloro_fast.ops.power_iteration_conv import conv_operator, conv_operator_adjoint

MODELS = {"6C2F": cnn_6C2F, "LiResNet": liresnet}
TARGET_ROUNDS = pick(7, 3)  # the training-step and certify targets are ratios near 1: more rounds
NAIVE_ITERS = 10  # public GloRo/LiResNet code: 10 iterations per step, with autograd
TOL = 1e-6
BOUND_OPS = ("power_iteration_linear", "power_iteration_conv")
MARGIN_OPS = ("class_distances", "bottom_logit")


def build(name):
    torch.manual_seed(0)
    return MODELS[name](input_shape=(3, 32, 32), num_classes=10).to(DEVICE, DTYPE)


def data(batch, num_classes=10):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, 32, 32, generator=g).to(DEVICE, DTYPE)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(DEVICE)
    return x, y


# -- the layers' operators, for the naive and eager contenders ---------------------------
def layer_specs(model):
    """(kind, module, static args) of every power-iterated layer of the body."""
    specs = []
    for m in model.body.modules():
        if not isinstance(m, PowerIterationModule):
            continue
        if isinstance(m, Linear):
            specs.append(("linear", m, None))
        else:
            hw = tuple(m.power_iterate.shape[2:])
            specs.append(("conv", m, (tuple(m.stride), m.pads_for(hw), tuple(m.dilation), m.groups,
                                      bool(m.residual), hw)))
    return specs


def _apply(kind, args, w, u):
    if kind == "linear":
        return w @ u
    stride, pads, dil, groups, residual, _ = args
    return conv_operator(u, w, stride, pads, dil, groups, residual=residual)


def _adjoint(kind, args, w, v):
    if kind == "linear":
        return w.t() @ v
    stride, pads, dil, groups, residual, hw = args
    return conv_operator_adjoint(v, w, stride, pads, dil, groups, hw, residual=residual)


def bound_naive(specs, weights, iterates, n_iter):
    """Per layer, v = Au/‖Au‖, u = Aᵀv/‖Aᵀv‖ with autograd through every iteration."""
    K = 1.0
    for k, (kind, _, args) in enumerate(specs):
        w, u = weights[k], iterates[k]
        for _ in range(n_iter):
            v = _apply(kind, args, w, u)
            v = v / torch.linalg.vector_norm(v)
            u = _adjoint(kind, args, w, v)
            u = u / torch.linalg.vector_norm(u)
        K = K * torch.linalg.vector_norm(_apply(kind, args, w, u))
        iterates[k] = u.detach()
    return K


def make_bound_eager(specs):
    kinds = [(kind, args) for kind, _, args in specs]

    def bound_eager(weights, iterates, n_iter: int):
        K = 1.0
        new = []
        for (kind, args), w, u in zip(kinds, weights, iterates):
            with torch.no_grad():
                wd = w.detach()
                for _ in range(n_iter):
                    x = _adjoint(kind, args, wd, _apply(kind, args, wd, u))
                    u = x / torch.linalg.vector_norm(x)
            K = K * torch.linalg.vector_norm(_apply(kind, args, w, u))
            new.append(u)
        return K, new
    return bound_eager


def margin_eager_distances(W):
    sq = (W * W).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (W @ W.t())
    eye = torch.eye(W.shape[0], dtype=torch.bool, device=W.device)
    return torch.where(eye, 0.0, d2.clamp_min(1e-30).sqrt())


def bottom_eager(f, D, K, eps):
    j = f.argmax(dim=1)
    extra = f + (eps * K) * D.index_select(0, j)
    extra = extra.masked_fill(F.one_hot(j, f.shape[1]).bool(), float("-inf"))
    return extra.amax(dim=1)


def _params_state(model):
    return [m.power_iterate.detach().clone() for _, m, _ in layer_specs(model)]


# -- Lipschitz-bound step ------------------------------------------------------------------
LIP_MODELS = pick(("6C2F", "LiResNet"), ("6C2F",))
LIP_ITERS = pick((1, 10), (10,))


# quick mode leaves out the model-level compile contenders (cold compiles take minutes)
MODEL_COMPILE = not QUICK


@pytest.mark.parametrize("contender", contenders(compile=MODEL_COMPILE))
@pytest.mark.parametrize("n_iter", LIP_ITERS)
@pytest.mark.parametrize("arch", LIP_MODELS)
def test_lipschitz_step(benchmark, arch, n_iter, contender):
    model = build(arch).train()
    specs = layer_specs(model)
    weights = [m.weight for _, m, _ in specs]
    iterates = _params_state(model)
    case = f"lipschitz step fwd+bwd {arch} n_iter={n_iter}"
    params = list(model.parameters())
    if contender == "compile" and n_iter > 1:
        record_skip(case, "compile", "a cold compile of the unrolled multi-iteration graph takes minutes on "
                    "2 cores; compile is measured at n_iter=1")

    if contender == "naive":
        def bound():
            return bound_naive(specs, weights, iterates, n_iter)
    elif contender in ("eager", "compile"):
        impl = make_bound_eager(specs)
        if contender == "compile":
            impl = compiled(("lipschitz", arch), impl)

        def bound():
            K, new = impl(weights, iterates, n_iter)
            iterates[:] = list(new)
            return K
    else:
        def bound():
            return model.body.lipschitz_bound(n_iter)

    def step():
        zero_grads(params)
        K = bound()
        K.backward()
        return K

    kw = dict(case=case, contender=label(contender), params={"model": arch, "n_iter": n_iter},
              size=sum(w.numel() for w in weights), extra={"op": "lipschitz_step", "mode": "fwd+bwd"})
    run_contender(benchmark, step, contender, BOUND_OPS, **kw)


# -- training step -------------------------------------------------------------------------
TRAIN_BATCH = pick(256, 32)
TRAIN_CONTENDERS = contenders(extra=("plain",), compile=MODEL_COMPILE)


@pytest.mark.parametrize("contender", TRAIN_CONTENDERS)
@pytest.mark.parametrize("arch", ("6C2F",))
def test_training_step(benchmark, arch, contender):
    model = build(arch).train()
    x, y = data(TRAIN_BATCH, model.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    eps = model.epsilon
    specs = layer_specs(model)
    weights = [m.weight for _, m, _ in specs]
    iterates = _params_state(model)

    if contender == "plain":
        def loss_fn():
            return F.cross_entropy(model.head(model.body(x)), y)
    elif contender == "naive":
        def loss_fn():
            f = model.head(model.body(x))
            K = bound_naive(specs, weights, iterates, NAIVE_ITERS)
            return _naive_trades(f, model.head.weight, K, y, eps)
    elif contender in ("eager", "compile"):
        bound_eager = make_bound_eager(specs)

        def eager_loss(x, y, weights, iterates):
            f = model.head(model.body(x))
            K, new = bound_eager(weights, iterates, model.n_iter)
            bottom = bottom_eager(f, margin_eager_distances(model.head.weight), K, eps)
            return losses.trades_loss(torch.cat([f, bottom.unsqueeze(1)], dim=1), y, lam=1.0), new

        impl = compiled(("train", arch), eager_loss) if contender == "compile" else eager_loss

        def loss_fn():
            loss, new = impl(x, y, weights, iterates)
            iterates[:] = list(new)
            return loss
    else:
        def loss_fn():
            out = model(x, parts=True)
            return losses.trades_loss(out.augmented, y, lam=1.0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss

    kw = dict(case=f"training step {arch} B={TRAIN_BATCH}", contender=label(contender),
              params={"model": arch, "B": TRAIN_BATCH}, size=TRAIN_BATCH,
              extra={"op": "training_step", "mode": "fwd+bwd+adam"}, min_rounds=TARGET_ROUNDS)
    run_contender(benchmark, step, contender, BOUND_OPS + MARGIN_OPS, **kw)


def _naive_trades(f, W, K, y, eps):
    """TRADES on the public-code ⊥ logit (B×C×d margins)."""
    kW = K * W
    j = f.argmax(dim=1)
    kW_ij = kW.index_select(0, j)[:, None, :] - kW[None]
    K_ij = torch.sqrt((kW_ij * kW_ij).sum(dim=-1) + 1e-30)
    y_bot_i = (f + eps * K_ij).masked_fill(F.one_hot(j, f.shape[1]).bool(), float("-inf"))
    bottom = y_bot_i.max(dim=1).values
    return losses.trades_loss(torch.cat([f, bottom.unsqueeze(1)], dim=1), y, lam=1.0)


# -- certification -------------------------------------------------------------------------
CERT_BATCH = 256


@pytest.mark.parametrize("contender", contenders(extra=("plain",), compile=MODEL_COMPILE))
@pytest.mark.parametrize("arch", ("6C2F",))
def test_certify(benchmark, arch, contender):
    model = build(arch).eval()
    x, _ = data(CERT_BATCH, model.num_classes)
    eps, C = model.epsilon, model.num_classes
    with torch.no_grad():
        K = model.lipschitz_constant().clone()  # converged once, as every contender caches it
        D = margin_eager_distances(model.head.weight.detach())

    def cert_eager(x, K, D):
        f = model.head(model.body(x))
        top = f.argmax(dim=1)
        certified = f.gather(1, top.unsqueeze(1)).squeeze(1) > bottom_eager(f, D, K, eps)
        return torch.where(certified, top, torch.full_like(top, C))

    if contender == "plain":
        def fn():
            with torch.no_grad():
                return model.head(model.body(x)).argmax(dim=1)
    elif contender == "naive":
        W = model.head.weight.detach()

        def fn():
            with torch.no_grad():
                f = model.head(model.body(x))
                top = f.argmax(dim=1)
                kW = K * W
                kW_ij = kW.index_select(0, top)[:, None, :] - kW[None]
                K_ij = torch.sqrt((kW_ij * kW_ij).sum(dim=-1))
                y_bot = (f + eps * K_ij).masked_fill(F.one_hot(top, C).bool(), float("-inf")).max(1).values
                certified = f.gather(1, top.unsqueeze(1)).squeeze(1) > y_bot
                return torch.where(certified, top, torch.full_like(top, C))
    elif contender in ("eager", "compile"):
        impl = compiled(("certify", arch), cert_eager) if contender == "compile" else cert_eager

        def fn():
            with torch.no_grad():
                return impl(x, K, D)
    else:
        def fn():
            return model.certify(x)

    kw = dict(case=f"certify {arch} B={CERT_BATCH}", contender=label(contender),
              params={"model": arch, "B": CERT_BATCH}, size=CERT_BATCH,
              extra={"op": "certify", "mode": "fwd"}, min_rounds=TARGET_ROUNDS)
    # converge and cache the bounds on this backend first (untimed)
    run_contender(benchmark, fn, contender, BOUND_OPS + MARGIN_OPS,
                  prepare=model.lipschitz_constant, **kw)


# -- convergence at evaluation ---------------------------------------------------------------
CONV_MODELS = pick(("6C2F", "LiResNet"), ("6C2F",))
MAX_ITER = 1000


def converge_loop(specs, weights, iterates, grad_enabled: bool):
    """Per layer: iterate until the relative change of σ̂ is ≤ TOL (host sync each step)."""
    K = 1.0
    with torch.set_grad_enabled(grad_enabled):
        for k, (kind, _, args) in enumerate(specs):
            w = weights[k] if grad_enabled else weights[k].detach()
            u = iterates[k]
            sigma = float(torch.linalg.vector_norm(_apply(kind, args, w, u)))
            for _ in range(MAX_ITER):
                if grad_enabled:  # public-code form: two normalisations, graph recorded
                    v = _apply(kind, args, w, u)
                    v = v / torch.linalg.vector_norm(v)
                    u = _adjoint(kind, args, w, v)
                    u = u / torch.linalg.vector_norm(u)
                else:
                    x = _adjoint(kind, args, w, _apply(kind, args, w, u))
                    u = x / torch.linalg.vector_norm(x)
                new = float(torch.linalg.vector_norm(_apply(kind, args, w, u)))
                done = abs(new - sigma) <= TOL * abs(new)
                sigma = new
                if done:
                    break
            K *= sigma
    return K


# compile: a data-dependent loop with a host sync per iteration, nothing to fuse across them
@pytest.mark.parametrize("contender", contenders(compile=False, naive=not QUICK))
@pytest.mark.parametrize("arch", CONV_MODELS)
def test_convergence(benchmark, arch, contender):
    model = build(arch).eval()
    specs = layer_specs(model)
    weights = [m.weight for _, m, _ in specs]
    start = _params_state(model)
    iterates = [u.clone() for u in start]

    def reset():
        iterates[:] = [u.clone() for u in start]
        with torch.no_grad():
            for (_, m, _), u in zip(specs, start):
                m.power_iterate.copy_(u)
        model.clear_bound_cache()

    if contender in ("naive", "eager"):
        grad = contender == "naive"

        def fn():
            return converge_loop(specs, weights, iterates, grad)
    else:
        def fn():
            return model.lipschitz_constant("estimate")

    kw = dict(case=f"convergence tol=1e-6 {arch}", contender=label(contender),
              params={"model": arch, "tol": TOL}, size=sum(w.numel() for w in weights),
              setup=reset, extra={"op": "convergence", "mode": "eval"})
    run_contender(benchmark, fn, contender, BOUND_OPS, **kw)


# -- paired rounds against the same network in torch.nn layers ----------------------------
# The targets of these cases are ratios near 1 (certify ≥ 0.97× the plain forward's
# throughput, a training step ≤ 1.05× the plain step's time), below a shared machine's
# drift: each runs as interleaved pairs (harness.run_paired). The plain network is the
# same body and head as torch.nn layers (gloro_fast.export.freeze's copy: nn.Conv2d with
# the padding folded in, nn.Linear, the same MinMax), with its own copy of the weights.
PAIRED_MODELS = {"6C2F": (cnn_6C2F, (3, 32, 32)), "2C2F": (cnn_2C2F, (1, 28, 28))}
PAIRS = pick(15, 5)


class UserMinMax(torch.nn.Module):
    """MinMax as a user writes it for training (differentiable): min and max of the channel
    halves, concatenated."""

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.minimum(a, b), torch.maximum(a, b)], dim=1)


def build_pair(arch, training=False):
    """The GloroNet and the same network in torch.nn layers (its own copy of the weights):
    gloro_fast.export.freeze's plain body (nn.Conv2d with the padding folded in, nn.Linear,
    MinMax writing one output) for inference; for training, with MinMax as a user writes it
    (the frozen one computes without autograd)."""
    from gloro_fast.export import MinMax, freeze

    make, shape = PAIRED_MODELS[arch]
    torch.manual_seed(0)
    model = make(input_shape=shape, num_classes=10).to(DEVICE, DTYPE)
    frozen = freeze(model.eval(), "estimate")
    # MinMax as torch.nn users have it: one output, in its input's layout (not the frozen
    # model's contiguous output before a flatten)
    layers = [(UserMinMax() if training else MinMax()) if isinstance(m, MinMax) else m for m in frozen.body]
    plain = torch.nn.Sequential(*layers, frozen.head).to(DEVICE, DTYPE)
    plain.requires_grad_(True)  # freeze() hands out constants
    return model, plain, shape


def paired_data(batch, shape):
    g = torch.Generator().manual_seed(1)
    x = torch.rand((batch,) + shape, generator=g).to(DEVICE, DTYPE)
    y = torch.randint(0, 10, (batch,), generator=g).to(DEVICE)
    return x, y


CERT_PAIRED = pick((("6C2F", 256), ("2C2F", 1024)), (("2C2F", 256),))


# the plain network as torch.nn runs it (NCHW), compiled, and in the channels_last layout a
# user can ask for (weights and input): on the CPU the certifying pass runs its convolutions
# channels_last (gloro_fast.nn.conv.channels_last), and Inductor picks layouts itself
CERT_BASELINES = (pytest.param(False, "nchw", id="eager"), pytest.param(True, "nchw", id="compile"),
                  pytest.param(False, "channels_last", id="eager-channels_last"))


@pytest.mark.parametrize("compile_,layout", CERT_BASELINES)
@pytest.mark.parametrize("arch,batch", CERT_PAIRED)
def test_certify_paired(benchmark, arch, batch, compile_, layout):
    where = "compile" if compile_ else "eager"
    if layout == "nchw":
        case, op = f"certify vs plain forward, paired, {arch} B={batch} {where}", "certify_paired"
    else:
        case, op = f"certify vs plain forward in channels_last, paired, {arch} B={batch} {where}", "certify_paired_cl"
    run_certify_pair(benchmark, arch, batch, compile_, layout, case, op)


# small and mid-size batches (one request, a few, a common evaluation batch of the small
# model): the targets name 6C2F B=256 and 2C2F B=1024; these record what the
# per-call work of the sound certificate costs where the forward is short (info rows)
CERT_SMALL = pick((("2C2F", 1), ("2C2F", 16), ("2C2F", 256), ("6C2F", 1), ("6C2F", 16)), (("2C2F", 1),))


@pytest.mark.parametrize("compile_", (False, True), ids=("eager", "compile"))
@pytest.mark.parametrize("arch,batch", CERT_SMALL)
def test_certify_small_batch_paired(benchmark, arch, batch, compile_):
    where = "compile" if compile_ else "eager"
    run_certify_pair(benchmark, arch, batch, compile_, "nchw",
                     f"certify vs plain forward, small batch, paired, {arch} B={batch} {where}",
                     "certify_small_paired")


def run_certify_pair(benchmark, arch, batch, compile_, layout, case, op):
    """Paired rounds of ``certify`` (sound, bounds cached) against the plain network's
    forward and argmax, eager or both compiled, the plain network in ``layout``."""
    model, plain, shape = build_pair(arch)
    model.eval()
    plain.eval()
    x, _ = paired_data(batch, shape)
    x_plain = x
    if layout == "channels_last":
        plain.to(memory_format=torch.channels_last)
        x_plain = channels_last(x)
    model.sound_bounds()  # cached once, as in any evaluation; compiled graphs take them as constants

    def forward(t):
        return plain(t).argmax(dim=1)

    certify, plain_fn = model.certify, forward
    if compile_:
        certify = torch.compile(model.certify, fullgraph=True)
        plain_fn = torch.compile(forward, fullgraph=True)

    def ours():
        return certify(x)

    def theirs():
        with torch.no_grad():
            return plain_fn(x_plain)

    where = "compile" if compile_ else "eager"
    run_paired(benchmark, ours, theirs, case=case, contender=f"gloro_fast sound [{where}]",
               params={"model": arch, "B": batch, "compiled": compile_, "layout": layout},
               size=batch, pairs=PAIRS, extra={"op": op, "mode": "fwd"})


TRAIN_PAIRED = pick((("6C2F", 256), ("6C2F", 32)), (("6C2F", 32),))


@pytest.mark.parametrize("compile_", (False, True), ids=("eager", "compile"))
@pytest.mark.parametrize("arch,batch", TRAIN_PAIRED)
def test_training_step_paired(benchmark, arch, batch, compile_):
    model, plain, shape = build_pair(arch, training=True)
    model.train()
    plain.train()
    x, y = paired_data(batch, shape)
    opt_ours = torch.optim.Adam(model.parameters(), lr=1e-4)
    opt_theirs = torch.optim.Adam(plain.parameters(), lr=1e-4)

    def gloro_loss(a, b):
        return losses.trades_loss(model(a, parts=True).augmented, b, lam=1.0)

    def plain_loss(a, b):
        return F.cross_entropy(plain(a), b)

    if compile_:
        gloro_loss = torch.compile(gloro_loss, fullgraph=True)
        plain_loss = torch.compile(plain_loss, fullgraph=True)

    def stepper(loss_fn, opt):
        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(x, y)
            loss.backward()
            opt.step()
            return loss
        return step

    where = "compile" if compile_ else "eager"
    run_paired(benchmark, stepper(gloro_loss, opt_ours), stepper(plain_loss, opt_theirs),
               case=f"training step vs plain, paired, {arch} B={batch} {where}",
               contender=f"gloro_fast TRADES [{where}]", params={"model": arch, "B": batch, "compiled": compile_},
               size=batch, pairs=PAIRS, extra={"op": "training_paired", "mode": "fwd+bwd+adam"})
