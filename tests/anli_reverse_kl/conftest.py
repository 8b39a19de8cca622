"""Shared fixture of the anli_reverse_kl tests: tiny T5 models and a small prepared round."""
import os

import pytest

from anli_reverse_kl import prepare_data
from tests.tiny import save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """Tiny T5 teacher and student (dropout off) with the character tokenizer, and round r1 prepared with it."""
    d = tmp_path_factory.mktemp("anli")
    save_tiny("t5", d / "teacher", seed=0, dropout_rate=0.0)
    save_tiny("t5", d / "student", seed=1, dropout_rate=0.0)
    (d / "src").mkdir()
    with open(os.path.join(ROOT, "data", "anli_standin", "train_r1.jsonl")) as f:
        rows = f.readlines()[:19]  # 16 items after the cleaning
    (d / "src" / "train_r1.jsonl").write_text("".join(rows))
    with open(os.path.join(ROOT, "data", "anli_standin", "dev_r1.jsonl")) as f:
        (d / "src" / "dev_r1.jsonl").write_text("".join(f.readlines()[:6]))
    prepare_data.main(data_dir=str(d / "src"), tokenizer=str(d / "teacher"), save=str(d / "data"), rounds="r1",
                      splits="train,dev", max_prompt_length=512)
    assert len(prepare_data.read_items(str(d / "data" / "r1"), "train")) == 16
    return d
