"""common.hf: loading causal and seq2seq models, LoRA through peft, the teacher/student vocabulary check."""
import pytest
import torch

from common import hf
from common.cli import UserError
from tests.tiny import VOCAB_SIZE, char_tokenizer, save_tiny, swapped_tokenizer, tiny_config, tiny_model


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama", "t5"])
def test_loaded_model_gives_the_saved_models_logits(tmp_path, family):
    folder = save_tiny(family, tmp_path / family)
    model = hf.load_model(folder, dtype="float32")
    ids = torch.randint(4, 100, (2, 7))
    kwargs = {"decoder_input_ids": ids[:, :3]} if family == "t5" else {}
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids, **kwargs).logits, tiny_model(family)(input_ids=ids, **kwargs).logits)
    assert hf.is_seq2seq(model) == (family == "t5")
    assert hf.load_tokenizer(folder).encode("ab", add_special_tokens=False) == char_tokenizer().encode("ab", add_special_tokens=False)


def test_teacher_is_frozen_in_eval_mode_and_keeps_its_saved_dtype(tmp_path):
    folder = str(tmp_path / "bf16")
    tiny_model("llama").to(torch.bfloat16).save_pretrained(folder)
    teacher = hf.load_model(folder, frozen=True)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert next(teacher.parameters()).dtype == torch.bfloat16
    assert next(hf.load_model(folder, dtype="float32").parameters()).dtype == torch.float32


def test_a_path_that_is_not_a_transformers_folder_gets_one_line_naming_flag_path_and_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "native").mkdir()
    (tmp_path / "native" / "params.json").write_text("{}")
    (tmp_path / "file.bin").write_text("x")
    (tmp_path / "config_only").mkdir()
    tiny_model("gpt2").config.save_pretrained(tmp_path / "config_only")
    cases = {"missing": r"does not exist", "empty": r"no config\.json\): pass a folder written by save_pretrained",
             "native": r"native consolidated.*checkpoint_split export_hf", "file.bin": r"a file, not a folder",
             "config_only": r"config\.json but no \*\.safetensors"}
    for name, reason in cases.items():
        with pytest.raises(ValueError, match=rf"^--teacher_model_path .*{name} is not a transformers model folder.*{reason}") as e:
            hf.load_model(tmp_path / name, flag="--teacher_model_path")
        assert "\n" not in str(e.value)


def test_vocabulary_mismatch_names_both_sizes_and_padded_vocabularies_need_the_opt_in():
    student, teacher = tiny_model("gpt2"), tiny_model("llama", vocab_size=VOCAB_SIZE + 8)
    tok = char_tokenizer()
    assert hf.check_vocab(student, tiny_model("opt"), tok, char_tokenizer()) == VOCAB_SIZE
    with pytest.raises(ValueError, match=rf"teacher outputs {VOCAB_SIZE + 8} logits .* student {VOCAB_SIZE}.*--allow_padded_vocab"):
        hf.check_vocab(student, teacher, tok, tok)
    assert hf.check_vocab(student, teacher, tok, tok, allow_padded=True) == VOCAB_SIZE
    small = tiny_model("opt", vocab_size=64)  # fewer rows than the 100-token tokenizer: not mere padding
    with pytest.raises(ValueError, match=r"tokenizer has 100 tokens, more than the smaller vocabulary \(teacher 64, student 128\)"):
        hf.check_vocab(student, small, tok, tok, allow_padded=True)


def test_a_student_whose_tokenizer_differs_at_the_same_size_is_refused_with_one_line():
    student, teacher, tok, other = tiny_model("gpt2"), tiny_model("opt"), char_tokenizer(), swapped_tokenizer()
    assert len(other) == len(tok) and hf.vocab_width(student) == hf.vocab_width(teacher)  # sizes alone agree
    for allow_padded in (False, True):
        with pytest.raises(ValueError, match=r"^the student's tokenizer \(--model_path.*\) and the teacher's "
                                             r"\(--teacher_model_path.*\) differ: 100 vs 100 tokens, 2 of the "
                                             r"student's at other ids \(e\.g\. 'b' is 14 vs 15\); distil") as e:
            hf.check_vocab(student, teacher, other, tok, allow_padded=allow_padded)
        assert "\n" not in str(e.value)


def test_same_vocabulary_with_another_eos_is_refused():
    from transformers import PreTrainedTokenizerFast

    other = PreTrainedTokenizerFast(tokenizer_object=char_tokenizer().backend_tokenizer, pad_token="<pad>",
                                    eos_token="<s>", unk_token="<unk>", bos_token="<s>")
    with pytest.raises(ValueError, match=r"same vocabulary but different eos_token \('</s>' vs '<s>'\)"):
        hf.check_vocab(tiny_model("gpt2"), tiny_model("opt"), char_tokenizer(), other,
                       flags=("--student_model_path", "--teacher_model_path"))


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_lora_trains_only_adapters_and_merging_keeps_the_logits(family):
    model = hf.add_lora(tiny_model(family), r=4, alpha=8, dropout=0.0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B starts at 0; make the adapters matter
    ids = torch.randint(4, 100, (2, 6))
    kwargs = {"decoder_input_ids": ids[:, :4]} if family == "t5" else {}
    merged = hf.merge_lora(model)
    assert not hf.is_lora(merged) and hf.is_lora(model)  # the trained model keeps its adapters
    with torch.no_grad():
        base = tiny_model(family)(input_ids=ids, **kwargs).logits
        adapted = model.eval()(input_ids=ids, **kwargs).logits
        assert not torch.allclose(adapted, base, atol=1e-3)
        torch.testing.assert_close(merged(input_ids=ids, **kwargs).logits, adapted, atol=2e-5, rtol=1e-4)


def test_kept_layers_model_is_the_transformers_model_of_those_blocks_and_generates_with_its_cache(tmp_path):
    from transformers import AutoModelForCausalLM
    teacher = tiny_model("llama", num_hidden_layers=4)
    student = hf.keep_layers(tiny_model("llama", num_hidden_layers=4), [1, 3])
    # oracle: a fresh 2-block transformers Llama holding blocks 1 and 3, embeddings, norm and head of the teacher
    fresh = AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=2)).eval()
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("model.layers.")}
    for new, old in enumerate([1, 3]):
        state.update({k.replace(f"model.layers.{old}.", f"model.layers.{new}."): v
                      for k, v in teacher.state_dict().items() if k.startswith(f"model.layers.{old}.")})
    fresh.load_state_dict(state)
    ids = torch.randint(4, 100, (2, 9))
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).logits, fresh(input_ids=ids).logits)
        assert torch.equal(student.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0),
                           fresh.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))
    assert student.config.num_hidden_layers == 2 and [b.self_attn.layer_idx for b in student.model.layers] == [0, 1]


