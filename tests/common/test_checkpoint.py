"""Checkpoint tools: bit-exact round trips, export that transformers loads, and clear errors on bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from common import checkpoint as ckpt
from common.checkpoint_split import export_hf, split
from common.io import read_tensors
from common.model import ModelArgs, load_model
from common.parallel import setup
from tests.common.hf_oracle import tiny_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral"])
def test_hf_to_meta_to_hf_is_bit_exact(family):
    hf = tiny_hf_model(family)
    args = ModelArgs.from_hf_config(hf.config.to_dict())
    original = {k: v for k, v in hf.state_dict().items()}
    back = ckpt.meta_to_hf(ckpt.hf_to_meta(original, args), args)
    if family == "mixtral":  # in memory transformers 5 fuses experts; meta_to_hf writes save_pretrained's per-expert names
        meta = ckpt.hf_to_meta(original, args)
        original, back = meta, ckpt.hf_to_meta(ckpt.meta_to_hf(meta, args), args)
        assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in ckpt.meta_to_hf(meta, args)
    if family == "qwen2":  # tied: lm_head is the embedding
        original = {k: v for k, v in original.items() if k != "lm_head.weight"}
        back = {k: v for k, v in back.items() if k != "lm_head.weight"}
    assert same(original, back)


def test_permutation_pairs_rotate_half_dims_into_adjacent_ones():
    hd, n_heads = 8, 2
    w = torch.arange(n_heads * hd, dtype=torch.float32)[:, None]  # row index as value
    meta = ckpt.permute_hf_to_meta(w, n_heads, hd)
    # Meta row h*hd + 2i + c is HF row h*hd + c*hd/2 + i
    for h in range(n_heads):
        for i in range(hd // 2):
            for c in range(2):
                assert meta[h * hd + 2 * i + c, 0] == h * hd + c * hd // 2 + i


def test_split_merge_and_resplit_1_2_1_are_bit_exact(tmp_path):
    hf = tiny_hf_model("mixtral")
    hf.save_pretrained(tmp_path / "hf")
    split(str(tmp_path / "hf"), str(tmp_path / "a1"), n=1)
    split(str(tmp_path / "a1"), str(tmp_path / "a2"), n=2)
    split(str(tmp_path / "a2"), str(tmp_path / "b1"), n=1)
    one = read_tensors(str(tmp_path / "a1" / "consolidated.00.pth"))
    assert same(one, read_tensors(str(tmp_path / "b1" / "consolidated.00.pth")))
    two = [read_tensors(p) for p in ckpt.shard_paths(str(tmp_path / "a2"))]
    assert same(ckpt.merge_state_dicts(two), one)
    assert two[0]["layers.0.attention.wq.weight"].shape[0] * 2 == one["layers.0.attention.wq.weight"].shape[0]
    assert torch.equal(two[1]["layers.0.feed_forward.gate.weight"], one["layers.0.feed_forward.gate.weight"])
    assert json.load(open(tmp_path / "a2" / "params.json")) == json.load(open(tmp_path / "a1" / "params.json"))


def test_seed_command_line_splits_under_python_m(tmp_path):
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes(b"stand-in tokenizer file")
    cmd = [sys.executable, "-m", "common.checkpoint_split", "--ckpt_file", str(tmp_path / "hf"),
           "--save_path", str(tmp_path / "out"), "--n", "2"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["consolidated.00.pth", "consolidated.01.pth", "generation_config.json",
                                                 "params.json", "tokenizer.model"]


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2", "mixtral"])
def test_export_then_from_pretrained_gives_our_logits(tmp_path, family):
    setup()
    tiny_hf_model(family, seed=3).save_pretrained(tmp_path / "hf")
    split(str(tmp_path / "hf"), str(tmp_path / "ours"), n=2)  # export merges shards
    export_hf(str(tmp_path / "ours"), str(tmp_path / "exported"))
    split(str(tmp_path / "ours"), str(tmp_path / "ours1"), n=1)
    ours = load_model(str(tmp_path / "ours1"), max_seq_len=32, max_batch_size=2)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported")).float().eval()
    tokens = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, atol=1e-4, rtol=0)


def test_shards_sort_numerically_including_old_names(tmp_path):
    for i in (0, 2, 10, 1):
        (tmp_path / f"consolidated.0{i}.pth").write_bytes(b"")
    names = [os.path.basename(p) for p in ckpt.shard_paths(str(tmp_path))]
    assert names == ["consolidated.00.pth", "consolidated.01.pth", "consolidated.02.pth", "consolidated.010.pth"]


# ---------------------------------------------------------------------------- bad input

def test_shard_count_differing_from_tp_size_names_dir_and_fix(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path / "hf")
    split(str(tmp_path / "hf"), str(tmp_path / "tp2"), n=2)
    with pytest.raises(ValueError, match=r"holds 2 shards but the tensor-parallel size is 1.*--nproc_per_node 2"):
        ckpt.load_shard(str(tmp_path / "tp2"), 0, 1)


def test_params_json_missing_a_field_names_file_and_field(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2}))
    with pytest.raises(ValueError, match=r"params\.json is missing the field\(s\) \['n_heads'\]"):
        ModelArgs.from_params_json(str(tmp_path / "params.json"))


def test_head_count_not_divisible_by_n_is_refused(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path / "hf")  # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match=r"n_kv_heads=2 is not divisible by n=4"):
        split(str(tmp_path / "hf"), str(tmp_path / "out"), n=4)


def test_vocab_not_divisible_by_n_names_parameter_and_valid_n(tmp_path):
    tiny_hf_model("llama", vocab_size=130).save_pretrained(tmp_path / "hf")
    state = ckpt.read_checkpoint(str(tmp_path / "hf"))[0]
    with pytest.raises(ValueError, match=r"output\.weight of shape \(130, 64\) cannot be split in 4.*valid n: \[1, 2\]"):
        ckpt.split_state_dict(state, 4, source="hf")


def test_lora_weights_are_refused_by_split(tmp_path):
    torch.save({"layers.0.attention.lora_a_wq.weight": torch.zeros(2, 4)}, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match="merge LoRA first"):
        split(str(tmp_path / "consolidated.00.pth"), str(tmp_path / "out"), n=1)


def test_sharded_hf_folder_and_several_files_read_like_one(tmp_path):
    hf = tiny_hf_model("qwen2")
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    parts = sorted(str(p) for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(parts) > 1
    whole = ckpt.read_checkpoint(str(tmp_path / "one"))[0]
    assert same(ckpt.read_checkpoint(str(tmp_path / "sharded"))[0], whole)
    assert same(ckpt.read_checkpoint(",".join(parts))[0], whole)  # several files, config.json beside them


# ---------------------------------------------------------------------------- atomic in-place re-split and export

def file_bytes(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_interrupted_in_place_resplit_leaves_the_original_checkpoint_whole(tmp_path, monkeypatch):
    tiny_hf_model("llama").save_pretrained(tmp_path / "hf")
    split(str(tmp_path / "hf"), str(tmp_path / "ckpt"), n=1)
    (tmp_path / "ckpt" / "notes.txt").write_text("kept")
    before, merged = file_bytes(tmp_path / "ckpt"), ckpt.read_native(str(tmp_path / "ckpt"))[0]
    real_save, calls = ckpt.atomic_save, []

    def save_then_fail(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # mid-way: the first of the two new shards is on disk
        real_save(obj, path)
    monkeypatch.setattr(ckpt, "atomic_save", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        split(str(tmp_path / "ckpt"), str(tmp_path / "ckpt"), n=2)
    assert len(calls) == 2
    assert file_bytes(tmp_path / "ckpt") == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf"]  # nothing left beside it
    assert same(ckpt.load_shard(str(tmp_path / "ckpt"), 0, 1), merged)  # loadable as before


def test_completed_in_place_resplit_keeps_the_weights_and_the_other_files(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes(b"stand-in tokenizer file")
    split(str(tmp_path / "hf"), str(tmp_path / "ckpt"), n=2)
    (tmp_path / "ckpt" / "notes.txt").write_text("kept")
    merged = ckpt.read_native(str(tmp_path / "ckpt"))[0]
    split(str(tmp_path / "ckpt"), str(tmp_path / "ckpt"), n=1)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["consolidated.00.pth", "generation_config.json", "notes.txt",
                                                     "params.json", "tokenizer.model"]
    assert same(ckpt.read_tensors(str(tmp_path / "ckpt" / "consolidated.00.pth")), merged)
    assert (tmp_path / "ckpt" / "tokenizer.model").read_bytes() == b"stand-in tokenizer file"
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf"]


def test_interrupted_export_leaves_no_config_so_the_folder_is_not_loadable(tmp_path, monkeypatch):
    tiny_hf_model("llama").save_pretrained(tmp_path / "hf")
    split(str(tmp_path / "hf"), str(tmp_path / "ckpt"), n=1)

    def fail(obj, path):
        raise KeyboardInterrupt
    monkeypatch.setattr(ckpt, "atomic_save", fail)
    with pytest.raises(KeyboardInterrupt):
        export_hf(str(tmp_path / "ckpt"), str(tmp_path / "exported"))
    assert not (tmp_path / "exported" / "config.json").exists()
    monkeypatch.undo()
    export_hf(str(tmp_path / "ckpt"), str(tmp_path / "exported"))
    assert [p.name for p in (tmp_path / "exported").iterdir() if ".tmp." in p.name] == []
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == tiny_hf_model("llama").config.num_hidden_layers
