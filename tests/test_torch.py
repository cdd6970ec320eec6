"""Step for step against PyTorch autograd, where torch happens to be installed.

torch is never a dependency of cnntrain: without it these tests are skipped, not failed.
Real MNIST digits are used on purpose: their blank background makes exact ties inside
pooling windows common, which is where tie-breaking bugs show.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from cnntrain.data.batches import iterate_batches  # noqa: E402
from cnntrain.data.datasets import load_dataset  # noqa: E402
from cnntrain.engine.loss import softmax_cross_entropy  # noqa: E402
from cnntrain.engine.model import build_model  # noqa: E402
from cnntrain.engine.optim import SGD  # noqa: E402
from test_engine import LENET  # noqa: E402


class TorchLeNet(nn.Module):
    """The seed network with cnntrain's parameter names, so state_dicts match."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv3 = nn.Conv2d(6, 16, 5)
        self.ff5 = nn.Linear(400, 120)
        self.ff6 = nn.Linear(120, 84)
        self.output = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        x = F.relu(self.ff5(x.flatten(1)))
        return self.output(F.relu(self.ff6(x)))


@pytest.fixture(scope="module")
def batches():
    data = load_dataset("mnist-sample")
    it = iterate_batches(data.train_images[:160], data.train_labels[:160], 32, np.float64)
    return list(it)


def test_checkpoint_arrays_load_as_a_pytorch_state_dict(batches):
    model = build_model(LENET, (1, 28, 28), "float32", np.random.default_rng(0))
    net = TorchLeNet()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in model.params().items()})
    x = batches[0][0].astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.forward(x, train=False), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 5e-4)])
def test_sgd_steps_match_pytorch_in_float64(batches, momentum, weight_decay):
    model = build_model(LENET, (1, 28, 28), "float64", np.random.default_rng(1))
    net = TorchLeNet().double()
    net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in model.params().items()})
    opt_t = torch.optim.SGD(net.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    opt = SGD(model.params(), model.grads(), 0.05, momentum, weight_decay)
    for x, y in batches:
        loss, _ = model.loss(x, y)
        opt.step()
        opt_t.zero_grad()
        loss_t = F.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
        loss_t.backward()
        opt_t.step()
        assert loss == pytest.approx(loss_t.item(), rel=1e-10)
    for name, param in net.state_dict().items():
        np.testing.assert_allclose(model.params()[name], param.numpy(), rtol=1e-9, atol=1e-12,
                                   err_msg=name)


def test_loss_matches_pytorch_cross_entropy():
    rng = np.random.default_rng(2)
    logits, labels = rng.standard_normal((7, 10)) * 5, rng.integers(0, 10, 7)
    t = torch.from_numpy(logits).requires_grad_()
    ref = F.cross_entropy(t, torch.from_numpy(labels))
    ref.backward()
    loss, dlogits, _ = softmax_cross_entropy(logits, labels)
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(dlogits, t.grad.numpy(), rtol=1e-12, atol=1e-15)
