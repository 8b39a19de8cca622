"""Tiny random Hugging Face models (the oracle) and the same weights in our model."""
import torch
import transformers

from common.checkpoint import hf_to_meta, shard_for_rank
from common.model import ModelArgs, Transformer
from common.parallel import layout

FAMILIES = {
    # GQA everywhere; mistral's window is shorter than the test sequences so the boundary matters
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
               dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                           high_freq_factor=4.0, original_max_position_embeddings=32),
                    max_position_embeddings=256)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=5)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(num_local_experts=4, num_experts_per_tok=2)),
}


def tiny_hf_model(family: str, seed: int = 0, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    kwargs = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kwargs.update(extra)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).float().eval()
    with torch.no_grad():  # larger than the default 0.02 init, so that errors in the maths show in the logits
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 1.0)
        if family == "qwen2":
            model.lm_head.weight = model.model.embed_tokens.weight
    return model


def ours_from_hf(hf_model, max_seq_len: int = 64, max_batch_size: int = 8, **runtime) -> Transformer:
    """Our Transformer with the HF model's weights, sharded for the current TP layout."""
    args = ModelArgs.from_hf_config(hf_model.config.to_dict(), max_seq_len=max_seq_len,
                                    max_batch_size=max_batch_size, **runtime)
    state = hf_to_meta(hf_model.state_dict(), args)
    lay = layout()
    model = Transformer(args).float()
    model.load_state_dict(shard_for_rank(state, lay.tp_rank, lay.tp_size), strict=False)
    return model.eval()
