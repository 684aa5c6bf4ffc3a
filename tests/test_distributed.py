"""DistributedDataParallel over a compressed model: 2 gloo processes equal one process on the global batch.

Two processes (torch.multiprocessing.spawn, gloo on 127.0.0.1 and a free port)
each train a copy of the same Tucker model on half of every global batch; after
each SGD step their gradients (averaged by DDP) and parameters must equal those
of a single process that trains on the whole batch. float64 keeps the only
difference, the order of the gradient sum, far below the tolerance.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tucker_ops import TuckerConv2d, TuckerLinear

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        TuckerConv2d(3, 8, 3, (None, 4), padding=1, bias=False),
        nn.ReLU(),
        TuckerConv2d(8, 8, 3, (4, 3), padding="same", dilation=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        TuckerLinear(32, 10, (6, 5)),
    ).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(GLOBAL_BATCH, 3, 9, 9, generator=gen, dtype=torch.float64), torch.randint(0, 10, (GLOBAL_BATCH,), generator=gen))
        for _ in range(STEPS)
    ]


def _train(model: nn.Module, batches, shard: slice) -> list[dict[str, list[torch.Tensor]]]:
    """Per step: the gradients after backward and the parameters after the SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    history = []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[shard]), y[shard]).backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        opt.step()
        history.append({"grads": grads, "params": [p.detach().clone() for p in model.parameters()]})
    return history


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on a shared machine
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        per_rank = GLOBAL_BATCH // WORLD
        history = _train(model, _batches(), slice(rank * per_rank, (rank + 1) * per_rank))
        torch.save(history, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available")
def test_ddp_two_processes_equal_single_process_on_global_batch(tmp_path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    single = _train(_model(), _batches(), slice(None))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for step in range(STEPS):
        for key in ("grads", "params"):
            for i, want in enumerate(single[step][key]):
                # Every rank holds the same (all-reduced) values, equal to the single-process run.
                assert torch.equal(ranks[0][step][key][i], ranks[1][step][key][i]), (step, key, i)
                torch.testing.assert_close(ranks[0][step][key][i], want, rtol=1e-12, atol=1e-14, msg=f"{step} {key} {i}")
    # The run must move the weights, or equality would be trivial.
    assert not torch.allclose(single[-1]["params"][0], _model().state_dict()["0.core"])
