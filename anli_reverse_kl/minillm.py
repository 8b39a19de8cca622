"""MiniLLM for encoder-decoder models (the fork's Flan-T5) and causal LMs (LMOps' original setting): rollouts,
their scores, and the PPO minibatch loss (losses.md §4.4, spec §3.4).

A rollout is tokens y sampled for a prompt x from (1 - α)·q + α·p (common.generation, the teacher decoding in
lock-step with its own cache). Both models then score y in one teacher-forced pass each
(common.generation.pad_rollouts): for T5 the decoder reads start + y[:-1] under the encoder prompt, for a
causal LM the sequence is x + y; either way the targets and mask are aligned with the unshifted logits, so
position t scores y_t. From log q_old(y_t) and log p(y_t):

    w_t = q_old(y_t) / ((1 - α) q_old(y_t) + α p(y_t))            importance weight of the mixed sampling
    r_t = clip((log p(y_t) - log q_old(y_t)) / 0.5, ±100)            reward
    A_t = whiten( (Σ_{t'≥t} γ^{t'-t} r_t') / (T - t) )               length-normalised return, γ = 0.95

and each PPO minibatch minimises L_pg (clipped, ρ = exp(log q_θ - log q_old)·w) + L_reg (the exact per-step
reverse KL over the vocabulary; optional, the fork ran without it).

As released (LMOps / the fork): the student's log-probabilities (log q_old, log q_θ), the teacher's inside the
mixture weight and both sides of L_reg are taken at the sampling temperature τ (logits / τ); the teacher's
log p in the reward at τ = 1. Whitening (`whiten="release"`) runs per PPO micro-batch inside the loss, over
every entry of its [B, width] advantages (padding zeros included, width = the padded response length; a causal
LM's response entries are first packed to the left, as the release holds them);
`whiten="masked"` whitens once per store over the response tokens of all data-parallel ranks.
"""
import torch

from common import hf
from common.generation import generate, pad_rollouts
from common.losses import (minillm_advantages, minillm_importance_weights, minillm_policy_loss, minillm_rewards,
                           minillm_whiten, reverse_kl, token_log_probs)

MODEL_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")  # the last two: T5
STORE_FIELDS = MODEL_INPUTS + ("targets", "mask", "log_q_old", "weights", "raw_advantages", "advantages")
WHITEN = ("release", "masked")


def store_fields(store: dict) -> list:
    """The STORE_FIELDS a store holds (a causal LM's has no decoder inputs)."""
    return [k for k in STORE_FIELDS if k in store]


def sample_responses(student, teacher, prompts, *, max_new_tokens, alpha=0.2, temperature=1.0, top_k=0, top_p=1.0,
                     eos_id, seed, pad_id=0):
    """Samples for `prompts` from (1 - α) q + α p (plain student sampling for α = 0): a `Generations` with the
    recorded weights q/p̃. A causal LM's prompts are left-padded with `pad_id` (one prefill for all)."""
    return generate(student, prompts, max_new_tokens, temperature, top_p, eos_id, top_k=top_k, pad_id=pad_id,
                    padding="left", teacher=teacher if alpha > 0 else None, teacher_mixed_alpha=alpha, seed=seed)


def sampled_log_probs(model, inputs: dict, targets, mask, temperature=1.0):
    """log softmax(logits / τ)(y_t | x, y_<t) of the sampled tokens (0 off the mask), from one teacher-forced
    decoder pass; also returns the logits."""
    logits = model(**inputs).logits
    return token_log_probs(logits, target_ids=targets.masked_fill(~mask, -100), temperature=temperature), logits


def rollout_quantities(log_q_old, log_p, mask, *, log_p_mix=None, alpha=0.2, gamma=0.95, reward_scaling=0.5,
                       reward_clip=100.0, length_norm=True, group=None) -> dict:
    """Importance weights, rewards, returns-based advantages (before and after masked whitening over `group`).
    log_p: the teacher in the reward; log_p_mix: the teacher in the mixture weight (default log_p)."""
    mask = mask.bool()
    log_p_mix = log_p if log_p_mix is None else log_p_mix
    weights = torch.where(mask, minillm_importance_weights(log_q_old, log_p_mix, alpha=alpha), 1.0)
    rewards = torch.where(mask, minillm_rewards(log_p, log_q_old, reward_scaling=reward_scaling, clip=reward_clip),
                          0.0)
    raw = minillm_advantages(rewards, mask=mask, gamma=gamma, length_normalize=length_norm)
    return dict(weights=weights, rewards=rewards, raw_advantages=raw,
                advantages=minillm_whiten(raw, mask=mask, group=group))


