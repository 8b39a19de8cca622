"""Stand-ins built from the shipped sets (data/README.md), for the methods whose training data cannot ship.

    lines, dropped = dolly_dev_without_test("../shared/data")   # Dolly dev records (JSONL lines, as shipped)
                                                                # whose instruction is not a Dolly test one
"""
import json
import os


def dolly_dev_without_test(source: str) -> tuple:
    """(the JSONL lines of `source/instruct/dolly/dev.jsonl` whose instruction is not also in the Dolly test set
    `valid.jsonl`, in file order and byte for byte; the number left out). Both ATKD's Alpaca-GPT4 stand-in and
    CONTRA's Dolly train/dev stand-ins come from it, so no stand-in item is ever a test item."""
    with open(os.path.join(source, "instruct", "dolly", "valid.jsonl")) as f:
        test = {json.loads(line)["instruction"] for line in f if line.strip()}
    with open(os.path.join(source, "instruct", "dolly", "dev.jsonl")) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line)["instruction"] not in test]
    return kept, len(lines) - len(kept)
