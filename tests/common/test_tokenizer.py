import pytest

from common.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    tokenizer_sha256,
    train_sentencepiece,
)

CORPUS = [
    f"{name} has {a} apples and buys {b} more.\nSo {name} has {a} + {b} = {a + b} apples."
    for name in ("Danny", "Paco", "Mary", "Allan")
    for a, b in ((3, 4), (15, 18), (120, 7), (1450, 25))
] + ["Therefore, the answer is 32 .", "What could cats do if they were taller? Answer Choices:\nA. annoy\nB. jog\n"]

TRICKY = [
    "Danny has 1,450 wrappers.\nTherefore, the answer is 32 .",
    "  two  spaces, a tab\tand unicode: é — 😀 ",
    "$18.50 - 3 = -15.5\n\n",
    "",
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(CORPUS, str(tmp_path_factory.mktemp("sp") / "tok"), vocab_size=300)


def _hf_folder(path, with_bos: bool) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    special = {"bos_token": "<s>"} if with_bos else {}  # without: like Qwen2, no BOS at all
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", **special).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def hf_with_bos(tmp_path_factory):
    return _hf_folder(tmp_path_factory.mktemp("hf_bos"), with_bos=True)


@pytest.fixture(scope="module")
def hf_without_bos(tmp_path_factory):
    return _hf_folder(tmp_path_factory.mktemp("hf_nobos"), with_bos=False)


@pytest.mark.parametrize("kind", ["sp_model", "hf_with_bos"])
@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_any_text(kind, text, request):
    tok = load_tokenizer(request.getfixturevalue(kind))
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_sentencepiece_special_ids_follow_llama(sp_model):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)  # no pad piece -> 0, as the original
    plain = tok.encode("Paco has 3 apples.", bos=False, eos=False)
    assert tok.encode("Paco has 3 apples.", bos=True, eos=False) == [1] + plain
    assert tok.encode("Paco has 3 apples.", bos=False, eos=True) == plain + [2]
    assert tok.encode("Paco has 3 apples.", bos=True, eos=True) == [1] + plain + [2]
    assert max(plain) < tok.vocab_size


def test_sentencepiece_splits_digits_and_offsets_cover_them(sp_model):
    tok = load_tokenizer(sp_model)
    text = "So Mary has 1450 apples."
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text, bos=False, eos=False)
    digit_pieces = [text[b:e] for b, e in offsets if text[b:e].isdigit()]
    assert digit_pieces == ["1", "4", "5", "0"]


def test_training_is_deterministic(sp_model, tmp_path):
    again = train_sentencepiece(CORPUS, str(tmp_path / "tok"), vocab_size=300)
    assert open(again, "rb").read() == open(sp_model, "rb").read()
    assert tokenizer_sha256(again) == tokenizer_sha256(sp_model)


def test_loader_accepts_model_file_and_folders(sp_model, hf_with_bos, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(open(sp_model, "rb").read())
    assert isinstance(load_tokenizer(folder), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(hf_with_bos), HFTokenizer)
    assert isinstance(load_tokenizer(f"{hf_with_bos}/tokenizer.json"), HFTokenizer)


def test_bad_path_names_path_and_expected_files(tmp_path):
    with pytest.raises(ValueError) as err:
        load_tokenizer(tmp_path / "nowhere")
    assert "nowhere" in str(err.value) and "tokenizer.model" in str(err.value) and "tokenizer.json" in str(err.value)


def test_hf_with_bos_adds_bos_and_eos(hf_with_bos):
    tok = load_tokenizer(hf_with_bos)
    assert tok.bos_id is not None and tok.eos_id is not None and tok.bos_id != tok.eos_id
    plain = tok.encode("Allan has 7 apples.", bos=False, eos=False)
    assert tok.encode("Allan has 7 apples.", bos=True, eos=True) == [tok.bos_id] + plain + [tok.eos_id]
    assert tok.pad_id == tok.eos_id  # no pad token defined -> EOS


def test_hf_without_bos_makes_bos_a_no_op(hf_without_bos):
    tok = load_tokenizer(hf_without_bos)
    assert tok.bos_id is None
    plain = tok.encode("Allan has 7 apples.", bos=False, eos=False)
    assert tok.encode("Allan has 7 apples.", bos=True, eos=False) == plain
    assert tok.encode("Allan has 7 apples.", bos=True, eos=True) == plain + [tok.eos_id]


def test_hf_offsets_are_character_spans(hf_without_bos):
    tok = load_tokenizer(hf_without_bos)
    text = "So é has 1,450 apples."
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text, bos=False, eos=False)
    start = text.index("1,450")
    covering = [k for k, (b, e) in enumerate(offsets) if b < start + 5 and e > start]
    assert tok.decode(ids[covering[0]:covering[-1] + 1]).strip() == "1,450"


def test_chat_template_renders_with_the_folders_template_and_travels_with_it(hf_with_bos, sp_model, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from common.checkpoint import copy_tokenizer_files

    folder = tmp_path / "chat"
    shutil.copytree(hf_with_bos, folder)
    with pytest.raises(ValueError, match="has no chat template"):
        load_tokenizer(folder).encode_chat([{"role": "user", "content": "Q?"}])
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    tok = load_tokenizer(folder)
    messages = [{"role": "user", "content": "Paco has 3 apples."}]
    expected = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, add_generation_prompt=True,
                                                                          tokenize=False)
    assert tok.has_chat_template and tok.encode_chat(messages) == tok.tok.encode(expected, add_special_tokens=False)
    copied = tmp_path / "copied"
    copied.mkdir()
    copy_tokenizer_files(str(folder), str(copied))  # what checkpoint_split does when it converts a folder
    assert load_tokenizer(copied).encode_chat(messages) == tok.encode_chat(messages)
    assert tokenizer_sha256(copied) == tokenizer_sha256(folder) != tokenizer_sha256(hf_with_bos)
    with pytest.raises(ValueError, match="SentencePiece model has no chat template"):
        load_tokenizer(sp_model).encode_chat(messages)