def test_keep_layers_cli_saves_a_loadable_student_and_refuses_bad_indices(tmp_path):
    folder = save_tiny("llama", tmp_path / "teacher", num_hidden_layers=4)
    hf.save_kept_layers(folder, str(tmp_path / "student"), "0,2")
    student = hf.load_model(tmp_path / "student")
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert student.config.tie_word_embeddings == tiny_config("llama").tie_word_embeddings
    with torch.no_grad():
        ids = torch.randint(4, 100, (1, 5))
        want = hf.keep_layers(hf.load_model(folder), [0, 2])(input_ids=ids).logits
        assert torch.equal(student(input_ids=ids).logits, want)
    for bad in ([2, 0], [0, 4], []):
        with pytest.raises(ValueError, match=r"--layers .*: give increasing, distinct block indices in \[0, 4\)"):
            hf.keep_layers(hf.load_model(folder), bad)
    with pytest.raises(ValueError, match="has no model.layers"):
        hf.keep_layers(tiny_model("gpt2"), [0])


def materialise(head):
    """The logits a HeadLogits stands for, computed whole."""
    z = sum(h @ w.T for h, w in head.terms)
    return z if head.bias is None else z + head.bias


@pytest.mark.parametrize("family, overrides", [("gpt2", {}), ("opt", {}), ("llama", {}),
                                               ("llama", {"tie_word_embeddings": True}), ("t5", {}),
                                               ("t5", {"scale_decoder_outputs": True})])
def test_head_logits_are_the_models_logits_with_the_heads_weights_and_gradients(family, overrides):
    """The head input and weights give the model's own logits (T5's tied head: the d_model**-0.5 scaling is in
    the hidden states), and a loss through them gives the model's gradients (a tied head: the embedding's
    gradient from both uses)."""
    model = tiny_model(family, **overrides)
    ids = torch.randint(4, 100, (2, 7))
    inputs = dict(input_ids=ids, **({"decoder_input_ids": ids[:, :5]} if family == "t5" else {}))
    want = model(**inputs).logits
    out, head = hf.head_logits(model, **inputs)
    assert out.logits is None and isinstance(model.get_output_embeddings(), torch.nn.Linear)  # head restored
    assert head.weight is model.get_output_embeddings().weight
    torch.testing.assert_close(materialise(head), want, rtol=1e-5, atol=1e-6)
    if overrides.get("tie_word_embeddings"):
        assert head.weight is model.get_input_embeddings().weight
    params = [p for p in model.parameters()]
    want_grads = torch.autograd.grad(want.square().mean(), params)
    got_grads = torch.autograd.grad(materialise(head).square().mean(), params)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_head_logits_of_a_lora_head_add_the_adapter_term():
    model = hf.add_lora(tiny_model("llama"), r=4, alpha=8, target_modules=["q_proj", "v_proj", "lm_head"])
    with torch.no_grad():  # B = 0 at init: give the head's adapter a non-zero update
        for name, p in model.named_parameters():
            if "lm_head.lora_B" in name:
                p.normal_()
    ids = torch.randint(4, 100, (2, 6))
    want = model(input_ids=ids).logits
    _, head = hf.head_logits(model, input_ids=ids)
    assert len(head.terms) == 2 and head.terms[1][0].shape == (2, 6, 4)
    torch.testing.assert_close(materialise(head), want, rtol=1e-5, atol=1e-6)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for g, w in zip(torch.autograd.grad(materialise(head).sum(), trainable),
                    torch.autograd.grad(want.sum(), trainable)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_head_logits_refuse_a_model_that_changes_its_heads_output():
    model = tiny_model("llama")
    original = model.forward

    def soft_capped(**kw):
        out = original(**kw)
        out.logits = 30 * torch.tanh(out.logits / 30)
        return out
    model.forward = soft_capped
    with pytest.raises(UserError, match="transforms its head's output.*--fast_kd false"):
        hf.head_logits(model, input_ids=torch.randint(4, 100, (1, 4)))
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)
def test_chat_prompt_is_the_tokenizers_template_of_one_user_turn(smollm2_dir):
    tok = hf.load_tokenizer(smollm2_dir)
    text = hf.chat_prompt(tok, "Name a colour.", "Think of the sky.")
    assert text == tok.apply_chat_template([{"role": "user", "content": "Name a colour.\n\nThink of the sky."}],
                                           tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nName a colour." in text
    assert hf.chat_prompt(tok, "Name a colour.").count("\n\n") == 0  # no input: no blank line
    with pytest.raises(hf.UserError, match="no chat template"):
        hf.chat_prompt(char_tokenizer(), "x")
