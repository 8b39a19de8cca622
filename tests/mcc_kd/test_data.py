import json
from pathlib import Path

import pytest

from common.tokenizer import load_tokenizer, train_sentencepiece
from mcc_kd.answers import is_correct, extract_answer
from mcc_kd.build_data import gsm8k_solution_to_cot
from mcc_kd.data import (
    IGNORE_INDEX,
    DataError,
    collate,
    encode_example,
    load_task_file,
    rationales,
    sidecar_path,
    span_bounds,
)
from mcc_kd.prepare_data import (
    answer_indices,
    correct_rationales,
    diverse_rationales,
    filter_file,
    jaccard,
    prepare_item,
)

DATA = Path(__file__).resolve().parents[2] / "data"
STANDIN = DATA / "SVAMP" / "train_standin.json"


@pytest.fixture(scope="module")
def standin():
    with open(STANDIN) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def sp_tok(standin, tmp_path_factory):
    lines = [x["instruction"] for x in standin] + [r for x in standin for r in x["output"]]
    return load_tokenizer(train_sentencepiece(lines, str(tmp_path_factory.mktemp("sp") / "tok"), vocab_size=600))


@pytest.fixture(scope="module")
def hf_tok_without_bos(standin, tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([r for x in standin for r in x["output"]], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path_factory.mktemp("hf")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    return load_tokenizer(folder)


# ---------------------------------------------------------------------------------------------------------
# Shipped files


def test_shipped_files_validate():
    for task in ("GSM8K", "SVAMP", "ASDiv", "CSQA"):
        for split in ("dev", "test"):
            assert len(load_task_file(DATA / task / f"{split}.json")) > 100
    for task in ("GSM8K", "SVAMP", "ASDiv"):
        assert all(isinstance(x["output"], list) for x in load_task_file(DATA / task / "train.json", train=True))
    assert all(x["label"] in "ABCDE" for x in load_task_file(DATA / "CSQA" / "train_questions.json"))


def test_standins_come_from_their_own_split():
    for split in ("train", "dev", "test"):
        standin = load_task_file(DATA / "SVAMP" / f"{split}_standin.json")
        full = load_task_file(DATA / "SVAMP" / f"{split}.json")
        assert standin == full[: len(standin)]
    train = {x["instruction"] for x in load_task_file(DATA / "SVAMP" / "train_standin.json")}
    test = {x["instruction"] for x in load_task_file(DATA / "SVAMP" / "test.json")}
    assert not train & test


def test_gsm8k_solution_conversion():
    answer = "He buys 3*4=<<3*4=12>>12 eggs.\nHe sells 12-2=<<12-2=10>>10.\n#### 1,000"
    assert gsm8k_solution_to_cot(answer) == (
        "He buys 3*4=12 eggs.\nHe sells 12-2=10.\nTherefore, the answer is 1,000 .", "1,000")


# ---------------------------------------------------------------------------------------------------------
# Filters


def test_correctness_filter_keeps_only_rationales_reaching_the_label(standin):
    item = standin[0]  # label 32; some rationales end in 67, 29, 52
    kept = correct_rationales(item["output"], item["label"], "SVAMP")
    assert 0 < len(kept) < len(item["output"])
    for k, r in enumerate(item["output"]):
        assert (k in kept) == is_correct(extract_answer(r, "SVAMP"), "32", "SVAMP")


def test_jaccard_is_over_word_sets():
    assert jaccard("a b c", "b c d") == 2 / 4
    assert jaccard("a a b", "a b b") == 1.0
    assert jaccard("So 32 .", "so 32.") == 0.0


def test_diversity_filter_drops_earlier_near_duplicates_at_threshold():
    base = "one two three four"
    outputs = [base, base + " five", "six seven", "six seven eight nine ten"]
    # jaccard(0, 1) = 4/5 = 0.8 (>= threshold: drop 0); jaccard(2, 3) = 2/5 (keep both)
    assert diverse_rationales(outputs, 0.8) == [1, 2, 3]
    assert diverse_rationales(outputs, 0.81) == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------------------
# Indices


def _check_spans(tok, item, task="SVAMP"):
    lengths = {end - start for start, end in item["indices"]}
    assert len(lengths) == 1
    for rationale, (start, end) in zip(item["output"], item["indices"]):
        ex = encode_example(tok, item["instruction"], rationale, max_seq_len=512)
        predicted = ex.tokens[start + 1: end + 1]  # logit t predicts token t + 1
        assert ex.labels[start:end] == predicted
        assert tok.decode(predicted).strip() == item["label"]
        lo, hi = span_bounds(tok, item["instruction"], rationale)
        assert lo <= start < end <= hi


def test_indices_decode_to_the_answer_with_sentencepiece(sp_tok, standin):
    kept = [prepare_item(x, "SVAMP", sp_tok)[0] for x in standin]
    kept = [x for x in kept if x is not None]
    assert len(kept) > len(standin) // 2
    for item in kept:
        _check_spans(sp_tok, item)
        assert len(item["output"]) >= 2 and len(item["output"]) == len(item["indices"])


def test_indices_without_bos_token(hf_tok_without_bos, standin):
    tok = hf_tok_without_bos
    assert tok.bos_id is None
    kept = [x for x in (prepare_item(x, "SVAMP", tok)[0] for x in standin) if x is not None]
    assert kept
    for item in kept:
        _check_spans(tok, item)


def test_answer_indices_follow_the_convention(sp_tok):
    instruction = "Paco had 8 cookies. How many?\n"
    rationale = "He had 8 cookies.\nTherefore, the answer is 14 ."
    (start, end), span_ids = answer_indices(sp_tok, instruction, rationale, "SVAMP")
    n_prompt = len(sp_tok.encode(instruction, bos=True, eos=False))
    target = sp_tok.encode(rationale, bos=False, eos=True)
    a = start - (n_prompt - 1)
    assert target[a: a + end - start] == span_ids and sp_tok.decode(span_ids) == "14"
    assert answer_indices(sp_tok, instruction, "I do not know.", "SVAMP") is None


def test_spans_beyond_max_seq_len_are_dropped(sp_tok, standin):
    item = next(x for x in standin if prepare_item(x, "SVAMP", sp_tok)[0] is not None)
    full, _ = prepare_item(item, "SVAMP", sp_tok)
    shortest_end = min(end for _, end in full["indices"])
    dropped, counts = prepare_item(item, "SVAMP", sp_tok, max_seq_len=shortest_end)
    assert dropped is None and counts[-1] == 0


def test_max_rationales_keeps_the_first_survivors(sp_tok, standin):
    item = next(x for x in (prepare_item(x, "SVAMP", sp_tok)[0] for x in standin) if x and len(x["output"]) > 2)
    raw = {"instruction": item["instruction"], "output": item["output"], "label": item["label"]}
    two, _ = prepare_item(raw, "SVAMP", sp_tok, max_rationales=2)
    assert two["output"] == item["output"][:2] and two["indices"] == item["indices"][:2]


def test_filter_writes_a_loadable_file_and_reports_each_step(sp_tok, tmp_path, capsys):
    out = tmp_path / "train-multi-cots.json"
    filter_file("SVAMP", str(STANDIN), str(out), sp_tok.path)
    report = capsys.readouterr().out
    for step in ("raw", "1. correct answer", "2. Jaccard diversity", "4. equal span tokens"):
        assert step in report
    items = load_task_file(out, multi_cot=True, tokenizer=sp_tok)
    for item in items:
        _check_spans(sp_tok, item)
    assert json.load(open(sidecar_path(out)))["report"][0]["rationales"] == sum(len(rationales(x)) for x in
                                                                                  load_task_file(STANDIN))


# ---------------------------------------------------------------------------------------------------------
# Training format


def test_encode_example_supervises_rationale_and_eos_only(sp_tok):
    ex = encode_example(sp_tok, "Q?\n", "So 3 .", max_seq_len=512)
    prompt = sp_tok.encode("Q?\n", bos=True, eos=False)
    target = sp_tok.encode("So 3 .", bos=False, eos=True)
    assert ex.tokens == prompt + target and ex.prompt_len == len(prompt)
    assert ex.labels == [IGNORE_INDEX] * (len(prompt) - 1) + target + [IGNORE_INDEX]


def test_truncation_drops_the_end_of_the_output(sp_tok):
    prompt = sp_tok.encode("Q?\n", bos=True, eos=False)
    target = sp_tok.encode("So the answer is 3 .", bos=False, eos=True)
    ex = encode_example(sp_tok, "Q?\n", "So the answer is 3 .", max_seq_len=len(prompt) + 3)
    assert ex.tokens == prompt + target[:3]
    with pytest.warns(UserWarning, match="cut"):
        ex = encode_example(sp_tok, "Q?\n", "So 3 .", max_seq_len=2)
    assert ex.tokens == prompt[:2] and set(ex.labels) == {IGNORE_INDEX}


def test_collate_right_pads(sp_tok):
    a, b = encode_example(sp_tok, "Q?\n", "3", 512), encode_example(sp_tok, "Question two?\n", "So 3 .", 512)
    tokens, labels = collate([a, b], pad_id=sp_tok.pad_id)
    width = max(len(a.tokens), len(b.tokens))
    assert tokens.shape == labels.shape == (2, width)
    assert tokens[0, len(a.tokens):].eq(sp_tok.pad_id).all() and labels[0, len(a.tokens):].eq(IGNORE_INDEX).all()
    assert labels[0, :len(a.labels)].tolist() == a.labels and labels[1].tolist() == b.labels


# ---------------------------------------------------------------------------------------------------------
# Malformed data


GOOD = {"instruction": "Q?\n", "output": ["So 3 .", "Thus 3 ."], "label": "3", "indices": [[3, 4], [3, 4]]}


def _write(tmp_path, items, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(items))
    return path


def _fix_indices(tok, item):
    return [answer_indices(tok, item["instruction"], r, "SVAMP")[0] for r in item["output"]]


@pytest.mark.parametrize("bad,field,message", [
    ({k: v for k, v in GOOD.items() if k != "label"}, "label", "missing field"),
    ({k: v for k, v in GOOD.items() if k != "indices"}, "indices", "missing field"),
    ({**GOOD, "output": [], "indices": []}, "output", "empty rationale list"),
    ({**GOOD, "output": ["So 3 ."], "indices": [[3, 4]]}, "output", "at least 2"),
    ({**GOOD, "indices": [[3, 4]]}, "indices", "one [start, end] span per rationale"),
    ({**GOOD, "indices": [[3, 4], [3, 5]]}, "indices", "unequal length"),
    ({**GOOD, "indices": [[4, 4], [3, 3]]}, "indices", "start < end"),
    ({**GOOD, "label": 3}, "label", "expected a string"),
])
def test_malformed_item_names_file_item_and_field(tmp_path, bad, field, message):
    path = _write(tmp_path, [GOOD, GOOD, bad])
    with pytest.raises(DataError) as err:
        load_task_file(path, multi_cot=True)
    text = str(err.value)
    assert "bad.json" in text and "item 2" in text and f"field '{field}'" in text and message in text


@pytest.mark.filterwarnings("ignore:.*cannot check")  # a file without sidecar
def test_indices_out_of_range_are_reported(sp_tok, tmp_path):
    item = {**GOOD}
    item["indices"] = _fix_indices(sp_tok, item)
    assert load_task_file(_write(tmp_path, [item]), multi_cot=True, tokenizer=sp_tok)
    far = [[s + 100, e + 100] for s, e in item["indices"]]
    with pytest.raises(DataError, match=r"bad.json: item 1: field 'indices': span 0 .* out of range"):
        load_task_file(_write(tmp_path, [item, {**item, "indices": far}]), multi_cot=True, tokenizer=sp_tok)


def test_indices_from_another_tokenizer_are_refused(sp_tok, standin, tmp_path):
    out = tmp_path / "multi.json"
    filter_file("SVAMP", str(STANDIN), str(out), sp_tok.path)
    other = load_tokenizer(train_sentencepiece([r for x in standin[:5] for r in x["output"]],
                                               str(tmp_path / "other"), vocab_size=400))
    with pytest.raises(DataError, match=r"multi.json: field 'indices': indices were computed with tokenizer"):
        load_task_file(out, multi_cot=True, tokenizer=other)


def test_not_a_list_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="bad.json: expected a JSON list"):
        load_task_file(_write(tmp_path, {"instruction": "x"}))
    with pytest.raises(DataError, match="nope.json"):
        load_task_file(tmp_path / "nope.json")


def test_a_chat_prompt_over_the_limit_loses_user_text_never_the_assistant_header(smollm2_dir):
    from common.cli import UserError
    from mcc_kd.data import encode_example
    from mcc_kd.eval import eval_prompt

    tok = load_tokenizer(smollm2_dir)
    instruction = "Tom has 3 apples and buys 4 more. " * 20 + "How many apples does Tom have?"
    header = tok.encode_chat([{"role": "user", "content": "x"}])[-3:]  # "<|im_end|>\n<|im_start|>assistant\n"
    full = tok.encode_chat([{"role": "user", "content": instruction}])
    for limit in (len(full) - 1, 60, 33):  # SmolLM2's template (its system turn) alone takes 30 tokens
        with pytest.warns(UserWarning, match="cut"):
            prompt = eval_prompt(tok, instruction, limit + 1, chat=True)
        assert len(prompt) <= limit and prompt[-3:] == header
        kept = tok.decode(prompt).split("user\n", 1)[1].rsplit("\nassistant", 1)[0]
        assert kept and instruction.startswith(kept.strip())
    with pytest.warns(UserWarning, match="cut"):
        ex = encode_example(tok, instruction, "3 + 4 = 7", 48, chat=True)
    assert ex.tokens[ex.prompt_len - 3:ex.prompt_len] == header and len(ex.tokens) <= 48
    with pytest.warns(UserWarning), pytest.raises(UserError, match="raise --max_seq_len"):
        eval_prompt(tok, instruction, 21, chat=True)
    assert eval_prompt(tok, "short", 512, chat=True) == tok.encode_chat([{"role": "user", "content": "short"}])
