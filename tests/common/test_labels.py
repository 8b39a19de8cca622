"""common/labels.py: hand-built batches; every loss on the model's full logits with targets_and_mask equals the
float64 reference of tests/common/test_losses.py on the sliced logits; transformers' own loss as the oracle."""
import pytest
import torch

from common import losses as L
from common.labels import causal_lm_batch, seq2seq_batch, targets_and_mask
from tests.common.test_losses import ALL_CASES, call, probs, reference
from tests.tiny import tiny_model

PROMPTS = [[5, 6, 7], [8]]
RESPONSES = [[9, 10], [11, 12, 13]]
X = -100


def test_causal_batch_with_right_padding():
    batch = causal_lm_batch(PROMPTS, RESPONSES, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 10], [8, 11, 12, 13, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 3]]
    assert batch["labels"].tolist() == [[X, X, X, 9, 10], [X, 11, 12, 13, X]]
    targets, mask = targets_and_mask(batch["labels"], shift=True)  # position t predicts token t + 1
    assert targets.tolist() == [[X, X, 9, 10, X], [11, 12, 13, X, X]]
    assert mask.tolist() == [[False, False, True, True, False], [True, True, True, False, False]]


def test_causal_batch_with_left_padding():
    batch = causal_lm_batch(PROMPTS, RESPONSES, pad_id=0, padding_side="left")
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 10], [0, 8, 11, 12, 13]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[X, X, X, 9, 10], [X, X, 11, 12, 13]]
    targets, mask = targets_and_mask(batch["labels"], shift=True)
    assert targets.tolist() == [[X, X, 9, 10, X], [X, 11, 12, 13, X]]
    assert mask.tolist() == [[False, False, True, True, False], [False, True, True, True, False]]


