"""Copy ATKD's evaluation sets into data/ and write the Alpaca-GPT4 stand-in (atkd.md §4, §7).

    python atkd/build_data.py --source ../shared/data --output data

Writes
  data/instruct/<set>/valid.jsonl   the five generation sets (dolly, self-inst, vicuna, koala, wizardlm),
                                    byte-identical copies (WHU-ZQH/ATKD data/<set>/valid.jsonl)
  data/atkd/alpaca_gpt4_standin.json  a STAND-IN for Alpaca-GPT4 (not shipped: CC BY-NC 4.0, users download
                                    `alpaca_gpt4_data.json` themselves): the Dolly dev set
                                    (`instruct/dolly/dev.jsonl`) in Alpaca's `{instruction, input, output}`
                                    schema, minus any item whose instruction is also in the Dolly test set.
"""
import json
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import UserError, run_cli  # noqa: E402
from common.io import read_jsonl  # noqa: E402
from common.standins import dolly_dev_without_test  # noqa: E402

EVAL_SETS = ("dolly", "self-inst", "vicuna", "koala", "wizardlm")


def main(source: str = "../shared/data", output: str = "data"):
    src, out = Path(source), Path(output)
    needed = [src / "instruct" / name / "valid.jsonl" for name in EVAL_SETS] + [src / "instruct/dolly/dev.jsonl"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise UserError(f"--source {source}: no {missing[0]}; point --source at the shared data folder")
    for name in EVAL_SETS:
        (out / "instruct" / name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "instruct" / name / "valid.jsonl", out / "instruct" / name / "valid.jsonl")
        print(f"instruct/{name}/valid.jsonl: {len(read_jsonl(str(out / 'instruct' / name / 'valid.jsonl')))} items")
    lines, dropped = dolly_dev_without_test(str(src))
    standin = [{"instruction": x["instruction"], "input": x.get("input", ""), "output": x["output"]}
               for x in map(json.loads, lines)]
    path = out / "atkd" / "alpaca_gpt4_standin.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(standin, indent=1, ensure_ascii=False) + "\n")
    print(f"atkd/alpaca_gpt4_standin.json: {len(standin)} items ({dropped} Dolly-test overlaps dropped)")


if __name__ == "__main__":
    run_cli(main)
