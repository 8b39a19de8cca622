"""Accuracy per ANLI round on every dev / test item, two ways, plus Rouge-L of the reasons (spec §4).

    python anli_reverse_kl/eval.py run --model_path runs/minillm/model --data_dir processed/anli --save runs/eval
    python anli_reverse_kl/eval.py compare --sft runs/eval_sft --minillm runs/eval_minillm     # one table

* label-constrained: for each label word, Σ_t log q(word_t | prompt, word_<t) teacher-forced from the decoder
  start (a causal LM: right after the prompt; no ":" and no EOS); the prediction is the most likely of the three;
* generation: greedy decoding by default (the fork's sampling: --do_sample --top_p 0.9 --temperature 0.7
  --repetition_penalty 1.15); lowercase, the text before the first ":" (all of it when there is none), its
  first word without punctuation; a word that is no label counts as wrong and as `invalid`;
* token-level (the fork's): argmax at the first decoder position (a causal LM: the prompt's last) == first gold
  target token;
* Rouge-L F (rouge-score, stemming) of the generated reason (text after ":") against the gold reason, over
  items that have one.

Writes `{save}/{round}-{split}-predictions.json` per round and split, `{save}/metrics.json`, and prints a
table with one row per round and split. A causal LM reads each prompt without the EOS prepare_data.py closes
it with (as train.py) and generates after it, left-padded.
"""
import json
import os
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from anli_reverse_kl.prepare_data import LABEL_WORDS, ROUNDS, SPLITS
from common import hf
from common.cli import UserError, check_range, run_cli
from common.distributed import gather_object, print0, rank_seed, setup, shutdown
from common.generation import generate
from common.io import atomic_write_json, atomic_write_text, read_jsonl
from common.labels import causal_lm_batch, seq2seq_batch, targets_and_mask
from common.losses import token_log_probs
from common.metrics import rouge_l
from common.training import dp_shard

def parse_generation(text: str) -> tuple:
    """(first word before ":" without punctuation, text after ":"); the whole text is the label part when
    there is no ":" (the reason is then "")."""
    text = text.strip().lower()
    head, _, reason = text.partition(":")
    words = head.split()
    word = re.sub(r"[^\w-]", "", words[0]) if words else ""
    return word, reason.strip()


@torch.no_grad()
def label_scores(model, prompts, word_ids, pad_id: int, batch_size: int = 16) -> tuple:
    """Per prompt the summed decoder log-probs [N, K] of the K label words (token-id lists, teacher-forced from
    the decoder start) and the argmax at the first decoder position [N] (the fork's token-level prediction).
    The encoder runs once per prompt; its output is shared by the K words."""
    device, k = next(model.parameters()).device, len(word_ids)
    if not hf.is_seq2seq(model):
        return causal_label_scores(model, prompts, word_ids, pad_id, batch_size)
    start = model.config.decoder_start_token_id
    scores, first = [], []
    for s in tqdm(range(0, len(prompts), batch_size), desc="label scores", leave=False):
        chunk = prompts[s:s + batch_size]
        batch = seq2seq_batch([p for p in chunk for _ in range(k)], list(word_ids) * len(chunk), pad_id=pad_id,
                              decoder_start_id=start)
        batch = {name: t.to(device) for name, t in batch.items()}
        encoded = model.get_encoder()(input_ids=batch["input_ids"][::k], attention_mask=batch["attention_mask"][::k])
        encoded.last_hidden_state = encoded.last_hidden_state.repeat_interleave(k, 0)
        logits = model(encoder_outputs=encoded, attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"],
                       decoder_attention_mask=batch["decoder_attention_mask"]).logits
        targets, _ = targets_and_mask(batch["labels"], shift=False)
        scores.append(token_log_probs(logits, target_ids=targets).sum(-1).view(-1, k).cpu())
        first.append(logits[::k, 0].argmax(-1).cpu())
    return torch.cat(scores), torch.cat(first)


