"""MiniLLM for encoder-decoder models: scoring a rollout and the per-minibatch loss (losses.md §4.4, spec §3.4).

A rollout is decoder tokens y sampled for an encoder prompt x from (1 - α)·q + α·p. Both models then score y
in one teacher-forced decoder pass each, with y as the labels: the decoder logits at t predict y_t (no
prompt/response concatenation, no shift of the logits). From log q_old(y_t) and log p(y_t):

    w_t = q_old(y_t) / ((1 - α) q_old(y_t) + α p(y_t))            importance weight of the mixed sampling
    r_t = clip((log p(y_t) - log q_old(y_t)) / 0.5, ±100)            reward
    A_t = whiten( (Σ_{t'≥t} γ^{t'-t} r_t') / (T - t) )               length-normalised return, γ = 0.95

and each PPO minibatch minimises L_pg (clipped, ρ = exp(log q_θ - log q_old)·w) + L_reg (exact per-step
reverse KL over the vocabulary, optional: the fork ran without it).
"""
import torch

from common.losses import (minillm_advantages, minillm_importance_weights, minillm_policy_loss, minillm_rewards,
                           minillm_whiten, reverse_kl, token_log_probs)


def decoder_logits(model, input_ids, attention_mask, labels, encoder_outputs=None):
    """Teacher-forced decoder logits [B, T, V] whose position t predicts labels[:, t] (pad/-100 positions are
    fed as pad; the caller masks them)."""
    labels = labels.masked_fill(labels < 0, model.config.pad_token_id)
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
    return model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                 encoder_outputs=encoder_outputs).logits


def rollout_quantities(log_q_old, log_p, mask, *, alpha=0.2, gamma=0.95, reward_scaling=0.5, reward_clip=100.0,
                       length_norm=True, group=None) -> dict:
    """Importance weights, rewards, returns-based advantages (before and after whitening over `group`)."""
    mask = mask.bool()
    weights = torch.where(mask, minillm_importance_weights(log_q_old, log_p, alpha=alpha), 1.0)
    rewards = torch.where(mask, minillm_rewards(log_p, log_q_old, reward_scaling=reward_scaling, clip=reward_clip),
                          0.0)
    raw = minillm_advantages(rewards, mask=mask, gamma=gamma, length_normalize=length_norm)
    return dict(weights=weights, rewards=rewards, raw_advantages=raw,
                advantages=minillm_whiten(raw, mask, group=group))


@torch.no_grad()
def score_rollout(student, teacher, input_ids, attention_mask, tokens, mask, *, group=None, **settings) -> dict:
    """log q_old and log p of sampled decoder `tokens` [B, T] (recomputed with dropout off) and the quantities
    of `rollout_quantities`; `settings` are its keyword arguments."""
    was_training = student.training
    student.eval()
    try:
        log_q_old = token_log_probs(decoder_logits(student, input_ids, attention_mask, tokens), tokens)
    finally:
        student.train(was_training)
    log_p = token_log_probs(decoder_logits(teacher, input_ids, attention_mask, tokens), tokens)
    out = dict(log_q_old=log_q_old, log_p=log_p)
    out.update(rollout_quantities(log_q_old, log_p, mask, group=group, **settings))
    return out


def minillm_loss(student, teacher, batch: dict, *, clip_range=0.2, single_step_reg=False, normalizer=None) -> dict:
    """L_pg (+ L_reg) on one minibatch of a rollout store: `batch` holds input_ids, attention_mask, tokens,
    mask, log_q_old, weights, advantages. Returns the terms; `loss` is their sum."""
    logits = decoder_logits(student, batch["input_ids"], batch["attention_mask"], batch["tokens"])
    log_q = token_log_probs(logits, batch["tokens"])
    terms = dict(pg=minillm_policy_loss(log_q, batch["log_q_old"], batch["weights"], batch["advantages"],
                                        batch["mask"], clip_range=clip_range, normalizer=normalizer))
    if single_step_reg:
        with torch.no_grad():
            teacher_logits = decoder_logits(teacher, batch["input_ids"], batch["attention_mask"], batch["tokens"])
        terms["reg"] = reverse_kl(logits, teacher_logits, mask=batch["mask"].bool(), normalizer=normalizer)
    terms["loss"] = sum(terms.values())
    return terms
