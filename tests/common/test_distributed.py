"""common.distributed: DP-only process setup in 2 real gloo processes, never touching fairscale."""
import sys

import pytest
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


def test_keyed_seed_is_rank_seed_for_those_keys():
    from common.distributed import keyed_seed
    assert keyed_seed(1, 3, 0) == rank_seed(1, 3, 0) and keyed_seed(1, 3, 1) != keyed_seed(1, 31)


def _peer_worker(env, outcome, out):
    """Rank 1 ends (or stops taking part) before rank 0's all-reduce; rank 0 reports what it saw."""
    import os
    import time

    from common import distributed as D

    os.environ.update(env)
    lay = D.setup()
    D.set_timeout(3)
    if lay.rank == 1:
        if outcome == "ended":
            os._exit(0)
        time.sleep(600)             # alive, but never answers (the test kills it once rank 0 has ended)
        os._exit(0)
    t0 = time.monotonic()
    try:
        torch.distributed.all_reduce(torch.ones(1))
        seen = None
    except RuntimeError as e:
        seen = e
    result = dict(failed=seen is not None, peer=D.peer_failure(seen) if seen else False, seconds=time.monotonic() - t0,
                  bug=D.peer_failure(RuntimeError("shape mismatch")))
    torch.save(result, out)
    os._exit(0)                   # the group holds a dead or silent peer: no teardown


@pytest.mark.parametrize("outcome", ["ended", "silent"])
def test_a_collective_with_an_ended_or_silent_peer_fails_as_a_peer_failure_within_set_timeout(tmp_path, outcome):
    import multiprocessing as mp

    from tests.distributed import rendezvous_env
    with rendezvous_env(2) as env:
        procs = [mp.get_context("spawn").Process(target=_peer_worker, args=(
            dict(env, RANK=str(r), LOCAL_RANK=str(r)), outcome, str(tmp_path / "rank0.pt"))) for r in range(2)]
        try:
            for p in procs:
                p.start()
            procs[0].join(600)
        finally:
            for p in procs:
                if p.exitcode is None:
                    p.kill()
                    p.join()
    got = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert got["failed"] and got["peer"] and not got["bug"], got
    if outcome == "silent":
        assert 2 < got["seconds"] < 300, got       # set_timeout(3), not gloo's default of 30 min