@torch.no_grad()
def causal_label_scores(model, prompts, word_ids, pad_id: int, batch_size: int = 16) -> tuple:
    """label_scores for a causal LM: prompt + word as one sequence, the word's tokens scored where they follow
    the prompt; the token-level prediction is the argmax at the prompt's last position."""
    device, k = next(model.parameters()).device, len(word_ids)
    scores, first = [], []
    for s in tqdm(range(0, len(prompts), batch_size), desc="label scores", leave=False):
        chunk = prompts[s:s + batch_size]
        batch = causal_lm_batch([p for p in chunk for _ in range(k)], list(word_ids) * len(chunk), pad_id=pad_id)
        targets, mask = targets_and_mask(batch.pop("labels"), shift=True)
        # the head only where a word token is predicted: full [B, S, V] logits of a 49k vocabulary are GBs
        hidden = model.base_model(**{name: t.to(device) for name, t in batch.items()}).last_hidden_state
        head = model.get_output_embeddings()
        rows = mask.nonzero()[:, 0].to(device)
        logp = token_log_probs(head(hidden[mask.to(device)]), target_ids=targets[mask].to(device))
        scores.append(torch.zeros(len(batch["input_ids"]), device=device).index_add_(0, rows, logp.float())
                      .view(-1, k).cpu())
        last = torch.tensor([len(p) - 1 for p in chunk], device=device)  # predicts the first target token
        first.append(head(hidden[::k][torch.arange(len(chunk), device=device), last]).argmax(-1).cpu())
    return torch.cat(scores), torch.cat(first)


def repetition_penalty_processor(penalty: float):
    """CTRL's repetition penalty (as transformers applies it) on the tokens generated so far."""
    def process(logits, tokens):
        if tokens.shape[1] == 0:
            return logits
        seen = logits.gather(-1, tokens)
        return logits.scatter(-1, tokens, torch.where(seen < 0, seen * penalty, seen / penalty))
    return process


def split_metrics(records, scores, first_tokens, generations) -> tuple:
    """Per-item predictions and the split's metrics; `generations` may be None (label scoring only)."""
    predictions, correct_label, correct_token, correct_gen, invalid, rouge = [], 0, 0, 0, 0, []
    for i, rec in enumerate(records):
        label_pred = LABEL_WORDS[int(scores[i].argmax())]
        pred = dict(uid=rec["uid"], label=rec["label"], label_pred=label_pred,
                    label_scores={w: float(s) for w, s in zip(LABEL_WORDS, scores[i])},
                    token_correct=int(first_tokens[i]) == rec["target_tokens"][0])
        correct_label += label_pred == rec["label"]
        correct_token += pred["token_correct"]
        if generations is not None:
            word, reason = parse_generation(generations[i])
            pred.update(generation=generations[i], generation_pred=word, generated_reason=reason)
            correct_gen += word == rec["label"]
            invalid += word not in LABEL_WORDS
            if rec["reason"]:
                pred["rougeL"] = rouge_l(reason, rec["reason"])
                rouge.append(pred["rougeL"])
        predictions.append(pred)
    n = max(len(records), 1)
    metrics = dict(n=len(records), label_accuracy=correct_label / n, token_accuracy=correct_token / n)
    if generations is not None:
        metrics.update(generation_accuracy=correct_gen / n, invalid=invalid,
                       rougeL=sum(rouge) / len(rouge) if rouge else None, n_with_reason=len(rouge))
    return predictions, metrics


