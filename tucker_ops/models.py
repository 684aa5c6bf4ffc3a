"""The thesis network (a LeNet-style MNIST classifier) and the ranks the thesis chose for it.

``compress(ThesisNet(), ranks=thesis_ranks())`` reproduces the slides' "Net after":

=======  =========================================================================
conv1    Conv2d(1, 2, 5, padding=2, bias=False) → Conv2d(2, 16, 1)
conv2    Conv2d(16, 8, 1, bias=False) → Conv2d(8, 4, 5, bias=False) → Conv2d(4, 32, 1)
l1       Linear(800, 40, bias=False) → Linear(40, 200, bias=False) → Linear(200, 120)
l2       Linear(120, 30, bias=False) → Linear(30, 84)
l_out    Linear(84, 10) (left dense)
=======  =========================================================================

Parameter counts: 120,382 before, 72,360 after. The slides' table says 59,560
after. The 12,800 difference is l1's output-side rank 200, larger than its mode
size 120: the decomposition zero-pads those 80 extra ranks (80·40 core entries
plus 120·80 entries of the last factor, all exactly zero). 59,560 is what l1
costs at rank 120, i.e. the count of parameters that are not forced to zero;
the printed shapes really hold 72,360.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ThesisNet", "thesis_ranks"]


class ThesisNet(nn.Module):
    """The thesis's MNIST network: 120,382 parameters.

    Layers: ``conv1`` Conv2d(1, 16, 5, padding=2), ``conv2`` Conv2d(16, 32, 5),
    ``pool`` AvgPool2d(2, 2), ``dropout1`` Dropout(0.2), ``dropout2`` Dropout2d(0.2),
    ``l1`` Linear(800, 120), ``l2`` Linear(120, 84), ``l_out`` Linear(84, 10).

    Forward, for input ``(N, 1, 28, 28)`` → logits ``(N, 10)``::

        conv1 → relu → pool        (N, 16, 14, 14)
        conv2 → relu → pool        (N, 32, 5, 5)
        dropout2 (channel dropout on the conv features)
        flatten                    (N, 800)
        l1 → relu → dropout1       (N, 120)
        l2 → relu                  (N, 84)
        l_out                      (N, 10)
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, padding=2)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.pool = nn.AvgPool2d(2, 2)
        self.dropout1 = nn.Dropout(0.2)
        self.dropout2 = nn.Dropout2d(0.2)
        self.l1 = nn.Linear(800, 120)
        self.l2 = nn.Linear(120, 84)
        self.l_out = nn.Linear(84, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = self.dropout2(x)
        x = x.flatten(1)
        x = self.dropout1(F.relu(self.l1(x)))
        x = F.relu(self.l2(x))
        return self.l_out(x)


def thesis_ranks() -> dict[str, tuple[int | None, int | None]]:
    """The thesis's ranks in chain order ``(r_in, r_out)``, for ``compress(..., ranks=...)``.

    conv1: Tucker-1 on the output side, r_out = 2. conv2: Tucker-2, (8, 4).
    l1: Tucker-2, (40, 200) (r_out above the 120 outputs; see the module notes).
    l2: Tucker-1, r_out = 30. l_out is not listed, so it stays dense.
    """
    return {"conv1": (None, 2), "conv2": (8, 4), "l1": (40, 200), "l2": (None, 30)}
