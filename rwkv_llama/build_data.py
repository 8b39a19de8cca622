"""Write the labelled stand-ins for UltraChat and C4 into data/rwkv_llama/ from shipped files (run once; the
trainer and tests read only the written files). Neither corpus is available here (../shared/data/README.md).

    python -m rwkv_llama.build_data --source ../shared/data --output data/rwkv_llama

ultrachat_standin/{train,validation}.jsonl: Dolly **dev** items (never the Dolly test set) as single-turn
  conversations {messages: [{role: user}, {role: assistant}], standin: "dolly-dev"}; 900 / 100.
c4_standin/{en,gsm8k}/{train,validation}.jsonl: plain text {text, standin}; "en" = Dolly dev outputs and
  inputs, "gsm8k" = GSM8K train answers (English: no Chinese text is shipped, so the zh half of the en/zh
  interleave has no stand-in; pass --languages en gsm8k).
"""
import json
import os
import re

from common.cli import UserError, run_cli


def _write(rows, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(source: str = "../shared/data", output: str = "data/rwkv_llama"):
    for name in ("instruct/dolly/dev.jsonl", "gsm8k/train.jsonl"):
        if not os.path.isfile(os.path.join(source, name)):
            raise UserError(f"--source {source}: no {name}; point --source at the shared data folder")
    with open(os.path.join(source, "instruct/dolly/dev.jsonl"), encoding="utf-8") as f:
        dolly = [json.loads(line) for line in f if line.strip()]
    chats = []
    for d in dolly:
        user = d["instruction"] + (f"\n\n{d['input']}" if d.get("input") else "")
        chats.append(dict(messages=[dict(role="user", content=user), dict(role="assistant", content=d["output"])],
                          standin="dolly-dev"))
    _write(chats[:900], os.path.join(output, "ultrachat_standin/train.jsonl"))
    _write(chats[900:], os.path.join(output, "ultrachat_standin/validation.jsonl"))
    en = [t for d in dolly for t in (d["output"], d.get("input", "")) if len(t) > 40]
    with open(os.path.join(source, "gsm8k/train.jsonl"), encoding="utf-8") as f:
        gsm = [re.sub(r"<<[^>]*>>", "", json.loads(line)["answer"]) for line in f if line.strip()][:1000]
    for lang, texts in (("en", en), ("gsm8k", gsm)):
        n_val = len(texts) // 10
        rows = [dict(text=t, standin=f"{lang}: dolly-dev" if lang == "en" else "gsm8k-train answers") for t in texts]
        _write(rows[n_val:], os.path.join(output, f"c4_standin/{lang}/train.jsonl"))
        _write(rows[:n_val], os.path.join(output, f"c4_standin/{lang}/validation.jsonl"))
    print(f"wrote {len(chats)} conversations, {len(en)} en and {len(gsm)} gsm8k texts under {output}")


if __name__ == "__main__":
    run_cli(main)
