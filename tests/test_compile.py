"""torch.compile of a GloroNet training step matches eager, forward and backward."""
import copy

import torch

import gloro_fast as gf
from gloro_fast import nn as gnn


def _model():
    torch.manual_seed(0)
    body = gnn.Sequential(gnn.Conv2d(1, 4, 3, stride=2, padding="same"), gnn.MinMax(), gnn.Flatten(),
                          gnn.Linear(4 * 4 * 4, 16), gnn.MinMax())
    return gf.GloroNet(body, gnn.Linear(16, 5), epsilon=0.2, input_shape=(1, 8, 8))


def _step(model, x, y):
    out = model(x, parts=True)
    loss = gf.losses.trades_loss(out.augmented, y, lam=1.0)
    loss.backward()
    return out.augmented.detach(), loss.detach()


def test_compiled_training_step_matches_eager():
    eager = _model()
    compiled_model = copy.deepcopy(eager)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 5, (8,))
    ref_out, ref_loss = _step(eager, x, y)
    out, loss = _step(torch.compile(compiled_model), x, y)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # the compiled step advanced the power iteration exactly like the eager one
    for (name, b), c in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)
