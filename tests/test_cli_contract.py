"""The command-line contract: every entry point answers bad input with one line on stderr naming the file, the
line or item, the field and the fix, and exit code 1; no traceback (common.cli.run_cli).

Each entry point runs as a child process on a table of bad inputs (missing file, malformed line, missing field,
missing model folder, a flag of the wrong type, an unknown choice, where the command has them). The table must
cover every entry point that README.md, a folder README, a run.sh or a scripts/*.sh names, and every file with a
`__main__` block: a new entry point fails `test_every_entry_point_is_in_the_table` until it joins the table.

The children are forked from one process that imported torch and transformers once (tests/cli_fork_server.py),
so a case costs a fraction of a second instead of the import; KDZOO_CLI_REAL=1 runs each as a plain
`python ...` subprocess instead (slower, same assertions). The torchrun case is a real 2-process run.
"""
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *glob.glob("*/README.md", root_dir=ROOT), *glob.glob("*/run.sh", root_dir=ROOT),
        *glob.glob("*/scripts/*.sh", root_dir=ROOT)]
WS = Path("/WS")  # the workspace in the table; the fixture's real folder replaces it when the cases run


@dataclass
class Case:
    id: str
    entry: str        # the file, e.g. "anli_reverse_kl/train.py"
    args: list        # a subcommand, if any, first
    expect: str       # regex the one stderr line must match (after "error: ")


