"""Shared fixture of the mcc_kd tests."""
import json
import os

import pytest

from common.checkpoint_split import init
from common.tokenizer import train_sentencepiece
from mcc_kd.prepare_data import filter_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "data", "SVAMP")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tokenizer trained on shipped SVAMP rationales, a random tiny llama, a filtered 10-item MCC file."""
    root = tmp_path_factory.mktemp("mcc")
    items = json.load(open(os.path.join(DATA, "train.json")))
    tok_path = train_sentencepiece([t for it in items for t in [it["instruction"], *it["output"]]],
                                   str(root / "tokenizer"), vocab_size=1000)
    init("tiny-llama", str(root / "ckpt"), tokenizer=tok_path, seed=0)
    json.dump(json.load(open(os.path.join(DATA, "train_standin.json")))[:10], open(root / "raw.json", "w"))
    filter_file("SVAMP", str(root / "raw.json"), str(root / "mcc.json"), str(root / "ckpt" / "tokenizer.model"),
                max_seq_len=192)
    json.dump(json.load(open(os.path.join(DATA, "dev_standin.json")))[:3], open(root / "dev.json", "w"))
    return root