def format_table(metrics: dict, name: str = "") -> str:
    cols = ["label_accuracy", "generation_accuracy", "token_accuracy", "rougeL", "invalid", "n"]
    lines = [f"| {name or 'round/split'} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key, m in metrics.items():
        cells = [("-" if m.get(c) is None else f"{m[c]:.3f}" if isinstance(m[c], float) else str(m[c]))
                 for c in cols]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


RECORD_FIELDS = ("uid", "prompt_tokens", "target_tokens", "label", "reason")  # of prepare_data.py's {split}.jsonl


def main(model_path: str = None, data_dir: str = None, save: str = None, rounds: str = "r1,r2,r3",
         splits: str = "dev,test", batch_size: int = 16, max_new_tokens: int = 180, do_sample: bool = False,
         temperature: float = 0.7, top_p: float = 0.9, repetition_penalty: float = 1.0, seed: int = 10):
    """Evaluate `model_path` on `{data_dir}/{round}/{split}.jsonl` (prepare_data.py's output); items are
    sharded over data-parallel ranks under torchrun."""
    for flag, value in (("--model_path", model_path), ("--data_dir", data_dir), ("--save", save)):
        if value is None:
            raise UserError(f"{flag} is required")
    for flag, value in (("--batch_size", batch_size), ("--max_new_tokens", max_new_tokens)):
        check_range(flag, value, low=1)
    rounds = rounds.split(",") if isinstance(rounds, str) else list(rounds)
    splits = splits.split(",") if isinstance(splits, str) else list(splits)
    # every input is checked before the model loads: its config, then each round's records
    hf.load_config(model_path)
    data = {}
    for r in rounds:
        for split in splits:
            path = os.path.join(data_dir, str(r), f"{split}.jsonl")
            if r not in ROUNDS or split not in SPLITS or not os.path.exists(path):
                raise UserError(f"{path} is missing: run anli_reverse_kl/prepare_data.py --rounds {r} --splits "
                                f"{split} first (or pass --rounds / --splits: {', '.join(ROUNDS)} / "
                                f"{', '.join(SPLITS)})")
            data[r, split] = read_jsonl(path, fields=RECORD_FIELDS, fix="re-run anli_reverse_kl/prepare_data.py")
    lay = setup(seed)
    os.makedirs(save, exist_ok=True)
    tok = hf.load_tokenizer(model_path)
    model = hf.load_model(model_path, device=lay.device, frozen=True)
    causal = not hf.is_seq2seq(model)
    word_ids = [tok.encode(w, add_special_tokens=False) for w in LABEL_WORDS]
    processor = repetition_penalty_processor(repetition_penalty) if repetition_penalty != 1.0 else None
    all_metrics = {}
    for r in rounds:
        for split in splits:
            records = data[r, split]
            mine = dp_shard(list(range(len(records))), lay.dp_rank, lay.dp_size)
            prompts = [records[i]["prompt_tokens"] for i in mine]
            if causal:  # the prompt's closing EOS (the T5 encoder's end) is not part of a causal LM's input
                prompts = [p[:-1] if p[-1:] == [tok.eos_token_id] else p for p in prompts]
            scores, first = label_scores(model, prompts, word_ids, tok.pad_token_id, batch_size)
            texts = []
            for s in tqdm(range(0, len(prompts), batch_size), desc=f"{r} {split} generate", leave=False,
                          disable=not lay.is_main):
                gens = generate(model, prompts[s:s + batch_size], max_new_tokens, temperature if do_sample else 0.0,
                                top_p if do_sample else 1.0, tok.eos_token_id, logits_processor=processor,
                                seed=rank_seed(seed, s, lay.dp_rank), pad_id=tok.pad_token_id,
                                padding="left" if causal else "right")
                texts += [tok.decode(g, skip_special_tokens=True) for g in gens]
            parts = gather_object([(i, scores[k], first[k], texts[k]) for k, i in enumerate(mine)], lay)
            if lay.is_main:
                by_index = {i: rest for part in parts for i, *rest in part}
                ordered = [by_index[i] for i in range(len(records))]
                predictions, metrics = split_metrics(records, torch.stack([o[0] for o in ordered]),
                                                     torch.stack([o[1] for o in ordered]), [o[2] for o in ordered])
                atomic_write_json(predictions, os.path.join(save, f"{r}-{split}-predictions.json"))
                all_metrics[f"{r}/{split}"] = metrics
    if lay.is_main:
        atomic_write_json(all_metrics, os.path.join(save, "metrics.json"))
        table = format_table(all_metrics)
        atomic_write_text(table + "\n", os.path.join(save, "metrics.md"))
        print0(table)
    shutdown()


def compare(**runs):
    """One table over several evaluations: `compare --teacher runs/eval_teacher --minillm runs/eval_minillm`
    (each a --save folder of `main`); rows are run x round/split."""
    if not runs:
        raise UserError("compare: name the runs, e.g. compare --teacher runs/eval_teacher --minillm runs/eval_minillm")
    rows = {}
    for name, folder in runs.items():
        path = os.path.join(str(folder), "metrics.json")
        try:
            with open(path) as f:
                metrics = json.load(f)
        except FileNotFoundError:
            raise UserError(f"--{name} {folder}: no metrics.json; pass a --save folder of `eval.py run`") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno} is not valid JSON ({e.msg}); re-run `eval.py run`") from None
        for key, m in metrics.items():
            rows[f"{name} {key}"] = m
    table = format_table(rows, "run round/split")
    print(table)
    return None


if __name__ == "__main__":
    run_cli({"run": main, "compare": compare})