def table(ws: Path) -> list:
    """The bad inputs, per entry point. `ws` holds the fixture files (see the `ws` fixture)."""
    no = ws / "nowhere"
    t5, gpt2, llama = ws / "t5", ws / "gpt2", ws / "llama"
    bad_jsonl, bad_json = ws / "bad.jsonl", ws / "bad.json"
    folder_error = r"is not a transformers model folder \(it does not exist\): pass a folder written by save_pretrained"
    malformed = rf"{re.escape(str(bad_jsonl))}:2 is not valid JSON .*; fix or delete that line"
    cases = []

    def add(entry, id, args, expect):
        cases.append(Case(f"{entry}: {id}", entry, [str(a) for a in args], expect))

    # ---- common ----
    e = "common/checkpoint_split.py"
    add(e, "missing file", ["--ckpt_file", no, "--save_path", ws / "out"], rf"--ckpt_file {no}: no such file or folder")
    add(e, "wrong type", ["--ckpt_file", t5, "--save_path", ws / "out", "--n", "two"], r"--n 'two': expected an integer")
    add(e, "merge_lora: missing folder", ["merge_lora", "--ckpt_dir", no, "--save_path", ws / "out"],
        rf"--ckpt_dir {no}: no consolidated\.\*\.pth shards")
    add(e, "export_hf: missing folder", ["export_hf", "--ckpt_dir", no, "--save_path", ws / "out"],
        rf"--ckpt_dir {no}: no consolidated")
    add(e, "init: unknown choice", ["init", "--model_type", "tiny-foo", "--save_path", ws / "out"],
        r"unknown model_type 'tiny-foo'; known: .*tiny-llama")
    e = "common/generate.py"
    gen = ["--tokenizer", t5, "--out_file", ws / "out.jsonl"]
    add(e, "missing model folder", ["--ckpt_dir", no, "--prompts_file", bad_jsonl, *gen],
        rf"--ckpt_dir {no}: no params\.json \(convert a model with `python -m common\.checkpoint_split")
    add(e, "malformed line", ["--ckpt_dir", no, "--model_type", "tiny-llama", "--prompts_file", bad_jsonl, *gen],
        malformed)
    add(e, "missing file", ["--ckpt_dir", no, "--model_type", "tiny-llama", "--prompts_file", no, *gen],
        rf"{no}: no such file")
    add(e, "wrong type", ["--ckpt_dir", no, "--prompts_file", bad_jsonl, "--max_new_tokens", "many", *gen],
        r"--max_new_tokens 'many': expected an integer")
    add(e, "unknown choice", ["--ckpt_dir", no, "--prompts_file", bad_jsonl, "--dtype", "fp8", *gen],
        r"--dtype 'fp8' is not one of: float32, float16, bfloat16")
    add(e, "missing required flag", ["--ckpt_dir", no], r"common/generate\.py: --tokenizer is required")
    e = "common/memory_plan.py"
    add(e, "unknown choice", ["--folder", "mcc_kd"],
        r"--folder 'mcc_kd' is not one of: anli_reverse_kl, atkd, contra_kd, rwkv_llama")
    add(e, "wrong type", ["--details", "maybe"], r"--details 'maybe': expected True or False")
    e = "common/hf.py"
    add(e, "keep_layers: missing model folder", ["keep_layers", "--model_path", no, "--save_path", ws / "o",
                                                 "--layers", "0"], rf"--model_path {no} {folder_error}")
    add(e, "keep_layers: wrong type", ["keep_layers", "--model_path", llama, "--save_path", ws / "o",
                                       "--layers", "a,b"], r"--layers a,b: give block indices")
    add(e, "unknown command", ["keep_layer"], r"common/hf\.py: unknown command keep_layer")
    e = "common/pretrained.py"
    add(e, "fetch: unknown choice", ["fetch", "--name", "gpt-5", "--save_path", ws / "o"],
        r"--name 'gpt-5' is not one of: smollm2-135m-instruct")
    e = "common/tokenizer.py"
    add(e, "train: missing file", ["train", "--input_files", no, "--model_prefix", ws / "tok"],
        rf"--input_files {no}: no such file")
    add(e, "train: malformed line", ["train", "--input_files", bad_json, "--model_prefix", ws / "tok"],
        rf"{bad_json}:1 is not valid JSON")
    add(e, "train: unknown choice", ["train", "--input_files", bad_json, "--model_prefix", ws / "tok",
                                     "--model_type", "wordpiece"], r"--model_type 'wordpiece' is not one of: bpe,")
    add(e, "train: wrong type", ["train", "--input_files", bad_json, "--model_prefix", ws / "tok",
                                 "--vocab_size", "big"], r"--vocab_size 'big': expected an integer")

    # ---- benchmarks ----
    add("benchmarks/generation.py", "unknown choice", ["--dtype", "fp8"], r"--dtype 'fp8' is not one of")
    add("benchmarks/generation.py", "wrong type", ["--repeats", "x"], r"--repeats 'x': expected an integer")
    add("benchmarks/train_step.py", "wrong type", ["--batch", "x"], r"--batch 'x': expected an integer")
    add("benchmarks/train_step.py", "unknown choice", ["--device", "tpu"], r"--device 'tpu' is not one of: cpu, cuda")
    add("benchmarks/losses.py", "unknown choice", ["--loss", "kl"], r"--loss 'kl' is not one of: forward_kl,")
    add("benchmarks/objectives.py", "unknown choice", ["--rows", "sft,ppo", "--out", ws / "o"],
        r"--rows ppo: not a row; choose from sft,")
    add("benchmarks/objectives.py", "wrong type", ["--seeds", "x", "--out", ws / "o"], r"--seeds 'x': expected an integer")
    add("benchmarks/losses.py", "wrong type", ["--tokens", "many"], r"--tokens 'many': expected an integer")
    add("benchmarks/on_policy.py", "wrong type", ["--batch", "x"], r"--batch 'x': expected an integer")
    add("benchmarks/kd_step.py", "wrong type", ["--batch", "x"], r"--batch 'x': expected an integer")
    add("benchmarks/kd_step.py", "unknown choice", ["--clock", "x"], r"--clock 'x' is not one of: wall, cpu")
    add("benchmarks/kd_step.py", "missing model folder", ["--model_dir", no], rf"--model_dir {no} {folder_error}")
    add("benchmarks/kd_step.py", "accuracy: missing model folder", ["accuracy", "--model_dir", no],
        rf"--model_dir {no} {folder_error}")
    add("benchmarks/on_policy.py", "out of range", ["--steps", "0"], r"--steps 0: must be >= 1")

    # ---- mcc_kd ----
    svamp, svamp_train = (ROOT / "data" / "SVAMP" / f"{split}_standin.json" for split in ("test", "train"))
    for e in ("mcc_kd/train.py", "mcc_kd/train_mcc.py"):
        base = ["--task", "SVAMP", "--ckpt_dir", no, "--save_dir", ws / "s", "--label_file", svamp]
        add(e, "missing file", [*base, "--train_file", no], rf"{no}: no such task file")
        add(e, "malformed file", [*base, "--train_file", bad_json], rf"{bad_json}: not valid JSON")
        add(e, "missing field", [*base, "--train_file", ws / "mcc" / "nolabel.json"],
            r"nolabel\.json: item 1: field 'label': missing field")
        add(e, "unknown choice", [*base, "--train_file", svamp, "--task", "SVAMPP"],
            r"unknown task 'SVAMPP': --task must be one of GSM8K, SVAMP, ASDiv, CSQA")
        add(e, "wrong type", [*base, "--train_file", svamp, "--lr", "fast"], r"--lr 'fast': expected a number")
    add("mcc_kd/train.py", "missing model folder", ["--task", "SVAMP", "--ckpt_dir", no, "--save_dir", ws / "s",
                                                    "--label_file", svamp, "--train_file", svamp_train],
        rf"--ckpt_dir {no}: no such checkpoint folder \(convert one with")
    add("mcc_kd/train_mcc.py", "missing field indices", ["--task", "SVAMP", "--ckpt_dir", no, "--save_dir", ws / "s",
                                                         "--label_file", svamp, "--train_file", ws / "mcc" / "multi.json"],
        r"multi\.json: item 0: field 'indices': missing field")
    add("mcc_kd/train_mcc.py", "unknown indices", ["--task", "SVAMP", "--ckpt_dir", no, "--save_dir", ws / "s",
                                                   "--label_file", svamp, "--train_file", svamp, "--indices", "chars"],
        r"--indices 'chars' is not one of: logits, tokens")
    e = "mcc_kd/eval.py"
    add(e, "unknown choice", ["--task", "SVAMPP", "--ckpt_dir", no, "--label_file", svamp], r"unknown task 'SVAMPP'")
    add(e, "missing model folder", ["--task", "SVAMP", "--ckpt_dir", no, "--label_file", svamp],
        rf"--ckpt_dir {no}: no such checkpoint folder")
    add(e, "malformed file", ["--task", "SVAMP", "--ckpt_dir", no, "--label_file", bad_json], rf"{bad_json}: not valid JSON")
    add(e, "wrong type", ["--task", "SVAMP", "--ckpt_dir", no, "--label_file", svamp, "--eval_batch_size", "x"],
        r"--eval_batch_size 'x': expected an integer")
    e = "mcc_kd/consistency.py"
    co = ["--task", "SVAMP", "--ckpt_dir", no, "--file", ws / "mcc" / "heldout.json"]
    add(e, "unknown choice", [*co, "--indices", "chars"], r"--indices 'chars' is not one of")
    add(e, "out of range", [*co, "--max_rationales", "1"], r"--max_rationales 1: must be >= 2")
    add(e, "missing file", ["--task", "SVAMP", "--ckpt_dir", no, "--file", no], rf"{no}: no such task file")
    add(e, "missing field", ["--task", "SVAMP", "--ckpt_dir", no, "--file", ws / "mcc" / "multi.json"],
        r"multi\.json: item 0: field 'indices': missing field")
    add(e, "missing folder", [*co, "--lora_dir", no], rf"--lora_dir {no}: no such folder")
    add(e, "missing model folder", co, rf"--ckpt_dir {no}: no such checkpoint folder")
    e = "mcc_kd/prepare_data.py"
    filt = ["filter", "--task", "SVAMP", "--output_file", ws / "o.json", "--tokenizer_file", t5]
    add(e, "filter: unknown choice", [*filt, "--input_file", svamp, "--indices", "chars"], r"--indices 'chars' is not one of")
    add(e, "filter: missing file", [*filt, "--input_file", no], rf"{no}: no such task file")
    add(e, "filter: missing field", [*filt, "--input_file", ws / "mcc" / "nolabel.json"], r"field 'label': missing field")
    add(e, "filter: missing tokenizer", ["filter", "--task", "SVAMP", "--output_file", ws / "o.json", "--input_file",
                                         svamp_train, "--tokenizer_file", no], rf"no tokenizer at '{no}'")
    add(e, "build: missing folder", ["build", "--source", no, "--output", ws / "o"], rf"--source {no}: expected the shared")
    e = "mcc_kd/generate_rationales.py"
    gr = ["--task", "SVAMP", "--input_file", svamp, "--output_file", ws / "r.jsonl"]
    add(e, "missing model folder", [*gr, "--teacher", no], rf"--teacher {no}: expected one of our checkpoint folders")
    add(e, "unknown choice", [*gr, "--teacher", gpt2, "--dtype", "fp8"], r"--dtype 'fp8' is not one of")
    add(e, "wrong type", [*gr, "--teacher", gpt2, "--samples", "x"], r"--samples 'x': expected an integer")
    add(e, "malformed file", [*gr[:3], bad_json, *gr[4:], "--teacher", gpt2], rf"{bad_json}: not valid JSON")
    add("mcc_kd/build_data.py", "missing folder", ["--source", no, "--output", ws / "o"], rf"--source {no}: expected")
    add("mcc_kd/build_data.py", "unknown choice", ["--source", ROOT, "--output", ws / "o", "--tasks", "MATH"],
        r"--tasks 'MATH' is not one of: GSM8K, SVAMP, ASDiv, CSQA")
    add("mcc_kd/summary.py", "missing folder", ["--out", no, "--task", "SVAMP", "--label_file", svamp],
        rf"--out {no}: no such folder")
    add("mcc_kd/summary.py", "malformed line", ["--out", ws / "mcc", "--task", "SVAMP", "--label_file", svamp],
        r"times\.txt:2: expected `stage wall_seconds cpu_seconds`")

    # ---- anli_reverse_kl ----
    e = "anli_reverse_kl/train.py"
    tr = ["--model_path", t5, "--data_dir", ws / "anli" / "r1", "--save", ws / "o"]
    add(e, "unknown choice", [*tr, "--type", "ppo"], r"--type 'ppo' is not one of: sft, kd, seqkd, minillm")
    add(e, "wrong type", [*tr, "--lr", "abc"], r"--lr 'abc': expected a number")
    add(e, "out of range", [*tr, "--batch_size", "0"], r"--batch_size 0: must be >= 1")
    add(e, "missing data folder", ["--model_path", t5, "--data_dir", no, "--save", ws / "o"],
        rf"--data_dir {no} does not exist; write it with anli_reverse_kl/prepare_data\.py")
    add(e, "missing model folder", ["--model_path", no, "--data_dir", ws / "anli" / "r1", "--save", ws / "o"],
        rf"--model_path {no} {folder_error}")
    add(e, "GPT-2 teacher", [*tr, "--type", "kd", "--teacher_model_path", gpt2],
        rf"--teacher_model_path {gpt2} is a decoder-only model and --model_path {t5} an encoder-decoder one: give "
        r"both of one kind")
    e = "anli_reverse_kl/prepare_data.py"
    prep = ["--tokenizer", t5, "--save", ws / "o", "--rounds", "r1", "--splits", "train"]
    add(e, "missing file", [*prep, "--data_dir", no], rf"--data_dir {no}: no train_r1\.jsonl or train_r1-\*\.parquet")
    add(e, "malformed line", [*prep, "--data_dir", ws / "anli_bad"], r"anli_bad/train_r1\.jsonl:2 is not valid JSON")
    add(e, "missing field", [*prep, "--data_dir", ws / "anli_nofield"],
        r"anli_nofield/train_r1\.jsonl:1: no 'hypothesis' field; ANLI rows need premise, hypothesis and label")
    add(e, "missing tokenizer folder", ["--data_dir", ws / "anli_bad", "--tokenizer", no, "--save", ws / "o",
                                        "--rounds", "r1", "--splits", "dev"],
        rf"--tokenizer {no} is not a tokenizer folder \(it does not exist\)")
    add(e, "unknown choice", [*prep[:-1], "test2", "--data_dir", ws / "anli_bad"],
        r"--splits test2: give a comma list of train, dev, test")
    e = "anli_reverse_kl/eval.py"
    ev = ["run", "--model_path", t5, "--save", ws / "o", "--rounds", "r1", "--splits", "dev"]
    add(e, "run: missing data", [*ev, "--data_dir", no], rf"{no}/r1/dev\.jsonl is missing: run anli_reverse_kl/prepare_data")
    add(e, "run: malformed line", [*ev, "--data_dir", ws / "anli_eval_bad"], r"anli_eval_bad/r1/dev\.jsonl:2 is not valid JSON")
    add(e, "run: missing field", [*ev, "--data_dir", ws / "anli_eval_nofield"],
        r"r1/dev\.jsonl:1: no field 'prompt_tokens' \(rows need uid, prompt_tokens.*re-run anli_reverse_kl/prepare_data")
    add(e, "run: missing model folder", ["run", "--model_path", no, "--save", ws / "o", "--data_dir", no],
        rf"--model_path {no} {folder_error}")
    add(e, "run: wrong type", [*ev, "--data_dir", no, "--batch_size", "x"], r"--batch_size 'x': expected an integer")
    add(e, "compare: missing folder", ["compare", "--sft", no], rf"--sft {no}: no metrics\.json; pass a --save folder")
    e = "anli_reverse_kl/generate_data.py"
    add(e, "missing data folder", ["--teacher_model_path", t5, "--data_dir", no, "--save", ws / "o"],
        rf"--data_dir {no} does not exist")
    add(e, "missing model folder", ["--teacher_model_path", no, "--data_dir", no, "--save", ws / "o"],
        rf"--teacher_model_path {no} {folder_error}")
    add(e, "wrong type", ["--teacher_model_path", t5, "--data_dir", no, "--save", ws / "o", "--max_new_tokens", "x"],
        r"--max_new_tokens 'x': expected an integer")
    add("anli_reverse_kl/build_standin.py", "missing folder", ["--source", no, "--output", ws / "o"],
        rf"--source {no}: no svamp/SVAMP\.json")

    # ---- atkd ----
    e = "atkd/train.py"
    at = ["--student_model_path", gpt2, "--teacher_model_path", gpt2, "--output_dir", ws / "o"]
    add(e, "unknown choice", [*at, "--data_path", ws / "atkd" / "train.json", "--kl_method", "kl"],
        r"--kl_method 'kl' is not one of: forward, reverse, jsd,")
    add(e, "wrong type", [*at, "--data_path", ws / "atkd" / "train.json", "--learning_rate", "x"],
        r"--learning_rate 'x': expected a number")
    add(e, "missing file", [*at, "--data_path", no], rf"{no}: no such file")
    add(e, "folder as data", [*at, "--data_path", ws / "atkd"], rf"{ws / 'atkd'} is a folder, not a data file")
    add(e, "malformed line", [*at, "--data_path", bad_jsonl], malformed)
    add(e, "missing field", [*at, "--data_path", ws / "atkd" / "nooutput.json"],
        r"nooutput\.json: item 1: missing field 'output'")
    add(e, "missing model folder", ["--student_model_path", no, "--teacher_model_path", gpt2, "--output_dir", ws / "o",
                                    "--data_path", ws / "atkd" / "train.json"], rf"--student_model_path {no} {folder_error}")
    add(e, "student with another tokenizer", ["--student_model_path", ws / "gpt2-swapped", "--teacher_model_path", gpt2,
                                              "--output_dir", ws / "o", "--data_path", ws / "atkd" / "train.json",
                                              "--per_device_train_batch_size", "2", "--max_steps", "1"],
        r"the student's tokenizer \(--student_model_path .*gpt2-swapped\) and the teacher's \(--teacher_model_path "
        r".*gpt2\) differ: 100 vs 100 tokens, 2 of the student's at other ids")
    e = "atkd/eval.py"
    add(e, "unknown module as judge", ["--output_dir", ws / "o", "--judge", "nomodule:fn", "--sets", "dolly"],
        r"--judge 'nomodule:fn': no module 'nomodule' on the Python path")
    add(e, "unknown choice", ["--output_dir", ws / "o", "--sets", "alpaca"], r"--sets: unknown set\(s\) \['alpaca'\]; valid:")
    add(e, "missing model folder", ["--model_path", no, "--output_dir", ws / "o", "--sets", "dolly"],
        rf"--model_path {no} {folder_error}")
    add(e, "malformed line", ["--model_path", gpt2, "--output_dir", ws / "o", "--sets", "dolly",
                              "--data_dir", ws / "instruct_bad"], r"instruct_bad/dolly/valid\.jsonl:2 is not valid JSON")
    add(e, "missing predictions", ["--output_dir", no, "--sets", "dolly"], r"dolly/predictions\.json: no predictions")
    add(e, "wrong type", ["--output_dir", ws / "o", "--max_new_tokens", "x"], r"--max_new_tokens 'x': expected an integer")
    e = "atkd/generate_data.py"
    add(e, "missing file", ["--teacher_model_path", gpt2, "--data_path", no, "--output_path", ws / "g.jsonl"],
        rf"{no}: no such file")
    add(e, "missing model folder", ["--teacher_model_path", no, "--data_path", ws / "atkd" / "train.json",
                                    "--output_path", ws / "g.jsonl"], rf"--teacher_model_path {no} {folder_error}")
    add(e, "missing field", ["--teacher_model_path", gpt2, "--data_path", ws / "atkd" / "nooutput.json",
                             "--output_path", ws / "g.jsonl"], r"item 1: missing field 'output'")
    add("atkd/build_data.py", "missing folder", ["--source", no, "--output", ws / "o"], rf"--source {no}: no ")

    # ---- contra_kd ----
    e = "contra_kd/train.py"
    ct = ["--model-path", gpt2, "--save", ws / "o", "--max-length", "232", "--max-prompt-length", "200"]
    full = ws / "contra" / "full" / "tiny"
    add(e, "unknown choice", [*ct, "--data-dir", full, "--type", "minillm"], r"--type 'minillm' is not one of: sft, kd,")
    add(e, "wrong type", [*ct, "--data-dir", full, "--batch-size", "x"], r"--batch-size 'x': expected an integer")
    add(e, "unknown dtype", [*ct, "--data-dir", full, "--dtype", "fp8"], r"--dtype 'fp8' is not one of")
    add(e, "missing data folder", [*ct, "--data-dir", no], rf"--data-dir {no} does not exist; write it with "
                                                          r"contra_kd/prepare_data\.py")
    add(e, "prompt-only data", [*ct, "--data-dir", ws / "contra" / "prompt" / "tiny"], r"holds prompt-only items")
    add(e, "malformed line", [*ct, "--data-dir", ws / "contra_badvalid"], r"contra_badvalid/valid\.jsonl:2 is not valid JSON")
    add(e, "missing model folder", ["--model-path", no, "--save", ws / "o", "--data-dir", full],
        rf"--model-path {no} {folder_error}")
    e = "contra_kd/eval.py"
    ce = ["--model-path", gpt2, "--save", ws / "o", "--sets", "dolly"]
    add(e, "missing metrics file", [*ce, "--metrics", no], rf"--metrics {no}: no such file")
    add(e, "unknown paper pair", [*ce, "--paper-pair", "gpt3"], r"--paper-pair 'gpt3' is not one of: gpt2, openllama2")
    add(e, "unknown dtype", [*ce, "--dtype", "fp8"], r"--dtype 'fp8' is not one of")
    add(e, "malformed line", [*ce, "--data-dir", ws / "instruct_bad"], r"instruct_bad/dolly/valid\.jsonl:2 is not valid JSON")
    add(e, "missing field", [*ce, "--data-dir", ws / "instruct_nofield"],
        r"instruct_nofield/dolly/valid\.jsonl:1: no field 'prompt'")
    add(e, "missing model folder", ["--model-path", no, "--save", ws / "o", "--sets", "dolly"],
        rf"--model-path {no} {folder_error}")
    add(e, "wrong seeds", [*ce, "--seeds", "a,b"], r"--seeds .*: give integers")
    e = "contra_kd/train_velocity_field.py"
    vf = ["--model-path", gpt2, "--teacher-model-path", gpt2, "--save", ws / "o"]
    add(e, "prompt-only data", [*vf, "--data-dir", ws / "contra" / "prompt" / "tiny"],
        r"holds prompt-only items; the flow is fitted on the ground-truth responses")
    add(e, "missing data folder", [*vf, "--data-dir", no], rf"--data-dir {no} does not exist")
    add(e, "missing model folder", ["--model-path", gpt2, "--teacher-model-path", no, "--save", ws / "o",
                                    "--data-dir", full], rf"--teacher-model-path {no} {folder_error}")
    add(e, "unknown dtype", [*vf, "--data-dir", full, "--dtype", "fp8"], r"--dtype 'fp8' is not one of")
    add(e, "wrong type", [*vf, "--data-dir", full, "--epochs", "x"], r"--epochs 'x': expected an integer")
    e = "contra_kd/prepare_data.py"
    cp = ["--processed-data-dir", ws / "o", "--model-path", gpt2, "--model-type", "tiny"]
    add(e, "dolly: missing folder", ["dolly", "--data-dir", no, *cp], rf"{no}: neither train\.jsonl")
    add(e, "dolly: malformed line", ["dolly", "--data-dir", ws / "dolly_bad", *cp], r"dolly_bad/train\.jsonl:2 is not valid JSON")
    add(e, "dolly: missing field", ["dolly", "--data-dir", ws / "dolly_nofield", *cp],
        r"dolly_nofield/train\.jsonl:1: record without an 'output' \(or 'response'\) field")
    add(e, "dolly: missing tokenizer", ["dolly", "--data-dir", ROOT / "data/contra_kd/dolly_standin",
                                        "--processed-data-dir", ws / "o", "--model-path", no, "--model-type", "tiny"],
        rf"--model-path {no} is not a tokenizer folder")
    add(e, "pretrain: missing file", ["pretrain", "--data-file", no, *cp], rf"--data-file {no}: no such file")
    add(e, "standins: missing folder", ["standins", "--source", no, "--output", ws / "o"], rf"--source {no}: no ")
    add(e, "dolly: wrong type", ["dolly", "--data-dir", no, *cp, "--max-prompt-length", "x"],
        r"--max-prompt-length 'x': expected an integer")
    e = "contra_kd/generate_data.py"
    add(e, "missing data folder", ["--model-path", gpt2, "--data-dir", no, "--save", ws / "o"], rf"--data-dir {no} does not")
    add(e, "unknown dtype", ["--model-path", gpt2, "--data-dir", full, "--save", ws / "o", "--dtype", "fp8"],
        r"--dtype 'fp8' is not one of")
    add(e, "missing model folder", ["--model-path", no, "--data-dir", full, "--save", ws / "o"],
        rf"--model-path {no} {folder_error}")

    # ---- rwkv_llama ----
    e = "rwkv_llama/train.py"
    rt = ["--model_id", llama, "--layers", "[0]", "--output_dir", ws / "o", "--max_seq_length", "32"]
    add(e, "wrong type", [*rt, "--train_data", ws / "rwkv" / "chat.jsonl", "--micro_bsz", "abc"],
        r"--micro_bsz 'abc': expected an integer")
    add(e, "unknown choice", [*rt, "--train_data", ws / "rwkv" / "chat.jsonl", "--logits_dtype", "fp16"],
        r"--logits_dtype 'fp16' is not one of: fp32, bf16")
    add(e, "missing file", [*rt, "--train_data", no], rf"--train_data {no}: no such file")
    add(e, "missing config file", ["--config_file", no], rf"--config_file {no}: no such file")
    add(e, "malformed config", ["--config_file", ws / "rwkv" / "bad.yaml"], r"bad\.yaml:\d+ is not valid YAML")
    add(e, "missing model folder", ["--model_id", no, "--layers", "[0]", "--train_data", ws / "rwkv" / "chat.jsonl"],
        rf"Llama\.model_id {no} {folder_error}")
    add(e, "malformed line", [*rt, "--train_data", ws / "rwkv" / "bad.jsonl"],
        rf"{re.escape(str(ws / 'rwkv' / 'bad.jsonl'))}:2 is not valid JSON .*; fix or delete that line")
    add(e, "missing field", [*rt, "--train_data", ws / "rwkv" / "text.jsonl"], r"text\.jsonl: row 1 has no 'messages' field")
    e = "rwkv_llama/eval.py"
    add(e, "missing model folder", ["--model_id", no, "--val_data", ws / "rwkv" / "chat.jsonl"],
        rf"--model_id {no} {folder_error}")
    add(e, "missing file", ["--model_id", llama, "--val_data", no], rf"--val_data {no}: no such file")
    add(e, "missing checkpoint", ["--model_id", llama, "--val_data", ws / "rwkv" / "chat.jsonl", "--ckpt_file", no],
        rf"--ckpt_file {no}: no such file, or no nowhere\.json beside it")
    add(e, "wrong type", ["--model_id", llama, "--val_data", ws / "rwkv" / "chat.jsonl", "--micro_bsz", "x"],
        r"--micro_bsz 'x': expected an integer")
    e = "rwkv_llama/teacher_server.py"
    add(e, "missing --model_id", ["--batch", "2", "--length", "8", "--size", "2"],
        r"rwkv_llama/teacher_server\.py: --model_id is required")
    add(e, "size 1", ["--model_id", llama, "--batch", "2", "--length", "8", "--size", "1"], r"--size 1: must be >= 2")
    add(e, "unknown choice", ["--model_id", llama, "--batch", "2", "--length", "8", "--size", "2",
                              "--logits_dtype", "fp16"], r"--logits_dtype 'fp16' is not one of: fp32, bf16")
    add(e, "missing model folder", ["--model_id", no, "--batch", "2", "--length", "8", "--size", "2",
                                    "--nccl_id_file", ws / "nccl.txt_0"], rf"--model_id {no} {folder_error}")
    add(e, "unknown flag", ["--model_id", llama, "--batch", "2", "--length", "8", "--size", "2", "--lenght", "9"],
        r"unknown flag --lenght; the flags are: --model_id, --batch, --length")
    add("rwkv_llama/build_data.py", "missing folder", ["--source", no, "--output", ws / "o"], rf"--source {no}: no ")
    return cases


