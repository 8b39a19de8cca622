"""anli_reverse_kl/train.py: losses, checks, resume after kill -9, data parallel == accumulation."""
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from anli_reverse_kl.prepare_data import write_tokenized
from anli_reverse_kl.train import check_same_kind, kd_loss, load_items, model_inputs, sft_loss, to_batch, train
from common.io import read_tensors
from tests.tiny import char_tokenizer, save_tiny, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "anli_reverse_kl", "train.py")


def run(args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, **kwargs)


def weights(folder):
    out = {}
    for path in glob.glob(os.path.join(folder, "*.safetensors")):
        out.update(read_tensors(path))
    return out


def toy_batch():
    tok = char_tokenizer()
    pairs = [(tok.encode("premise one") + [1], tok.encode("neutral:x.") + [1]),
             (tok.encode("p2") + [1], tok.encode("entailment:yes it is.") + [1]),
             (tok.encode("a third prompt") + [1], tok.encode("no") + [1])]
    return pairs, tok


def test_sft_loss_is_first_token_weighted_ce_against_a_hand_computation():
    pairs, tok = toy_batch()
    model = tiny_model("t5", seed=0)
    batch = to_batch(pairs, tok, 0, "cpu")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   decoder_input_ids=batch["decoder_input_ids"]).logits
    firsts, rests = [], []
    for b, (_, target) in enumerate(pairs):
        nll = F.cross_entropy(logits[b, :len(target)], torch.tensor(target), reduction="none")
        firsts.append(nll[0])
        rests += list(nll[1:])
    want = 0.8 * torch.stack(firsts).mean() + 0.2 * torch.stack(rests).mean()
    got = sft_loss(logits, batch, 0.8, len(firsts), len(rests))
    assert torch.allclose(got, want, atol=1e-5)


def test_sft_loss_with_the_fork_normaliser_equals_its_mean_over_labels_padded_to_max_len():
    """compute_class_reas_loss: CrossEntropyLoss(reduction="none", ignore_index=-100).mean() over B first tokens
    and over B x (max_len - 1) other entries of labels right-padded with -100 to max_len."""
    pairs, tok = toy_batch()
    model = tiny_model("t5", seed=0)
    max_len = 30
    labels = torch.full((len(pairs), max_len), -100)
    for b, (_, target) in enumerate(pairs):
        labels[b, :len(target)] = torch.tensor(target)
    prompts = torch.full((len(pairs), max(len(p) for p, _ in pairs)), 0)
    for b, (prompt, _) in enumerate(pairs):
        prompts[b, :len(prompt)] = torch.tensor(prompt)
    fork_logits = model(input_ids=prompts, attention_mask=(prompts != 0).long(), labels=labels).logits
    ce = torch.nn.CrossEntropyLoss(reduction="none", ignore_index=-100)
    first = ce(fork_logits[:, 0], labels[:, 0]).mean()
    reason = ce(fork_logits[:, 1:].reshape(-1, fork_logits.shape[-1]), labels[:, 1:].reshape(-1)).mean()
    want = 0.8 * first + 0.2 * reason
    batch = to_batch(pairs, tok, 0, "cpu")
    logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids",
                                             "decoder_attention_mask")}).logits
    got = sft_loss(logits, batch, 0.8, len(pairs), len(pairs) * (max_len - 1))
    assert torch.allclose(got, want, atol=1e-5)
    n_rest = int(batch["mask"].sum()) - len(pairs)
    assert not torch.allclose(sft_loss(logits, batch, 0.8, len(pairs), n_rest), want, atol=1e-2)


def test_sft_and_kd_micro_batches_with_the_whole_step_counts_sum_to_the_full_batch_loss():
    pairs, tok = toy_batch()
    model, teacher = tiny_model("t5", seed=0), tiny_model("t5", seed=1)
    full = to_batch(pairs, tok, 0, "cpu")
    n_tok = int(full["mask"].sum())
    n_first = len(pairs)

    def losses(batch):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")}
        logits, teacher_logits = model(**inputs).logits, teacher(**inputs).logits
        return (sft_loss(logits, batch, 0.8, n_first, n_tok - n_first), kd_loss(logits, teacher_logits, batch, 0.5,
                                                                                n_tok))
    whole = losses(full)
    parts = [losses(to_batch(p, tok, 0, "cpu")) for p in (pairs[:1], pairs[1:])]
    for k in range(2):
        assert torch.allclose(parts[0][k] + parts[1][k], whole[k], atol=1e-5)


