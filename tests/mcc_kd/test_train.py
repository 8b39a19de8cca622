"""MCC-KD training: the span KL and CE inside train_mcc against the spec formula, per-item pairs, TP/DP batch
placement, and bit-exact resume after a kill."""
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from common.checkpoint import merge_state_dicts
from common.checkpoint_split import split
from common.io import read_tensors
from common.training import latest_checkpoint
from common.model import load_model
from common.parallel import layout, setup
from common.tokenizer import load_tokenizer
from mcc_kd.data import IGNORE_INDEX, DataError, load_task_file
from mcc_kd.prepare_data import filter_file
from mcc_kd.train import choose, epoch_plan
from mcc_kd.train_mcc import mcc_batch, mcc_loss
from tests.distributed import run_distributed
from tests.mcc_kd.conftest import sharp_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "data", "SVAMP")


def cfg(**kw):
    base = dict(seed=1, max_seq_len=192, max_batch_size=3, accumulation_steps=2, shuffle=False, T=1.3, alpha=0.01,
                chat_template=False, indices="logits", config_file=None)
    return SimpleNamespace(**{**base, **kw})


def reference_losses(logits, labels, spans_a, spans_b, T):
    """mcc_kd.md §1 / losses.md §4.1 in float64, written out: item-mean CE; per item the mean over its span
    tokens of ½[KL(qa‖qb) + KL(qb‖qa)] with q = softmax(z / T), then the mean over items."""
    z = logits.double()
    n = spans_a.shape[0]
    ce = []
    for row in range(z.shape[0]):
        pos = (labels[row] != IGNORE_INDEX).nonzero().flatten()
        nll = [-torch.log_softmax(z[row, t], -1)[labels[row, t]] for t in pos]
        ce.append(sum(nll) / len(nll))
    kl = []
    for b in range(n):
        (sa, ea), (sb, _) = spans_a[b].tolist(), spans_b[b].tolist()
        terms = []
        for k in range(ea - sa):
            pa = torch.softmax(z[b, sa + k] / T, -1)
            pb = torch.softmax(z[n + b, sb + k] / T, -1)
            terms.append(0.5 * ((pa * (pa.log() - pb.log())).sum() + (pb * (pb.log() - pa.log())).sum()))
        kl.append(sum(terms) / len(terms))
    return sum(ce) / len(ce), sum(kl) / len(kl)


