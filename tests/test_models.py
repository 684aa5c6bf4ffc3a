"""ThesisNet and thesis_ranks: the exact network and ranks of the thesis."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tucker_ops.compress import compress
from tucker_ops.models import ThesisNet, thesis_ranks

NET_BEFORE = """ThesisNet(
  (conv1): Conv2d(1, 16, kernel_size=(5, 5), stride=(1, 1), padding=(2, 2))
  (conv2): Conv2d(16, 32, kernel_size=(5, 5), stride=(1, 1))
  (pool): AvgPool2d(kernel_size=2, stride=2, padding=0)
  (dropout1): Dropout(p=0.2, inplace=False)
  (dropout2): Dropout2d(p=0.2, inplace=False)
  (l1): Linear(in_features=800, out_features=120, bias=True)
  (l2): Linear(in_features=120, out_features=84, bias=True)
  (l_out): Linear(in_features=84, out_features=10, bias=True)
)"""


def test_thesis_net_layers_and_parameter_count():
    net = ThesisNet()
    assert repr(net) == NET_BEFORE
    assert sum(p.numel() for p in net.parameters()) == 120_382


def test_thesis_net_forward_shapes_and_dropout_placement():
    torch.manual_seed(0)
    net = ThesisNet().eval()
    x = torch.randn(4, 1, 28, 28)
    y = net(x)
    assert y.shape == (4, 10)
    assert torch.equal(y, net(x))  # eval: dropout off, deterministic
    seen = []
    hooks = [getattr(net, n).register_forward_hook(lambda m, a, o, n=n: seen.append((n, tuple(a[0].shape)))) for n in ("dropout2", "dropout1", "l_out")]
    net(x)
    for h in hooks:
        h.remove()
    # Channel dropout acts on the conv features, plain dropout after l1.
    assert seen == [("dropout2", (4, 32, 5, 5)), ("dropout1", (4, 120)), ("l_out", (4, 84))]
    net.train()
    assert net(x).shape == (4, 10)


def test_thesis_ranks():
    assert thesis_ranks() == {"conv1": (None, 2), "conv2": (8, 4), "l1": (40, 200), "l2": (None, 30)}
    assert "l_out" not in thesis_ranks()


def test_slides_parameter_gap_is_l1_zero_padding():
    """72,360 parameters in the printed shapes; 59,560 of them are not forced to zero."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="r_out=200 exceeds"):
        model, report = compress(ThesisNet(), ranks=thesis_ranks())
    assert report.params_after == 72_360
    l1 = model.l1
    assert torch.count_nonzero(l1.core[120:]) == 0 and torch.count_nonzero(l1.last[:, 120:]) == 0
    padded = l1.core[120:].numel() + l1.last[:, 120:].numel()
    assert padded == 12_800
    assert report.params_after - padded == 59_560
    assert isinstance(model.l_out, nn.Linear)
