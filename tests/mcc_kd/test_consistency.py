"""mcc_kd/consistency.py: the held-out span KL per question against the formula on the plain forward's logits,
and the CLI's files."""
import itertools
import json

import pytest
import torch

from common.parallel import layout
from mcc_kd import consistency
from mcc_kd.data import collate, encode_example
from tests.mcc_kd.conftest import sharp_tiny_model


def span_kl(za, zb, T):
    """½[KL(qa‖qb) + KL(qb‖qa)], q = softmax(z / T), mean over the span's tokens, in float64."""
    pa, pb = torch.softmax(za.double() / T, -1), torch.softmax(zb.double() / T, -1)
    return float((0.5 * ((pa * (pa.log() - pb.log())).sum(-1) + (pb * (pb.log() - pa.log())).sum(-1))).mean())


def test_per_question_consistency_is_the_mean_span_kl_over_its_rationale_pairs(tiny):
    tok, items, model = sharp_tiny_model(tiny)
    records = consistency.span_consistency(model, tok, items, T=1.3, max_seq_len=192, batch_size=4,
                                           lay=layout(), max_rationales=3)
    assert [r["index"] for r in records] == list(range(len(items))) and len(items) >= 3
    for item, record in zip(items, records):
        k = min(len(item["output"]), 3)
        with torch.no_grad():  # one sequence at a time, the plain forward's full logits
            logits = [model(collate([encode_example(tok, item["instruction"], item["output"][j], 192)],
                                    tok.pad_id)[0])[0] for j in range(k)]
        kls = [span_kl(logits[a][slice(*item["indices"][a])], logits[b][slice(*item["indices"][b])], 1.3)
               for a, b in itertools.combinations(range(k), 2)]
        assert record["pairs"] == len(kls) and record["kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-4, abs=1e-6)
    assert max(r["kl"] for r in records) > 1e-3


def test_cli_writes_per_question_values_and_the_mean(tiny, tmp_path):
    consistency.main("SVAMP", str(tiny / "ckpt"), str(tiny / "mcc.json"), max_seq_len=192,
                     log_dir=str(tmp_path), max_rationales=2)
    records = json.load(open(tmp_path / "SVAMP-mcc-consistency-predictions.json"))
    metrics = json.load(open(tmp_path / "SVAMP-mcc-consistency-metrics.json"))
    assert metrics["N"] == len(records) and all(r["pairs"] == 1 for r in records)
    assert metrics["mean_kl"] == pytest.approx(sum(r["kl"] for r in records) / len(records))