def test_fast_path_losses_and_gradients_equal_the_full_logits_ones():
    """--fast_kd: the T5 decoder stops before its (scaled, tied) head and the losses are chunked from the hidden
    states; in fp32 the values and gradients are those of the full logits."""
    from common.hf_training import lm_logits

    pairs, tok = toy_batch()
    model, teacher = tiny_model("t5", seed=0), tiny_model("t5", seed=1, scale_decoder_outputs=True)
    batch = to_batch(pairs, tok, 0, "cpu")
    n_tok, n_first = int(batch["mask"].sum()), len(pairs)
    results = []
    for fast, chunk in ((False, None), (True, 3)):
        inputs = model_inputs(batch)
        _, logits = lm_logits(model, inputs, fast=fast)
        _, teacher_logits = lm_logits(teacher, inputs, fast=fast, frozen=True)
        loss = sft_loss(logits, batch, 0.8, n_first, n_tok - n_first, chunk) + kd_loss(
            logits, teacher_logits, batch, 0.5, n_tok, chunk)
        results.append((loss.detach(), torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)))
    (plain, plain_grads), (fast, fast_grads) = results
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    for g_fast, g_plain in zip(fast_grads, plain_grads):
        if g_plain is not None:
            torch.testing.assert_close(g_fast, g_plain, rtol=1e-4, atol=1e-6)


def test_a_teacher_of_the_other_kind_is_refused_from_the_configs_with_one_clear_line(tmp_path):
    t5, opt = save_tiny("t5", tmp_path / "t5"), save_tiny("opt", tmp_path / "opt-folder")
    with pytest.raises(ValueError, match=r"--teacher_model_path .*opt-folder is a decoder-only model and --model_path "
                                         r".*t5 an encoder-decoder one"):
        check_same_kind(t5, opt)
    check_same_kind(save_tiny("llama", tmp_path / "S"), save_tiny("llama", tmp_path / "T", seed=1))  # one kind


def test_causal_batches_score_the_target_after_the_prompt_and_weight_its_first_token():
    pairs, tok = toy_batch()
    model = tiny_model("llama", seed=0)
    batch = to_batch(pairs, tok, None, "cpu")
    logits = model(**model_inputs(batch)).logits
    firsts, rests = [], []
    for prompt, target in pairs:
        one = model(input_ids=torch.tensor([prompt + target])).logits[0]
        nll = F.cross_entropy(one[len(prompt) - 1:-1], torch.tensor(target), reduction="none")
        firsts.append(nll[0])
        rests += list(nll[1:])
    want = 0.8 * torch.stack(firsts).mean() + 0.2 * torch.stack(rests).mean()
    assert torch.allclose(sft_loss(logits, batch, 0.8, len(firsts), len(rests)), want, atol=1e-5)


def test_minillm_trains_a_causal_student_and_exports_the_weights_at_each_save_interval(tmp_path):
    tok = char_tokenizer()
    save_tiny("llama", tmp_path / "teacher", seed=0)
    save_tiny("llama", tmp_path / "student", seed=1)
    prompts = [tok.encode(f"question {i}?") + [1] for i in range(8)]  # prepare_data's EOS-closed prompts
    records = [dict(uid=str(i), prompt="", target="", label="", reason="", prompt_tokens=p, target_tokens=[])
               for i, p in enumerate(prompts)]
    write_tokenized(str(tmp_path / "data"), "train", [p + [-1] + tok.encode("yes") + [1] + [-1] * 4 for p in prompts],
                    records, len(tok))
    options = dict(MINILLM, model_path=str(tmp_path / "student"), teacher_model_path=str(tmp_path / "teacher"),
                   data_dir=str(tmp_path / "data"), total_iters=4, save_interval=1)  # 2 steps per iteration
    train(**options, save=str(tmp_path / "run"))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in log)
    assert sorted(os.listdir(tmp_path / "run")) == ["args.json", "checkpoints", "log.jsonl", "model", "step-2"]
    a, b = weights(tmp_path / "student"), weights(tmp_path / "run" / "model")
    assert not all(torch.equal(a[k], b[k]) for k in a)  # it trained
    assert load_items(str(tmp_path / "data"), 512, 360, prompt_eos=1)[0][0] == prompts[0][:-1]  # EOS left off


