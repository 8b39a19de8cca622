"""common.training: DP sharding, and checkpoints that survive an interrupted save."""
import os

import torch

from common.model import ModelArgs, Transformer, mark_only_lora_trainable
from common.parallel import setup
from common.training import dp_shard, load_latest_checkpoint, save_checkpoint


def test_dp_shard_gives_every_rank_the_same_count_and_covers_all_items():
    items = list(range(7))
    shards = [dp_shard(items, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    assert set().union(*shards) == set(items)
    assert dp_shard(items, 0, 1) == items


def small_model():
    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32, hidden_dim=32, lora_rank=2))
    with torch.no_grad():  # base weights normally come from a checkpoint
        for name, p in model.named_parameters():
            if "lora_" not in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    mark_only_lora_trainable(model)
    return model


def test_resume_restores_weights_optimizer_and_state_and_ignores_an_interrupted_save(tmp_path):
    lay = setup()
    model = small_model()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randint(0, 32, (1, 4))).sum().backward()
    optimizer.step()
    save_checkpoint(str(tmp_path), model, optimizer, lay, {"step": 1, "epoch": 0, "position": 1})
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # a later save that died before its commit marker (state.json) was written
    partial = tmp_path / "checkpoints" / "step-00000002"
    partial.mkdir()
    torch.save({"garbage": torch.zeros(1)}, partial / "consolidated.00.pth")

    fresh = small_model()
    fresh_opt = torch.optim.Adam([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    state = load_latest_checkpoint(str(tmp_path), fresh, fresh_opt, lay)
    assert state["step"] == 1 and state["position"] == 1
    assert all(torch.equal(p, saved[n]) for n, p in fresh.named_parameters() if p.requires_grad)
    assert fresh_opt.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]

    save_checkpoint(str(tmp_path), model, optimizer, lay, {"step": 3, "epoch": 0, "position": 3})
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000002", "step-00000003"]  # older complete one pruned
    assert load_latest_checkpoint(str(tmp_path / "nothing"), fresh, fresh_opt, lay) is None


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    from common.training import epoch_order

    a = epoch_order(50, 3, 0)
    assert sorted(a) == list(range(50)) and a == epoch_order(50, 3, 0)
    assert a != epoch_order(50, 3, 1) and a != epoch_order(50, 4, 0) and a != epoch_order(50, 3, "refit-0-0")


def test_adamw_decays_matrices_only_and_skips_frozen_parameters():
    from common.training import adamw

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    model[2].weight.requires_grad_(False)
    opt = adamw(model, 1e-3, 0.1, betas=(0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [(3, 4)] and decay["weight_decay"] == 0.1
    assert [p.shape for p in no_decay["params"]] == [(3,), (3,), (3,), (2,)] and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.9, 0.95)
