import pytest
import torch

from atkd.train import SAMPLE_SOURCES, collate, sample_responses
from common.labels import targets_and_mask
from tests.tiny import char_tokenizer, tiny_model

EOS, PAD = 1, 0


def _prompts():
    tok = char_tokenizer()
    return [tok("Human:\nhi \n\nAssistant:\n").input_ids, tok("Human:\nsay more \n\nAssistant:\n").input_ids]


def _greedy(model, prompt, max_new):
    """Oracle: transformers' own greedy decoding of one unpadded prompt."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    return out[0, len(prompt):].tolist()


def _cut_at_eos(tokens):
    """A continuation as the student source returns it: up to and including the first EOS."""
    return tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens


def _eos_where(model, prompt, step):
    """Swap the head rows of EOS and of the token greedy decoding emits at `step`: the model now stops there."""
    token = _greedy(model, prompt, step + 1)[step]
    with torch.no_grad():
        w = model.lm_head.weight
        w[[EOS, token]] = w[[token, EOS]]
    return model


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_offline_sources_return_the_given_responses():
    prompts, gt, teacher = _prompts(), [[5, 6, EOS], [7, EOS]], [[8, EOS], [9, 9, EOS]]
    kw = dict(gt=gt, teacher_outputs=teacher, generator=_gen(), eos_id=EOS, pad_id=PAD, max_seq_len=512)
    assert sample_responses("gt", prompts, **kw) == (gt, "gt", None)
    assert sample_responses("teacher", prompts, **kw) == (teacher, "teacher", None)


def test_student_source_is_the_students_greedy_continuation_stopping_at_eos():
    student = _eos_where(tiny_model("llama", seed=1), _prompts()[0], 4)
    prompts = _prompts()
    responses, origin, sources = sample_responses("student", prompts, gt=None, student=student, generator=_gen(),
                                                  eos_id=EOS, pad_id=PAD, max_seq_len=120)
    assert origin == "student" and sources is None
    assert responses[0] == _greedy(student, prompts[0], 256) and responses[0][-1] == EOS and len(responses[0]) == 5
    # the other row runs on, capped by max_seq_len (prompt + continuation <= 120), unless it meets EOS
    assert responses[1] == _cut_at_eos(_greedy(student, prompts[1], 120 - len(prompts[1]))) and responses[1]


def test_on_policy_mask_is_exactly_the_generated_tokens():
    prompts, responses = _prompts(), [[11, 12, EOS], [13, EOS]]
    batch = collate(prompts, responses, PAD, 512)
    targets, mask = targets_and_mask(batch["labels"], shift=True)  # aligned with the logits
    for b, (p, r) in enumerate(zip(prompts, responses)):
        counted = mask[b].nonzero().squeeze(1).tolist()
        assert counted == list(range(len(p) - 1, len(p) - 1 + len(r)))  # the last prompt position predicts r[0]
        assert targets[b, counted].tolist() == r and r[-1] == EOS  # the EOS that ends the response is a target
        assert batch["input_ids"][b, :len(p) + len(r)].tolist() == p + r
        assert batch["attention_mask"][b].sum() == len(p) + len(r)


def test_truncation_at_model_max_length_cuts_the_response():
    batch = collate([[5, 6, 7]], [[8, 9, 10, EOS]], PAD, 5)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert targets_and_mask(batch["labels"], shift=True)[0].tolist() == [[-100, -100, 8, 9, -100]]


@pytest.mark.parametrize("source,fallback", [("mix_request_teacher", "teacher"), ("mix_request_gt", "gt")])
def test_mix_request_draws_student_or_offline_sequence_per_micro_batch(source, fallback):
    student, prompts = tiny_model("opt", seed=1), _prompts()
    gt, teacher = [[5, EOS], [6, EOS]], [[7, EOS], [8, EOS]]
    seen = set()
    for seed in range(12):
        draw = torch.rand((), generator=_gen(seed)).item()
        responses, origin, _ = sample_responses(source, prompts, gt=gt, teacher_outputs=teacher, student=student,
                                                generator=_gen(seed), eos_id=EOS, pad_id=PAD, max_seq_len=80)
        assert origin == ("student" if draw < 0.5 else fallback)
        if origin == "student":
            budget = 80 - max(map(len, prompts))  # the cap applies to the left-padded batch, as HF generate
            for p, r in zip(prompts, responses):  # the whole greedy continuation, to EOS: never a bare prefix
                assert r and r == _cut_at_eos(_greedy(student, p, budget))
        else:
            assert responses == (teacher if fallback == "teacher" else gt)
        seen.add(origin)
    assert seen == {"student", fallback}


def test_mix_token_takes_each_token_from_the_model_its_source_names():
    student, teacher, prompts = tiny_model("gpt2", seed=1), tiny_model("gpt2", seed=2), _prompts()
    responses, origin, sources = sample_responses("mix_token", prompts, gt=None, student=student, teacher=teacher,
                                                  generator=_gen(3), eos_id=EOS, pad_id=PAD, max_seq_len=512)
    assert origin == "mix_token"
    assert [len(r) for r in responses] == [128, 128] and [len(s) for s in sources] == [128, 128]
    both = set()
    for p, r, src in zip(prompts, responses, sources):
        seq = torch.tensor([p + r])
        with torch.no_grad():  # oracle: each model's own argmax at every generated position, teacher-forced
            argmax = {0: student(seq).logits[0].argmax(-1), 1: teacher(seq).logits[0].argmax(-1)}
        for j, (token, s) in enumerate(zip(r, src)):
            assert token == argmax[s][len(p) - 1 + j].item()
        both |= set(src)
    assert both == {0, 1}
    share = sum(map(sum, sources)) / 256
    assert 0.35 < share < 0.65  # each token from the teacher with p = 0.5


def test_mix_token_stops_at_eos():
    student = _eos_where(tiny_model("llama", seed=1), _prompts()[0], 3)
    teacher = _eos_where(tiny_model("llama", seed=1), _prompts()[0], 3)  # same model: same tokens either way
    responses, _, sources = sample_responses("mix_token", _prompts(), gt=None, student=student, teacher=teacher,
                                             generator=_gen(), eos_id=EOS, pad_id=PAD, max_seq_len=512)
    assert responses[0] == _greedy(student, _prompts()[0], 128) and responses[0][-1] == EOS
    assert len(sources[0]) == len(responses[0]) == 4


def test_unknown_sample_source_lists_the_valid_ones():
    with pytest.raises(ValueError, match="--sample_source 'teacher_mix' is not one of: " + ", ".join(SAMPLE_SOURCES)):
        sample_responses("teacher_mix", [[1]], gt=[[1]], generator=_gen(), eos_id=EOS, pad_id=PAD, max_seq_len=9)