def test_seqkd_without_teacher_outputs_says_to_run_generate_data(run_dir):
    done = run([sys.executable, TRAIN, "--type", "seqkd", "--model_path", str(run_dir / "student"),
                "--data_dir", str(run_dir / "data" / "r1"), "--save", str(run_dir / "no")])
    assert done.returncode != 0 and "generate_data.py" in done.stderr.strip().splitlines()[-1]


MINILLM = dict(type="minillm", num_rollouts=4, chunk_size=4, batch_size=2, gradient_accumulation_steps=1,
               ppo_epochs=1, total_iters=10, save_interval=1, max_new_tokens=8, max_prompt_length=512,
               single_step_reg=True, lr=1e-3)


def flags(options: dict) -> list:
    return [f"--{k}={v}" for k, v in options.items()]


def test_kill_9_during_minillm_then_rerun_gives_the_weights_of_an_uninterrupted_run(run_dir):
    options = dict(MINILLM, model_path=str(run_dir / "student"), teacher_model_path=str(run_dir / "teacher"),
                   data_dir=str(run_dir / "data" / "r1"))
    train(**options, save=str(run_dir / "whole"))  # in-process: one import of transformers fewer

    save = run_dir / "killed"
    proc = subprocess.Popen([sys.executable, TRAIN, *flags(options), f"--save={save}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 900
    while not glob.glob(str(save / "checkpoints" / "*" / "state.json")):  # a checkpoint committed
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before a checkpoint"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (save / "model").exists(), "the run ended before the kill: nothing was tested"
    train(**options, save=str(save))
    steps = [json.loads(line)["step"] for line in (save / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # the steps the killed run did after its checkpoint are logged once
    a, b = weights(run_dir / "whole" / "model"), weights(save / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in weights(run_dir / "student").items() if k in a)  # it trained


def test_two_data_parallel_ranks_equal_one_rank_with_two_micro_batches(run_dir):
    # 16 items: 4 optimiser steps of 4 items, as 2 micro-batches of 2 on one rank or 1 of 2 on each of 2 ranks
    options = dict(type="sft", model_path=str(run_dir / "student"), data_dir=str(run_dir / "data" / "r1"),
                   batch_size=2, epochs=1, max_prompt_length=512, lr=1e-3, optimizer="adamw", warmup_iters=0,
                   lr_decay_style="constant", save_interval=1000)
    train(**options, gradient_accumulation_steps=2, save=str(run_dir / "dp1"))
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TRAIN,
               *flags(options), "--gradient_accumulation_steps=1", f"--save={run_dir / 'dp2'}"])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = weights(run_dir / "dp1" / "model"), weights(run_dir / "dp2" / "model")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_fsdp_samples_minillm_rollouts_on_gathered_weights_and_trains_as_ddp(run_dir):
    options = dict(MINILLM, model_path=str(run_dir / "student"), teacher_model_path=str(run_dir / "teacher"),
                   data_dir=str(run_dir / "data" / "r1"), total_iters=3)
    train(**options, save=str(run_dir / "minillm_ddp"))
    train(**options, save=str(run_dir / "minillm_fsdp"), fsdp=True)
    a, b = weights(run_dir / "minillm_ddp" / "model"), weights(run_dir / "minillm_fsdp" / "model")
    # fp32 tolerance: FSDP's flat gathers sum in another order (1.7e-6 measured after 3 iterations)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    logs = [[json.loads(line)["loss"] for line in (run_dir / run / "log.jsonl").read_text().splitlines()]
            for run in ("minillm_ddp", "minillm_fsdp")]
    assert logs[1] == pytest.approx(logs[0], rel=1e-5)


def test_fsdp_with_adafactor_is_refused_before_loading():
    with pytest.raises(ValueError, match="--fsdp with --optimizer adafactor.*pass --optimizer adamw"):
        train(type="sft", model_path="no/such/model", data_dir="no/such/data", save="unused", fsdp=True)

