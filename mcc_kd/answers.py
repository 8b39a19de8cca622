"""Final-answer extraction and scoring for GSM8K, SVAMP, ASDiv and CSQA (mcc_kd.md §5).

    find_answer(text, task) -> Answer(value, start, end) | None   # value normalised, [start, end) in text
    extract_answer(text, task) -> str | None                      # just the value; None = "missing"
    is_correct(pred, label, task) -> bool                         # pred from extract_answer (None is wrong)

Numeric tasks: the last number of the last line that has one, preferring numbers after
"Therefore"/"So" on that line; the words one..twelve count as numbers; "1,450,000", "-3" and "9.80" are
single numbers. Values are normalised ("1,450.50" -> "1450.5") and compared as decimals.
CSQA: the last "answer is (X)" letter A-E, else the last standalone letter A-E of the last line that has one.
The character span is what `prepare_data.py` turns into token `indices`.
"""
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

TASKS = ("GSM8K", "SVAMP", "ASDiv", "CSQA")
NUMERIC_TASKS = ("GSM8K", "SVAMP", "ASDiv")

NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "one two three four five six seven eight nine ten eleven twelve".split(), start=1)}

# A minus sign only when it does not follow a word character or ")" ("5-3" is two numbers, "= -3" one).
# Comma groups must be complete ("1,2345" is not one number); the original allowed a single comma group.
_NUMBER = re.compile(
    r"(?:(?<![\w)])[-\u2212])?(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?"
    r"|\b(?:" + "|".join(NUMBER_WORDS) + r")\b",
    re.IGNORECASE,
)
_CONCLUSION = re.compile(r"\b(?:Therefore|therefore|So|so)\b")
_ANSWER_IS_LETTER = re.compile(r"(?i:answer)(?:\s+(?i:is)\b|\s*:)\s*:?\s*\(?([A-E])(?![A-Za-z0-9])")
_LETTER = re.compile(r"\b[A-E]\b")


@dataclass(frozen=True)
class Answer:
    value: str  # normalised: "1450", "9.8", "-3", "C"
    start: int  # character span of the chosen occurrence in the searched text, end-exclusive
    end: int


def check_task(task: str) -> str:
    if task not in TASKS:
        from common.cli import UserError

        raise UserError(f"unknown task {task!r}: --task must be one of {', '.join(TASKS)}")
    return task


def normalize_number(s: str):
    """'1,450' -> '1450', '9.80' -> '9.8', '3.0' -> '3', '-0' -> '0', 'six' -> '6'; None if not a number."""
    s = s.strip().replace(",", "").replace("\u2212", "-")
    s = NUMBER_WORDS.get(s.lower(), s)
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    d = d.normalize()
    return "0" if d == 0 else format(d, "f")


def _lines(text: str):
    start = 0
    for line in text.split("\n"):
        yield start, line
        start += len(line) + 1


def _find_number(text: str):
    best = None
    for offset, line in _lines(text):
        numbers = list(_NUMBER.finditer(line))
        if not numbers:
            continue
        keyword = _CONCLUSION.search(line)
        after = [m for m in numbers if keyword and m.start() >= keyword.end()]
        m = (after or numbers)[-1]
        best = Answer(normalize_number(m.group()), offset + m.start(), offset + m.end())
    return best


def _find_letter(text: str):
    stated = list(_ANSWER_IS_LETTER.finditer(text))
    if stated:
        m = stated[-1]
        return Answer(m.group(1), m.start(1), m.end(1))
    best = None
    for offset, line in _lines(text):
        letters = list(_LETTER.finditer(line))
        if letters:
            best = Answer(letters[-1].group(), offset + letters[-1].start(), offset + letters[-1].end())
    return best


def find_answer(text: str, task: str):
    """The final answer of a model output or rationale with its character span, or None when there is none."""
    return _find_letter(text) if check_task(task) == "CSQA" else _find_number(text)


def extract_answer(text: str, task: str):
    answer = find_answer(text, task)
    return None if answer is None else answer.value


def is_correct(pred, label: str, task: str) -> bool:
    """pred: an extracted answer (or None = missing, always wrong); label: the dataset's string label."""
    if pred is None:
        return False
    if check_task(task) == "CSQA":
        return pred.strip().upper() == label.strip().upper()
    p, g = normalize_number(pred), normalize_number(label)
    if p is None or g is None:
        return pred.strip() == label.strip()
    return Decimal(p) == Decimal(g)