# ---------------------------------------------------------------------------------------------------------
# Which entry points exist: named in the docs, or any file with a __main__ block

def has_main(path: Path) -> bool:
    return re.search(r'^if __name__ == "__main__":', path.read_text(), re.M) is not None


def main_files() -> set:
    return {str(p.relative_to(ROOT)) for p in ROOT.glob("*/*.py") if p.parts[-2] != "tests" and has_main(p)}


def commands(entry: str) -> set:
    """The subcommands of a run_cli({...}) entry point (checkpoint_split: its COMMANDS)."""
    text = (ROOT / entry).read_text()
    found = re.search(r"^COMMANDS = \{(.*?)\}", text, re.M | re.S) or re.search(r"run_cli\(\{(.*?)\}", text, re.S)
    return set(re.findall(r'"(\w+)":', found.group(1))) if found else set()


def documented() -> set:
    """(entry file, subcommand or None) for every command line the docs show."""
    found = set()
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        refs = [(m.group(1).replace(".", "/") + ".py", m.end()) for m in re.finditer(r"-m\s+([a-z_]+\.[a-z_]+)", text)]
        refs += [(m.group(1), m.end()) for m in re.finditer(r"\b([a-z_]+/[a-z_]+\.py)\b", text)]
        for entry, end in refs:
            if not (ROOT / entry).is_file() or not has_main(ROOT / entry):
                continue
            word = re.match(r"\s+(\w+)", text[end:])
            command = word.group(1) if word and word.group(1) in commands(entry) else None
            found.add((entry, command))
    return found


