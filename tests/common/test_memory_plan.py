"""common.memory_plan: its counts against bytes measured on small models (saved-for-backward tensors through
torch.autograd.graph.saved_tensors_hooks; parameters, gradients and optimiser states of a trained step), the
published configs against transformers' own parameter counts, and the table over the scripts.
(The sharded counts at 2 processes are checked in tests/common/test_hf_training_fsdp.py, which measures them.)
"""
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, GPT2Config, LlamaConfig, OPTConfig, T5Config

from common import memory_plan
from common.hf import add_lora

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, dropout=0.0, attention_dropout=0.0,
                  dropout_rate=0.0)


def saved_bytes(model, inputs) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward (parameters excluded)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs).logits.sum()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in weights)


def config(family, layers, decoder_layers=None):
    common = dict(vocab_size=300, **NO_DROPOUT)
    if family == "llama":
        return LlamaConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=6,
                           num_key_value_heads=2, **common)
    if family == "opt":
        return OPTConfig(hidden_size=96, ffn_dim=160, num_hidden_layers=layers, num_attention_heads=6,
                         word_embed_proj_dim=96, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=96, n_inner=160, n_layer=layers, n_head=6, **common)
    return T5Config(d_model=96, d_ff=160, d_kv=16, num_heads=6, num_layers=layers,
                    num_decoder_layers=decoder_layers or layers, feed_forward_proj="gated-gelu",
                    decoder_start_token_id=0, **common)


def measured_layer(family, batch, seq, dec_seq=None, which="decoder"):
    """Saved bytes of one more layer (2 layers minus 1), fp32, on this CPU."""
    out = []
    for layers in (1, 2):
        if family == "t5":
            cfg = config("t5", layers if which == "encoder" else 1, layers if which == "decoder" else 1)
            model = AutoModelForSeq2SeqLM.from_config(cfg).train()
            inputs = {"input_ids": torch.randint(0, 300, (batch, seq)),
                      "decoder_input_ids": torch.randint(0, 300, (batch, dec_seq))}
        else:
            model = AutoModelForCausalLM.from_config(config(family, layers)).train()
            inputs = {"input_ids": torch.randint(0, 300, (batch, seq))}
        out.append(saved_bytes(model, inputs))
    return out[1] - out[0]


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_a_decoder_layers_activation_count_matches_the_bytes_it_saves(family):
    planned = memory_plan.layer_activations(config(family, 1), tokens=3 * 40)[0]
    assert planned == pytest.approx(measured_layer(family, 3, 40), rel=0.1)


def test_t5_encoder_and_decoder_layer_counts_match_the_bytes_they_save():
    cfg = config("t5", 1)
    planned = memory_plan.layer_activations(cfg, tokens=2 * 48, dec_tokens=2 * 24, seq=24, enc_seq=48,
                                            attention_probs=True)  # the CPU kernel saves biased softmaxes
    assert planned[0] == pytest.approx(measured_layer("t5", 2, 48, 24, "encoder"), rel=0.1)
    assert planned[1] == pytest.approx(measured_layer("t5", 2, 48, 24, "decoder"), rel=0.1)


def test_an_rwkv_block_count_matches_the_bytes_it_saves():
    from rwkv_llama.model import build_hybrid

    def hybrid_saved(layers):
        teacher = AutoModelForCausalLM.from_config(config("llama", 2))
        student = build_hybrid(teacher, layers, "block", head_size=16, chunk_len=memory_plan.RWKV_CHUNK).train()
        return saved_bytes(student.requires_grad_(True), {"input_ids": torch.randint(0, 300, (2, 64))})

    measured = hybrid_saved([0, 1]) - hybrid_saved([0])  # one more decoder layer replaced by an RWKV block
    cfg, tokens = config("llama", 2), 2 * 64
    planned = (memory_plan.layer_activations(cfg, tokens, hybrid=True)[0]
               - memory_plan.layer_activations(cfg, tokens)[0])
    assert planned == pytest.approx(measured, rel=0.1)


@pytest.mark.parametrize("lora", [0, 4])
def test_model_states_match_a_trained_steps_parameters_gradients_and_adam_states(lora):
    model = AutoModelForCausalLM.from_config(config("llama", 2))
    teacher = AutoModelForCausalLM.from_config(config("llama", 3)).to(torch.bfloat16).requires_grad_(False)
    if lora:
        model = add_lora(model, r=lora, alpha=2 * lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    for _ in range(2):
        model(input_ids=torch.randint(0, 300, (2, 8))).logits.sum().backward()
        optimizer.step()
    measured = memory_plan.measured_bytes(model, optimizer, teacher)
    planned = memory_plan.model_states(model, teacher, teacher_dtype="bfloat16")
    for part in ("params", "grads", "optimizer", "teacher"):
        assert planned[part] == pytest.approx(measured[part], rel=0.1), part


def test_adafactor_states_are_factored_as_transformers_keeps_them():
    from transformers.optimization import Adafactor

    model = AutoModelForSeq2SeqLM.from_config(config("t5", 1))
    optimizer = Adafactor(model.parameters(), lr=1e-3, relative_step=False, scale_parameter=False)
    model(input_ids=torch.randint(0, 300, (2, 8)), labels=torch.randint(0, 300, (2, 5))).loss.backward()
    optimizer.step()
    measured = memory_plan.measured_bytes(model, optimizer)["optimizer"]
    assert memory_plan.optimizer_bytes(list(model.parameters()), "adafactor") == pytest.approx(measured, rel=0.1)


# Flan-T5-XL is 2.85 B with its own output head; transformers 5 ties T5's head to the shared embedding (2.78 B)
@pytest.mark.parametrize("name, billions", [("llama-2-7b", 6.74), ("llama-2-13b", 13.02), ("llama-3.1-8b", 8.03),
                                            ("opt-6.7b", 6.66), ("flan-t5-xl", 2.78), ("gpt2-xl", 1.56)])
def test_the_published_configs_give_the_models_known_sizes(name, billions):
    model = memory_plan.meta_model(memory_plan.config_of(name))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.01)
    assert next(model.parameters()).device.type == "meta"


def test_every_setting_names_a_script_of_its_folder_and_the_table_says_what_each_needs():
    assert all(os.path.exists(os.path.join(ROOT, s.script)) for s in memory_plan.SETTINGS)
    setting = next(s for s in memory_plan.SETTINGS if s.student == "opt-2.7b")
    plan = memory_plan.plan(setting)
    # DDP holds the whole student, its states and the teacher: 16 bytes per student weight + 2 per teacher weight
    assert plan.parts["ddp"]["params"] + plan.parts["ddp"]["optimizer"] == pytest.approx(12 * 2.65e9, rel=0.02)
    assert plan.gpu("fsdp") < plan.gpu("ddp") / 3 and plan.parts["fsdp_offload"]["cpu"] > 0
    assert plan.needs(80) == "ddp" and plan.needs(40) == "fsdp"
    text = memory_plan.table([plan])
    assert "| atkd/distillation.sh | OPT-2.7B <- OPT-6.7B | 8 |" in text and text.count("\n") == 2
