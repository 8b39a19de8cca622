"""Accuracy per ANLI round on every dev / test item, two ways, plus Rouge-L of the reasons (spec §4).

    python anli_reverse_kl/eval.py --model_path runs/student --data_dir processed_data/anli --save runs/eval

* label-constrained: for each label word, Σ_t log q(word_t | prompt, word_<t) teacher-forced from the decoder
  start (no ":" and no EOS); the prediction is the most likely of the three;
* generation: greedy decoding by default (the fork's sampling: --do_sample --top_p 0.9 --temperature 0.7
  --repetition_penalty 1.15); lowercase, the text before the first ":" (all of it when there is none), its
  first word without punctuation; a word that is no label counts as wrong and as `invalid`;
* token-level (the fork's): argmax at the first decoder position == first gold target token;
* Rouge-L F (rouge-score, stemming) of the generated reason (text after ":") against the gold reason, over
  items that have one.

Writes `{save}/{round}-{split}-predictions.json` per round and split, `{save}/metrics.json`, and prints a
table with one row per round and split.
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

from anli_reverse_kl.prepare_data import LABEL_WORDS
from common.losses import token_log_probs

_ROUGE = None


def parse_generation(text: str) -> tuple:
    """(first word before ":" without punctuation, text after ":"); the whole text is the label part when
    there is no ":" (the reason is then "")."""
    text = text.strip().lower()
    head, _, reason = text.partition(":")
    words = head.split()
    word = re.sub(r"[^\w-]", "", words[0]) if words else ""
    return word, reason.strip()


def rouge_l(prediction: str, reference: str) -> float:
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _ROUGE.score(reference, prediction)["rougeL"].fmeasure


def pad(sequences, value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def encoder_batch(prompts, pad_id: int, device) -> tuple:
    ids = pad(prompts, pad_id).to(device)
    mask = torch.tensor([[1] * len(p) + [0] * (ids.shape[1] - len(p)) for p in prompts], device=device)
    return ids, mask


@torch.no_grad()
def label_scores(model, prompts, word_ids, pad_id: int, batch_size: int = 16) -> tuple:
    """Per prompt the summed decoder log-probs [N, K] of the K label words (token id lists) and the argmax
    of the first decoder position [N] (the fork's token-level prediction)."""
    from anli_reverse_kl.minillm import decoder_logits

    device = next(model.parameters()).device
    k = len(word_ids)
    words = pad(word_ids, -100).to(device)
    scores, first = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc="label scores", leave=False):
        ids, mask = encoder_batch(prompts[start:start + batch_size], pad_id, device)
        labels = words.repeat(ids.shape[0], 1)
        encoded = model.get_encoder()(input_ids=ids, attention_mask=mask)
        encoded.last_hidden_state = encoded.last_hidden_state.repeat_interleave(k, 0)
        logits = decoder_logits(model, None, mask.repeat_interleave(k, 0), labels, encoder_outputs=encoded)
        logp = token_log_probs(logits, labels.clamp_min(0)).masked_fill(labels < 0, 0.0)
        scores.append(logp.sum(-1).view(-1, k).cpu())
        first.append(logits[::k, 0].argmax(-1).cpu())
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
