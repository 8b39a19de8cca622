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


def sharp_tiny_model(root):
    """(tokenizer, the filtered MCC items, the tiny model with weights ~ N(0, 0.3)): sharper than the 0.02 init,
    so span KLs between rationales are not ~0."""
    import torch

    from common.model import load_model
    from common.parallel import setup
    from common.tokenizer import load_tokenizer
    from mcc_kd.data import load_task_file

    setup()
    tok = load_tokenizer(str(root / "ckpt" / "tokenizer.model"))
    items = load_task_file(str(root / "mcc.json"), multi_cot=True, tokenizer=tok)
    model = load_model(str(root / "ckpt"), lora_rank=-1, max_seq_len=192, max_batch_size=8)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return tok, items, model
