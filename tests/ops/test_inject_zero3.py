"""`embed_and_inject` on a real DeepSpeed ZeRO-3 engine, where the token table is partitioned.

Runs as a script in a subprocess: it initialises a (single-rank, gloo) process group, which must
not leak into the rest of the suite.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest


def run_check() -> None:
    import deepspeed
    import torch

    from llara_dist.ops import embed_and_inject
    from llara_dist.ops.inject import _fusable

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)

    class Injector(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(50, 16)
            self.embed.weight.requires_grad_(False)  # frozen, like the LLM's token table
            self.projector = torch.nn.Linear(4, 16)

        def forward(self, ids, slots, items):
            return embed_and_inject(self.embed, ids, slots, self.projector(items))

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_force_ds_cpu_optimizer": False,
    }
    model = Injector()
    full_table = model.embed.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    table = engine.module.embed.weight
    assert table.numel() == 0 and table.ds_numel == 50 * 16, "the table should be partitioned"
    assert not _fusable(engine.module.embed)

    ids = torch.randint(0, 50, (2, 8))
    slots = torch.tensor([[0, -1, 1, -1, -1, 2, -1, -1], [-1, 2, -1, -1, 0, -1, -1, -1]])
    items = torch.randn(3, 4)
    out = engine(ids, slots, items)
    with deepspeed.zero.GatheredParameters(list(engine.module.projector.parameters())):
        rows = engine.module.projector(items).detach()
    expected = full_table[ids]
    expected[slots >= 0] = rows[slots[slots >= 0]]
    assert torch.allclose(out, expected), "ZeRO-3 output differs"
    loss = out.pow(2).sum()
    engine.backward(loss)
    engine.step()
    print("ok  zero3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_embed_and_inject_under_zero3():
    pytest.importorskip("deepspeed")
    env = dict(os.environ, DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "ok  zero3" in result.stdout, result.stdout + result.stderr


if __name__ == "__main__":
    run_check()