@torch.no_grad()
def score_rollouts(student, teacher, prompts, responses, *, pad_id, batch_size=None, group=None, temperature=1.0,
                   **settings) -> dict:
    """The PPO store of `responses` to `prompts` (token-id lists), padded into one batch
    (common.generation.pad_rollouts): model inputs, targets, mask, log q_old (at τ) and log p (at 1; at τ for
    the mixture weight), recomputed with dropout off, `batch_size` rows at a time, and the quantities of
    `rollout_quantities` (`settings` are its keyword arguments; its masked whitening runs over the whole store
    and the `group` of data-parallel ranks)."""
    start_id = student.config.decoder_start_token_id if hf.is_seq2seq(student) else None
    rollouts = pad_rollouts(prompts, responses, pad_id=pad_id, decoder_start_id=start_id,
                            device=next(student.parameters()).device)
    inputs, targets, mask = rollouts.model_inputs(), rollouts.targets, rollouts.response_mask
    n = targets.shape[0]
    batch_size = batch_size or n
    was_training = student.training
    student.eval()
    log_q_old, log_p, log_p_mix = [], [], []
    try:
        for s in range(0, n, batch_size):
            rows = {k: v[s:s + batch_size] for k, v in inputs.items()}
            part = targets[s:s + batch_size].masked_fill(~mask[s:s + batch_size], -100)
            log_q_old.append(sampled_log_probs(student, rows, targets[s:s + batch_size], mask[s:s + batch_size],
                                               temperature)[0])
            lp, teacher_logits = sampled_log_probs(teacher, rows, targets[s:s + batch_size], mask[s:s + batch_size])
            log_p.append(lp)
            log_p_mix.append(lp if temperature == 1 else
                             token_log_probs(teacher_logits, target_ids=part, temperature=temperature))
    finally:
        student.train(was_training)
    store = dict(inputs, targets=targets, mask=mask, log_q_old=torch.cat(log_q_old), log_p=torch.cat(log_p))
    store.update(rollout_quantities(store["log_q_old"], store["log_p"], mask, log_p_mix=torch.cat(log_p_mix),
                                    group=group, **settings))
    return store


def minillm_loss(student, teacher, batch: dict, *, clip_range=0.2, single_step_reg=False, normalizer=None,
                 temperature=1.0, whiten="release", width=None, group=None) -> dict:
    """L_pg (+ L_reg) on one minibatch of the store (`batch` has its store_fields). Returns the terms and `loss`,
    their sum; `normalizer` = response tokens of the whole optimiser step (None: this minibatch's).
    whiten="release": the minibatch's raw advantages whitened here over every entry of [B, width] (`group`:
    the data-parallel ranks, whose minibatches of this step share the statistics); "masked": the store's."""
    if whiten not in WHITEN:
        raise ValueError(f"whiten must be one of {WHITEN}, got {whiten!r}")
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    log_q, logits = sampled_log_probs(student, inputs, batch["targets"], batch["mask"], temperature)
    advantages = release_whiten(batch["raw_advantages"], batch["mask"], "decoder_input_ids" in batch, width, group) \
        if whiten == "release" else batch["advantages"]
    terms = dict(pg=minillm_policy_loss(log_q, batch["log_q_old"], batch["weights"], advantages,
                                        mask=batch["mask"], clip_range=clip_range, normalizer=normalizer))
    if single_step_reg:
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits
        terms["reg"] = reverse_kl(logits, teacher_logits, mask=batch["mask"], normalizer=normalizer,
                                  temperature=temperature)
    terms["loss"] = sum(terms.values())
    return terms


def release_whiten(raw, mask, seq2seq: bool, width, group):
    """The release's per-minibatch whitening of [B, width] response advantages. A T5 store holds them so; a
    causal LM's sit after each row's prompt, so they are packed to the left first and put back after (the
    entries off the mask are 0 and never count in the loss)."""
    if seq2seq:
        return minillm_whiten(raw, width=width, group=group)
    lengths = mask.sum(1)
    packed_mask = torch.arange(max(1, int(lengths.max())), device=raw.device) < lengths[:, None]
    packed = raw.new_zeros(packed_mask.shape)
    packed[packed_mask] = raw[mask]
    out = torch.zeros_like(raw)
    out[mask] = minillm_whiten(packed, width=width, group=group)[packed_mask]
    return out
