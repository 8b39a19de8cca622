"""Training batches for Hugging Face models, and the targets and mask that common/losses.py takes.

    batch = causal_lm_batch(prompts, responses, pad_id=tok.pad_token_id)        # token-id lists in, tensors out
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"])
    targets, mask = targets_and_mask(batch["labels"], shift=True)             # position t predicts token t+1
    loss = cross_entropy(out.logits, target_ids=targets, mask=mask) + forward_kl(out.logits, teacher, mask=mask)

    batch = seq2seq_batch(prompts, responses, pad_id=0, decoder_start_id=0)    # T5: encoder input, decoder side
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                decoder_input_ids=batch["decoder_input_ids"], decoder_attention_mask=batch["decoder_attention_mask"])
    targets, mask = targets_and_mask(batch["labels"], shift=False)            # decoder position t predicts labels[t]

`labels` follow the Hugging Face convention: the token itself on response positions, -100 on the prompt and on
padding, so `model(**inputs, labels=labels).loss` is the same cross-entropy. The targets and mask are aligned
with the logits exactly as the model returns them, so no caller slices `logits[:, :-1]`.
"""
import torch

IGNORE_INDEX = -100


def _check(prompts, responses, pad_id):
    if len(prompts) != len(responses):
        raise ValueError(f"need one response per prompt, got {len(prompts)} prompts and {len(responses)} responses")
    if not isinstance(pad_id, int) or pad_id < 0:
        raise ValueError(f"pad_id must be a token id (an int >= 0), got {pad_id!r}; pass tokenizer.pad_token_id "
                         "(or the eos id when the tokenizer has no pad token)")


def _pad(rows, value, width, side):
    return torch.tensor([[value] * (width - len(r)) + r if side == "left" else r + [value] * (width - len(r))
                         for r in rows], dtype=torch.long)


def causal_lm_batch(prompts, responses, *, pad_id, padding_side="right"):
    """One sequence per pair, prompt then response, padded to the longest:

    input_ids      prompt + response, pad_id on padding
    attention_mask 1 on tokens, 0 on padding
    position_ids   0, 1, ... over each sequence's own tokens (with left padding the first token is still 0, as
                   transformers' generate numbers them; absolute-position models such as GPT-2 need this)
    labels         the response tokens, -100 on the prompt and on padding (unshifted, as `labels=` in HF)

    padding_side="left" puts the padding first (as for generation); "right" (default) after the response.
    """
    _check(prompts, responses, pad_id)
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(map(len, seqs), default=0)
    labels = [[IGNORE_INDEX] * len(p) + list(r) for p, r in zip(prompts, responses)]
    attention = _pad([[1] * len(s) for s in seqs], 0, width, padding_side)
    return dict(input_ids=_pad(seqs, pad_id, width, padding_side), attention_mask=attention,
                position_ids=(attention.cumsum(1) - 1).clamp_min(0),
                labels=_pad(labels, IGNORE_INDEX, width, padding_side))


def seq2seq_batch(prompts, responses, *, pad_id, decoder_start_id):
    """Encoder inputs and decoder side of an encoder-decoder model (T5), each right-padded to its longest:

    input_ids, attention_mask                 the prompt (encoder input)
    labels                                    the response, -100 on padding
    decoder_input_ids, decoder_attention_mask decoder_start_id + the response shifted right by one (what HF
                                              builds from `labels=`), 1 where the label counts
    """
    _check(prompts, responses, pad_id)
    prompts, responses = [list(p) for p in prompts], [list(r) for r in responses]
    enc_width, dec_width = max(map(len, prompts), default=0), max(map(len, responses), default=0)
    return dict(input_ids=_pad(prompts, pad_id, enc_width, "right"),
                attention_mask=_pad([[1] * len(p) for p in prompts], 0, enc_width, "right"),
                labels=_pad(responses, IGNORE_INDEX, dec_width, "right"),
                decoder_input_ids=_pad([([decoder_start_id] + r)[:dec_width] for r in responses], pad_id, dec_width,
                                       "right"),
                decoder_attention_mask=_pad([[1] * len(r) for r in responses], 0, dec_width, "right"))


def targets_and_mask(labels, *, shift):
    """(target_ids, mask) aligned with the model's unshifted logits [B, T, V], for every loss in common/losses.py.

    shift=True (causal LM): position t predicts token t+1, so target_ids[:, t] = labels[:, t+1] and the last
    position counts nothing. shift=False (seq2seq decoder): target_ids = labels. mask = target_ids != -100.
    """
    if shift:
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]
    else:
        targets = labels.clone()
    return targets, targets != IGNORE_INDEX