def test_every_entry_point_is_in_the_table():
    cases = table(WS)
    covered = {(c.entry, c.args[0] if c.args and c.args[0] in commands(c.entry) else None) for c in cases}
    entries = {c.entry for c in cases}
    docs = documented()
    assert len(docs) > 25  # the docs were read (README, folder READMEs, run.sh, scripts)
    missing = sorted((e, cmd) for e, cmd in docs if (e, cmd) not in covered and not (cmd is None and e in entries))
    assert not missing, f"entry points named in the docs without a case in table(): {missing}"
    assert not main_files() - entries, f"files with a __main__ block without a case: {sorted(main_files() - entries)}"
    assert len({c.id for c in cases}) == len(cases)


# ---------------------------------------------------------------------------------------------------------
# The workspace and the runs

def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Tiny model folders (T5, GPT-2, Llama, a GPT-2 whose tokenizer swaps two ids) and the bad files."""
    from contra_kd.prepare_data import dolly
    from tests.tiny import save_tiny, swapped_tokenizer, tiny_model

    ws = tmp_path_factory.mktemp("contract")
    for family in ("t5", "gpt2", "llama"):
        save_tiny(family, ws / family)
    tiny_model("gpt2", seed=1).save_pretrained(ws / "gpt2-swapped")
    swapped_tokenizer().save_pretrained(ws / "gpt2-swapped")
    write_jsonl(ws / "bad.jsonl", ['{"prompt": "a", "text": "a"}', '{"prompt": "b", '])
    (ws / "bad.json").write_text('[{"instruction": "a", ')
    rationale = "1 + 1 = 2. Therefore, the answer is 2 ."
    item = {"instruction": "1 + 1?\n", "output": [rationale] * 2, "label": "2", "indices": [[9, 10], [9, 10]]}
    (ws / "mcc").mkdir()
    (ws / "mcc" / "nolabel.json").write_text(json.dumps([item, {k: v for k, v in item.items() if k != "label"}]))
    (ws / "mcc" / "multi.json").write_text(json.dumps([{k: v for k, v in item.items() if k != "indices"}]))
    (ws / "mcc" / "heldout.json").write_text(json.dumps([item]))
    (ws / "mcc" / "times.txt").write_text("base 10 9\nsft 20\n")
    row = {"uid": "a", "premise": "P.", "hypothesis": "H.", "label": 0, "reason": "Because."}
    write_jsonl(ws / "anli_bad" / "train_r1.jsonl", [row, '{"premise": '])
    write_jsonl(ws / "anli_bad" / "dev_r1.jsonl", [row])
    write_jsonl(ws / "anli_nofield" / "train_r1.jsonl", [{k: v for k, v in row.items() if k != "hypothesis"}])
    record = {"uid": "a", "prompt": "p", "target": "t", "label": "neutral", "reason": "", "prompt_tokens": [5, 1],
              "target_tokens": [6, 1]}
    write_jsonl(ws / "anli_eval_bad" / "r1" / "dev.jsonl", [record, "{"])
    write_jsonl(ws / "anli_eval_nofield" / "r1" / "dev.jsonl", [{k: v for k, v in record.items() if k != "prompt_tokens"}])
    (ws / "atkd").mkdir()
    alpaca = [{"instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(4)]
    (ws / "atkd" / "train.json").write_text(json.dumps(alpaca))
    (ws / "atkd" / "nooutput.json").write_text(json.dumps([alpaca[0], {"instruction": "x", "input": ""}]))
    instruct = {"prompt": "p", "instruction": "i", "output": "o"}
    write_jsonl(ws / "instruct_bad" / "dolly" / "valid.jsonl", [instruct, "{"])
    write_jsonl(ws / "instruct_nofield" / "dolly" / "valid.jsonl", [{"instruction": "i", "output": "o"}])
    dolly(str(ROOT / "data/contra_kd/dolly_standin"), str(ws / "contra"), str(ws / "gpt2"), "tiny",
          max_prompt_length=200, num=4, dev_num=4)
    (ws / "contra_badvalid").mkdir()
    for f in (ws / "contra" / "full" / "tiny").iterdir():
        (ws / "contra_badvalid" / f.name).write_bytes(f.read_bytes())
    lines = (ws / "contra_badvalid" / "valid.jsonl").read_text().splitlines()
    write_jsonl(ws / "contra_badvalid" / "valid.jsonl", [lines[0], "{", *lines[2:]])
    dolly_row = {"instruction": "i", "input": "", "output": "o"}
    write_jsonl(ws / "dolly_bad" / "train.jsonl", [dolly_row, "{"])
    write_jsonl(ws / "dolly_bad" / "dev.jsonl", [dolly_row])
    write_jsonl(ws / "dolly_nofield" / "train.jsonl", [{"instruction": "i"}])
    write_jsonl(ws / "dolly_nofield" / "dev.jsonl", [dolly_row])
    write_jsonl(ws / "rwkv" / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "hello"}]}] * 4)
    write_jsonl(ws / "rwkv" / "text.jsonl", [{"text": "no messages here"}] * 4)
    write_jsonl(ws / "rwkv" / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}, '{"messages": '])
    (ws / "rwkv" / "bad.yaml").write_text("RWKV:\n  layers: [0, 2\nLlama:\n  model_id: x\n")
    return ws


def command(entry: str) -> list:
    """How the docs run it: a file with the sys.path shim directly, a module of a package with -m."""
    text = (ROOT / entry).read_text()
    shim = 'if __package__ in (None, ""):' in text or "sys.path.insert(0" in text
    return [entry] if shim else ["-m", entry[:-3].replace("/", ".")]


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "PYTHONPATH")}
    return dict(env, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def run_real(case: Case) -> tuple:
    """(returncode, stdout, stderr) of `python ...` itself (KDZOO_CLI_REAL=1)."""
    done = subprocess.run([sys.executable, *command(case.entry), *case.args], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=1200)
    return done.returncode, done.stdout, done.stderr


def run_forked(cases, out: Path, jobs: int = 2) -> dict:
    """{case id: (returncode, stdout, stderr)}, each case a child of tests/cli_fork_server.py."""
    argv = {c.id: command(c.entry) + c.args for c in cases}
    files = {c.id: (out / f"{k}.out", out / f"{k}.err") for k, c in enumerate(cases)}
    requests = "".join(json.dumps(dict(id=k, argv=argv[k], cwd=str(ROOT), env=child_env(), stdout=str(files[k][0]),
                                       stderr=str(files[k][1]))) + "\n" for k in argv)
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_fork_server.py"), str(jobs)], input=requests,
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    codes = {r["id"]: r["returncode"] for r in map(json.loads, done.stdout.splitlines())}
    return {k: (codes[k], files[k][0].read_text(), files[k][1].read_text()) for k in argv}


REAL = bool(os.environ.get("KDZOO_CLI_REAL"))


@pytest.fixture(scope="module")
def results(ws):
    """Every case at once, forked two at a time (none with KDZOO_CLI_REAL=1: each test runs its own `python`)."""
    if REAL:
        return None
    with tempfile.TemporaryDirectory() as out:
        return run_forked(table(ws), Path(out))


@pytest.mark.parametrize("case", table(WS), ids=lambda c: c.id)
def test_bad_input_is_one_line_naming_the_input_and_exit_code_1(case, ws, results):
    code, stdout, stderr = run_real({c.id: c for c in table(ws)}[case.id]) if REAL else results[case.id]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert code == 1 and len(lines) == 1, (code, stderr[-3000:])
    expect = case.expect.replace(str(WS), re.escape(str(ws)))
    assert lines[0].startswith("error: ") and re.search(expect, lines[0]), (expect, lines[0])


def test_under_torchrun_the_line_is_printed_once_and_every_rank_exits(ws):
    """2 processes on gloo: both ranks set up the process group, read the data and raise the same UserError;
    rank 0 alone prints it, leaves the group and exits 1, and torchrun stops rank 1, which waits for that
    rather than exiting first (its exit would make torchrun stop rank 0, perhaps before the line is out)."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "anli_reverse_kl/train.py", "--model_path", str(ws / "t5"), "--data_dir",
                           str(ws / "nowhere"), "--save", str(ws / "o")], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=1200)
    ours = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert done.returncode != 0
    assert ours == [f"error: --data_dir {ws / 'nowhere'} does not exist; write it with "
                    "anli_reverse_kl/prepare_data.py"], done.stderr[-3000:]
    assert 'anli_reverse_kl/train.py", line' not in done.stderr  # no traceback from our code, on any rank
    # torchrun's report: the first failure is rank 0's exit code 1 (rank 1 was stopped by torchrun afterwards)
    assert re.search(r"Root Cause[^\n]*\n\[0\]:\n(.*\n){2}\s*rank\s*: 0 \(local_rank: 0\)\n\s*exitcode\s*: 1 ",
                     done.stderr), done.stderr[-3000:]
