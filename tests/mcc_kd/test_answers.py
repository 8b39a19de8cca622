import pytest

from mcc_kd.answers import extract_answer, find_answer, is_correct, normalize_number

NUMERIC_CASES = [  # (task, model output, extracted answer)
    ("GSM8K", "He pays 3 * 4 = 12 dollars.\nTherefore, the answer is 12 .", "12"),
    ("GSM8K", "The house costs 1,450,000 dollars.\nTherefore, the answer is 1,450,000 .", "1450000"),
    ("GSM8K", "Profit is 14,000.\nSo the answer is 14,000", "14000"),
    ("GSM8K", "The temperature drops to -3 degrees.\nTherefore, the answer is -3 .", "-3"),
    ("GSM8K", "It is 10 - 13 = -3 degrees", "-3"),
    ("GSM8K", "5-3=2 apples remain", "2"),  # a hyphen after a digit is not a sign
    ("GSM8K", "The price is $18.50\nTherefore, the answer is 18.50", "18.5"),
    ("GSM8K", "Total: 2.0 hours", "2"),
    ("GSM8K", "He has 1,2345 items", "2345"),  # not a valid comma grouping: two numbers
    ("GSM8K", "We add 5 and 7 to get 12.\n\nThe end.", "12"),  # last line that has a number
    ("SVAMP", "So he has twelve apples.", "12"),
    ("SVAMP", "Three friends share 6 cakes, so each gets two", "2"),
    ("SVAMP", "Danny has 100 - 68 = 32 more wrappers than bottle caps.", "32"),
    ("SVAMP", "Therefore, Someone is done.", None),  # 'one' inside a word is not a number
    ("SVAMP", "I cannot tell.", None),
    ("SVAMP", "", None),
    ("ASDiv", "Each gets 10 / 3 = 3.333 cups.", "3.333"),
    ("ASDiv", "The length is 9.80 meters", "9.8"),
    ("ASDiv", "The answer is 0.50", "0.5"),
]

CSQA_CASES = [
    ("The answer is (C).", "C"),
    ("Cats could open doors if taller.\nAnswer: E", "E"),
    ("Either A or B fits, but the answer is B.\nMaybe D though.", "B"),  # a stated answer wins
    ("A is wrong and E is wrong.\nC and D are possible, D is best.", "D"),  # several letters: last of last line
    ("C. open doors\nI think so.", "C"),  # the last line with a letter
    ("The answer is a dog.", None),  # lower-case article is not a choice
    ("No idea.", None),
]


@pytest.mark.parametrize("task,text,expected", NUMERIC_CASES)
def test_numeric_extraction_table(task, text, expected):
    assert extract_answer(text, task) == expected


@pytest.mark.parametrize("text,expected", CSQA_CASES)
def test_csqa_extraction_table(text, expected):
    assert extract_answer(text, "CSQA") == expected


def test_span_points_at_the_chosen_occurrence():
    text = "18 + 14 = 32\nTherefore, the answer is 32 ."
    a = find_answer(text, "SVAMP")
    assert (a.value, text[a.start:a.end], a.start) == ("32", "32", text.rindex("32"))
    text = "Each has one apple, so they have eleven."
    a = find_answer(text, "SVAMP")
    assert (a.value, text[a.start:a.end]) == ("11", "eleven")
    text = "Options A and B.\nThe answer is (B) because"
    a = find_answer(text, "CSQA")
    assert text[a.start:a.end] == "B" and a.start == text.rindex("B")


@pytest.mark.parametrize("raw,expected", [
    ("1,450", "1450"), ("9.80", "9.8"), ("3.0", "3"), ("-0", "0"), ("007", "7"), ("100", "100"),
    ("\u22125", "-5"), ("six", "6"), ("abc", None), ("", None),
])
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


@pytest.mark.parametrize("pred,label,task,correct", [
    ("14000", "14,000", "GSM8K", True),
    ("9.8", "9.80", "ASDiv", True),
    ("3.33", "3.333", "ASDiv", False),
    ("-3", "-3", "GSM8K", True),
    ("3", "-3", "GSM8K", False),
    ("32.0", "32", "SVAMP", True),
    (None, "32", "SVAMP", False),
    ("C", "C", "CSQA", True),
    ("A", "C", "CSQA", False),
    (None, "C", "CSQA", False),
])
def test_is_correct(pred, label, task, correct):
    assert is_correct(pred, label, task) is correct


def test_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="GSM8K"):
        extract_answer("12", "MATH")