def test_seq2seq_batch_has_encoder_inputs_and_unshifted_decoder_labels():
    batch = seq2seq_batch(PROMPTS, RESPONSES, pad_id=0, decoder_start_id=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[9, 10, X], [11, 12, 13]]
    assert batch["decoder_input_ids"].tolist() == [[4, 9, 10], [4, 11, 12]]
    assert batch["decoder_attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    targets, mask = targets_and_mask(batch["labels"], shift=False)  # decoder position t predicts labels[t]
    assert targets.tolist() == batch["labels"].tolist()
    assert mask.tolist() == [[True, True, False], [True, True, True]]


def test_bad_input_names_the_argument_and_the_fix():
    with pytest.raises(ValueError, match="one response per prompt, got 2 prompts and 1 responses"):
        causal_lm_batch(PROMPTS, RESPONSES[:1], pad_id=0)
    with pytest.raises(ValueError, match="pad_id must be a token id.*pad_token_id"):
        seq2seq_batch(PROMPTS, RESPONSES, pad_id=None, decoder_start_id=0)
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left'"):
        causal_lm_batch(PROMPTS, RESPONSES, pad_id=0, padding_side="middle")


# ------------------------------------------------------------------------------------------------------------
# Every loss on the full [B, T, V] logits with the label targets = the float64 reference on the sliced tensors

BATCHES = {
    "causal_right": lambda: causal_lm_batch(PROMPTS, RESPONSES, pad_id=0),
    "causal_left": lambda: causal_lm_batch(PROMPTS, RESPONSES, pad_id=0, padding_side="left"),
    "seq2seq": lambda: seq2seq_batch(PROMPTS, RESPONSES, pad_id=0, decoder_start_id=0),
}
V = 17


def sliced(kind, zs, zt, labels):
    """What a caller would have written by hand: causal logits[:, :-1] against labels[:, 1:]; seq2seq unchanged."""
    if kind == "seq2seq":
        return zs, zt, labels
    return zs[:, :-1], zt[:, :-1], labels[:, 1:]


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("name", ALL_CASES + ["cross_entropy", "token_log_probs"])
@pytest.mark.parametrize("kind", list(BATCHES))
def test_every_loss_on_full_logits_with_label_targets_equals_the_reference_on_sliced_logits(kind, name, chunk_size):
    labels = BATCHES[kind]()["labels"]
    targets, mask = targets_and_mask(labels, shift=kind != "seq2seq")
    gen = torch.Generator().manual_seed(sum(map(ord, kind + name)))
    zs = (2 * torch.randn(*labels.shape, V, generator=gen, dtype=torch.float64)).requires_grad_()
    zt = 2 * torch.randn(*labels.shape, V, generator=gen, dtype=torch.float64)
    zs_ref, zt_ref, labels_ref = sliced(kind, zs, zt, labels)
    mask_ref, g_ref = labels_ref != -100, labels_ref.clamp_min(0)
    if name == "cross_entropy":
        got = L.cross_entropy(zs, target_ids=targets, mask=mask, chunk_size=chunk_size)
        want = -torch.log(probs(zs_ref).gather(-1, g_ref[..., None])[..., 0])[mask_ref].mean()
    elif name == "token_log_probs":
        per_token = L.token_log_probs(zs, target_ids=targets, chunk_size=chunk_size)
        if kind != "seq2seq":
            assert (per_token[:, -1] == 0).all()
            per_token = per_token[:, :-1]
        weights = torch.arange(1.0, 1 + per_token.numel(), dtype=torch.float64).view(per_token.shape)
        got = (per_token * weights).sum()
        want = (torch.where(mask_ref, torch.log(probs(zs_ref)).gather(-1, g_ref[..., None])[..., 0], 0.0) * weights).sum()
    else:
        got = call(name, zs, zt, mask, targets, temperature=1.4, chunk_size=chunk_size)
        want = reference(name, zs_ref, zt_ref, mask_ref, g_ref, tau=1.4)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(got, zs)
    (grad_want,) = torch.autograd.grad(want, zs)
    torch.testing.assert_close(grad, grad_want, rtol=1e-9, atol=1e-12)
    if kind != "seq2seq":
        assert grad[:, -1].abs().max() == 0  # the last position predicts nothing


# ------------------------------------------------------------------------------------------------------------
# transformers as the oracle: its own loss from `labels=` and its logits on unpadded sequences

@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_causal_cross_entropy_on_label_targets_equals_the_models_own_loss(family, padding_side):
    model = tiny_model(family)
    prompts, responses = [[5, 6, 7, 20, 30], [8]], [[9, 10], [11, 12, 13]]  # lengths 7 and 4
    batch = causal_lm_batch(prompts, responses, pad_id=0, padding_side=padding_side)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        out = model(**inputs, labels=batch["labels"])
    targets, mask = targets_and_mask(batch["labels"], shift=True)
    for chunk_size in [None, 3]:
        torch.testing.assert_close(L.cross_entropy(out.logits, target_ids=targets, mask=mask, chunk_size=chunk_size),
                                   out.loss, rtol=1e-5, atol=1e-6)
    for b, (p, r) in enumerate(zip(prompts, responses)):  # padding and position_ids change no counted logit
        with torch.no_grad():
            alone = model(torch.tensor([p + r])).logits[0]
        counted = mask[b].nonzero().squeeze(1)
        start = 0 if padding_side == "right" else batch["input_ids"].shape[1] - len(p + r)
        torch.testing.assert_close(out.logits[b, counted], alone[counted - start], rtol=1e-4, atol=1e-5)


def test_seq2seq_decoder_inputs_are_what_t5_builds_from_labels_and_its_loss_matches():
    model = tiny_model("t5")
    batch = seq2seq_batch([[5, 6, 7, 8], [9]], [[20, 21], [22, 23, 24, 25]], pad_id=0,
                          decoder_start_id=model.config.decoder_start_token_id)
    encoder = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        theirs = model(**encoder, labels=batch["labels"])
        ours = model(**encoder, decoder_input_ids=batch["decoder_input_ids"],
                     decoder_attention_mask=batch["decoder_attention_mask"])
    targets, mask = targets_and_mask(batch["labels"], shift=False)
    torch.testing.assert_close(ours.logits[mask], theirs.logits[mask], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(L.cross_entropy(ours.logits, target_ids=targets, mask=mask), theirs.loss,
                               rtol=1e-5, atol=1e-6)