def test_span_kl_and_ce_inside_train_mcc_match_the_formula(tiny):
    tok, items, model = sharp_tiny_model(tiny)
    c = cfg()
    batch = mcc_batch(items, [0, 1, 2], epoch=0, tokenizer=tok, cfg=c)
    # hand check of the convention: the logit positions in `indices` predict the answer tokens
    for b, item_id in enumerate([0, 1, 2]):
        for spans, row in ((batch["spans_a"], b), (batch["spans_b"], 3 + b)):
            start, end = spans[b].tolist()
            answer = tok.decode(batch["tokens"][row, start + 1:end + 1].tolist())
            assert answer.replace(",", "").strip() == items[item_id]["label"].replace(",", "").strip()
    norms = {k: float(v) for k, v in batch["counts"].items()}
    loss, parts, _ = mcc_loss(model, batch, norms, c)  # the head on the rows each loss reads, in chunks
    with torch.no_grad():
        logits = model(batch["tokens"])  # the plain forward's full logits
    ce, kl = reference_losses(logits, batch["labels"], batch["spans_a"], batch["spans_b"], c.T)
    assert kl > 1e-3
    torch.testing.assert_close(parts["kl"].double(), kl, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(parts["ce"].double(), ce, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss.double(), ce + c.alpha * kl, atol=1e-5, rtol=1e-4)


def test_rationale_pairs_are_drawn_per_item_and_redrawn_per_epoch():
    pairs = [tuple(choose(10, 2, seed=1, epoch=0, item=i)) for i in range(20)]
    assert all(i != j for i, j in pairs)
    assert len(set(pairs)) > 10  # not one pair index for the whole batch (upstream bug)
    assert pairs != [tuple(choose(10, 2, seed=1, epoch=1, item=i)) for i in range(20)]
    assert pairs == [tuple(choose(10, 2, seed=1, epoch=0, item=i)) for i in range(20)]  # reproducible on resume


def test_mcc_batch_uses_the_chosen_rationales_and_their_spans(tiny):
    tok = load_tokenizer(str(tiny / "ckpt" / "tokenizer.model"))
    items = load_task_file(str(tiny / "mcc.json"), multi_cot=True, tokenizer=tok)
    c = cfg()
    batch = mcc_batch(items, [1, 3], epoch=2, tokenizer=tok, cfg=c)
    for b, item_id in enumerate([1, 3]):
        i, j = choose(len(items[item_id]["output"]), 2, c.seed, 2, item_id)
        assert batch["spans_a"][b].tolist() == items[item_id]["indices"][i]
        assert batch["spans_b"][b].tolist() == items[item_id]["indices"][j]


def _plan_and_batch(tp_size, mcc_file, tok_path):
    setup(tp_size=tp_size)
    lay = layout()
    tok = load_tokenizer(tok_path)
    items = load_task_file(mcc_file, multi_cot=True, tokenizer=tok)
    c = cfg(max_batch_size=2, accumulation_steps=1)
    plan = epoch_plan(len(items), 0, c, lay)
    return {"plan": torch.tensor([i for step in plan for micro in step for i in micro]),
            "tokens": mcc_batch(items, plan[0][0], 0, tok, c)["tokens"]}


@pytest.mark.parametrize("tp_size", [2, 1])
def test_every_tp_rank_of_a_dp_group_gets_the_same_batch(tiny, tp_size, tmp_path):
    items = json.load(open(tiny / "mcc.json"))[:8]  # an even count: two DP ranks split it without padding
    assert len(items) == 8
    json.dump(items, open(tmp_path / "mcc8.json", "w"))
    (tmp_path / "mcc8.meta.json").write_text((tiny / "mcc.meta.json").read_text())
    ranks = run_distributed(_plan_and_batch, 2, tp_size, str(tmp_path / "mcc8.json"),
                            str(tiny / "ckpt" / "tokenizer.model"))
    if tp_size == 2:  # one DP group of two TP ranks: identical plans and identical batches
        assert torch.equal(ranks[0]["plan"], ranks[1]["plan"]) and torch.equal(ranks[0]["tokens"], ranks[1]["tokens"])
        assert ranks[0]["plan"].tolist() == list(range(8))
    else:  # two DP ranks: each item on exactly one rank, and the two halves make the epoch
        plans = [set(r["plan"].tolist()) for r in ranks]
        assert len(ranks[0]["plan"]) == len(ranks[1]["plan"]) == 4
        assert plans[0].isdisjoint(plans[1]) and plans[0] | plans[1] == set(range(8))
        assert not torch.equal(ranks[0]["tokens"], ranks[1]["tokens"])


def train_command(tiny, save_dir):
    return [sys.executable, "mcc_kd/train_mcc.py", "--task", "SVAMP", "--ckpt_dir", str(tiny / "ckpt"),
            "--save_dir", str(save_dir), "--log_dir", str(save_dir / "log"), "--train_file", str(tiny / "mcc.json"),
            "--dev_file", str(tiny / "dev.json"), "--label_file", str(tiny / "dev.json"),
            "--model_type", "lora-tiny-llama", "--lora_rank", "4", "--lr", "3e-3", "--epochs", "2",
            "--max_batch_size", "1", "--accumulation_steps", "2", "--save_steps", "1", "--max_seq_len", "96",
            "--eval_batch_size", "3"]


def run(cmd, env):
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def final_checkpoint(save_dir):
    """The newest committed checkpoint (the one a rerun resumes from): a kill may leave a newer folder whose
    save never finished (no state.json)."""
    folder, state = latest_checkpoint(str(save_dir))
    return state, read_tensors(os.path.join(folder, "consolidated.00.pth"))



@pytest.mark.parametrize("script", ["train.py", "train_mcc.py"])
def test_selection_last_scores_only_the_last_epoch_and_reads_no_dev_file(tiny, tmp_path, script):
    """--selection last (the main job's): no per-epoch evaluation even with a dev file given, only the last
    epoch's weights kept, and they alone are scored on label_file."""
    save = tmp_path / "run"
    cmd = train_command(tiny, save) + ["--selection", "last", "--label_file", str(tiny / "dev.json")]
    cmd[1] = f"mcc_kd/{script}"
    run(cmd, dict(os.environ, OMP_NUM_THREADS="1"))
    state, _ = final_checkpoint(save)
    assert state["best_epoch"] == 2 and state["history"] == []
    assert sorted(p.name for p in save.glob("epoch-*")) == ["epoch-002"]
    assert sorted(p.name for p in (save / "log").iterdir()) == ["SVAMP-dev-metrics.json", "SVAMP-dev-predictions.json"]


def test_killed_training_resumes_to_the_same_final_weights(tiny, tmp_path):
    env = dict(os.environ)
    run(train_command(tiny, tmp_path / "straight"), env)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_command(tiny, killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not list((killed / "checkpoints").glob("step-0000000[2-9]/state.json")):  # step 2 committed
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before step 2"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state, _ = final_checkpoint(killed)
    assert proc.returncode == -signal.SIGKILL and state["epoch"] < 2, "the run finished before it was killed"

    run(train_command(tiny, killed), env)
    (s1, w1), (s2, w2) = final_checkpoint(tmp_path / "straight"), final_checkpoint(killed)
    assert s1["step"] == s2["step"] and s1["history"] == s2["history"]
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any(w1[k].abs().sum() > 0 for k in w1 if "lora_b_" in k)  # it trained


def train_kwargs(tiny, train_file, save_dir, **kw):
    kw.setdefault("ckpt_dir", str(tiny / "ckpt"))
    return dict(task="SVAMP", save_dir=str(save_dir), log_dir=str(save_dir / "log"),
                train_file=str(train_file), dev_file=str(tiny / "dev.json"), label_file=str(tiny / "dev.json"),
                model_type="lora-tiny-llama", lora_rank=4, lr=3e-3, epochs=1, max_seq_len=96, eval_batch_size=3,
                **kw)


def _train_worker(kwargs):
    from mcc_kd.train_mcc import main
    main(**kwargs)
    return {}


def test_tp2_and_dp2_training_equal_one_process(tiny, tmp_path):
    """The same global batch per step, whatever the layout: TP 2 (one DP group) and DP 2 (micro-batches of one
    question on each rank, normalised over both) end with the weights of one process doing it all."""
    items = json.load(open(tiny / "mcc.json"))[:8]  # even, so DP shards need no padding
    train_file = tmp_path / "mcc8.json"
    json.dump(items, open(train_file, "w"))
    (tmp_path / "mcc8.meta.json").write_text((tiny / "mcc.meta.json").read_text())
    _train_worker(train_kwargs(tiny, train_file, tmp_path / "one", max_batch_size=1, accumulation_steps=2))
    assert not torch.distributed.is_initialized()  # train_mcc ends by tearing its process groups down
    split(str(tiny / "ckpt"), str(tmp_path / "ckpt-tp2"), n=2)
    run_distributed(_train_worker, 2, train_kwargs(tiny, train_file, tmp_path / "tp2", tp_size=2, max_batch_size=1,
                                                   accumulation_steps=2, ckpt_dir=str(tmp_path / "ckpt-tp2")))
    run_distributed(_train_worker, 2, train_kwargs(tiny, train_file, tmp_path / "dp2", tp_size=1,
                                                   max_batch_size=1, accumulation_steps=1))
    _, one = final_checkpoint(tmp_path / "one")
    folder, _ = latest_checkpoint(str(tmp_path / "tp2"))
    tp2 = merge_state_dicts([read_tensors(os.path.join(folder, f"consolidated.0{r}.pth")) for r in range(2)])
    _, dp2 = final_checkpoint(tmp_path / "dp2")
    assert any(one[k].abs().sum() > 0 for k in one if "lora_b_" in k)
    for other in (tp2, dp2):
        assert other.keys() == one.keys()
        for k in one:
            torch.testing.assert_close(other[k], one[k], atol=2e-4, rtol=1e-3, msg=k)


HAND_BUILT = {"instruction": "Tom has 3 apples and buys 4 more. How many apples does Tom have?\n", "label": "7",
              "output": ["Tom has 3 + 4 = 7 apples.\nTherefore, the answer is 7 .",
                         "He buys 4, and 3 + 4 makes 7 apples in all, so 7 .",
                         "Start with 3 apples; 4 more gives 7 apples altogether. So 7 ."]}


@pytest.mark.parametrize("indices", ["logits", "tokens"])
def test_each_indices_convention_trains_the_span_kl_on_the_logits_predicting_the_answer(tiny, tmp_path, indices):
    tok = load_tokenizer(str(tiny / "ckpt" / "tokenizer.model"))
    json.dump([HAND_BUILT], open(tmp_path / "raw.json", "w"))
    filter_file("SVAMP", str(tmp_path / "raw.json"), str(tmp_path / "mcc.json"), tok.path, indices=indices)
    written = json.load(open(tmp_path / "mcc.json"))[0]
    assert len(written["output"]) == 3
    items = load_task_file(str(tmp_path / "mcc.json"), multi_cot=True, tokenizer=tok, indices=indices)
    c = cfg(indices=indices, alpha=1.0)
    batch = mcc_batch(items, [0], epoch=0, tokenizer=tok, cfg=c)
    setup()
    model = load_model(str(tiny / "ckpt"), max_seq_len=192, max_batch_size=8)
    with torch.no_grad():
        for p in model.parameters():  # distinct distributions at the two answers, so the KL has a gradient
            p.normal_(0, 0.3)
    _, parts, hidden = mcc_loss(model, batch, {"sequences": 2.0, "span_items": 1.0}, c)
    hidden.retain_grad()
    parts["kl"].backward()
    seven = tok.sp.piece_to_id("7")
    for row in range(2):  # the rows the KL trains = the positions whose logits predict the final "7"
        tokens = batch["tokens"][row].tolist()
        answer_at = max(t for t, x in enumerate(tokens) if x == seven)
        trained = hidden.grad[row].abs().sum(-1).nonzero().flatten().tolist()
        assert trained == [answer_at - 1]
    other = "logits" if indices == "tokens" else "tokens"
    with pytest.raises(DataError, match=rf"indices are '{indices}' positions but this run reads them as '{other}': "
                                        rf"pass --indices {indices}"):
        load_task_file(str(tmp_path / "mcc.json"), multi_cot=True, tokenizer=tok, indices=other)


def test_train_mcc_reads_the_indices_convention_from_the_sidecar_by_default(tiny, tmp_path, capsys):
    tok = load_tokenizer(str(tiny / "ckpt" / "tokenizer.model"))
    json.dump([HAND_BUILT] * 2, open(tmp_path / "raw.json", "w"))
    filter_file("SVAMP", str(tmp_path / "raw.json"), str(tmp_path / "mcc.json"), tok.path, indices="tokens")
    _train_worker(train_kwargs(tiny, tmp_path / "mcc.json", tmp_path / "run", max_batch_size=2, accumulation_steps=1))
    assert "indices are 'tokens' positions" in capsys.readouterr().out
    with pytest.raises(DataError, match="pass --indices tokens"):  # a flag that contradicts the sidecar
        _train_worker(train_kwargs(tiny, tmp_path / "mcc.json", tmp_path / "run2", indices="logits"))


def test_config_file_gives_the_architecture_as_the_originals_flag(tiny, tmp_path):
    import shutil

    from mcc_kd.eval import build_model

    bare = tmp_path / "bare"  # shards and tokenizer, params.json elsewhere
    shutil.copytree(tiny / "ckpt", bare)
    shutil.move(bare / "params.json", tmp_path / "params.json")
    _, model, tok = build_model(str(bare), None, 4, None, None, 64, 2, None, False, False, 1,
                                config_file=str(tmp_path / "params.json"))
    reference = load_model(str(tiny / "ckpt"), max_seq_len=64, max_batch_size=2)
    assert model.args.n_layers == reference.args.n_layers and model.args.lora_rank == 4
    assert tok.vocab_size == reference.args.vocab_size


def test_a_converted_hf_model_brings_its_own_tokenizer_so_no_tokenizer_file_is_needed(smollm2_dir, tmp_path):
    from common.tokenizer import HFTokenizer
    from mcc_kd.eval import build_model

    split(smollm2_dir, str(tmp_path / "ckpt"), n=1)
    _, model, tok = build_model(str(tmp_path / "ckpt"), None, 4, None, None, 64, 1, None, False, False, 1)
    assert isinstance(tok, HFTokenizer) and tok.has_chat_template and tok.vocab_size == model.args.vocab_size == 49152
