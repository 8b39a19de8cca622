"""common.distributed: DP-only process setup in 2 real gloo processes, never touching fairscale."""
import sys

import torch

from common.distributed import rank_seed
from tests.distributed import run_distributed


def _dp_worker():
    from common import distributed as D

    lay = D.setup(seed=5)
    same_init = torch.rand(3)  # the same seed on every rank
    gen = torch.Generator().manual_seed(D.rank_seed(5, step=7, dp_rank=lay.dp_rank))
    sample = torch.multinomial(torch.ones(1000), 8, generator=gen)
    total = D.all_reduce_dp(torch.tensor([float(lay.rank + 1)]))
    gathered = D.gather_object({"rank": lay.rank, "rows": list(range(lay.rank + 1))}, lay)
    everywhere = D.gather_object(lay.rank * 10, lay, everywhere=True)
    fs = sys.modules.get("fairscale.nn.model_parallel.initialize")
    D.shutdown()
    return {"layout": [lay.rank, lay.world_size, lay.tp_rank, lay.tp_size, lay.dp_rank, lay.dp_size],
            "init": same_init, "sample": sample, "total": total, "gathered": gathered, "everywhere": everywhere,
            "fairscale_imported": fs is not None, "destroyed": not torch.distributed.is_initialized()}


def test_two_process_data_parallel_setup_seeds_gathers_and_sums_without_fairscale():
    r0, r1 = run_distributed(_dp_worker, 2)
    assert r0["layout"] == [0, 2, 0, 1, 0, 2] and r1["layout"] == [1, 2, 0, 1, 1, 2]
    assert torch.equal(r0["init"], r1["init"])
    assert not torch.equal(r0["sample"], r1["sample"])  # sampling differs between DP ranks
    assert r0["total"].item() == r1["total"].item() == 3.0
    assert r0["gathered"] == [{"rank": 0, "rows": [0]}, {"rank": 1, "rows": [0, 1]}] and r1["gathered"] is None
    assert r0["everywhere"] == r1["everywhere"] == [0, 10]
    assert not r0["fairscale_imported"] and not r1["fairscale_imported"]
    assert r0["destroyed"] and r1["destroyed"]


def test_rank_seed_depends_only_on_seed_step_and_dp_rank():
    seeds = {rank_seed(1, step, rank) for step in range(50) for rank in range(4)}
    assert len(seeds) == 200 and all(0 <= s < 2**62 for s in seeds)
    assert rank_seed(1, 3, 0) == rank_seed(1, 3, 0) != rank_seed(2, 3, 0)
