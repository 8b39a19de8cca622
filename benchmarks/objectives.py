"""Every KD objective of this repository head to head: one real pair, one training budget, several seeds.

    python -m benchmarks.objectives             # 17 objectives x 3 seeds -> runs/objectives/objectives.{md,json,png}
    python -m benchmarks.objectives --quick     # (or QUICK=1) one seed, fewer steps -> runs/objectives-quick/
    python -m benchmarks.objectives --rows sft,fkl,rkl --seeds 5 --steps 32 --eval_items 64 --out runs/x

The pair. Teacher: SmolLM2-135M-Instruct (common.pretrained). Student: 10 of its 30 blocks (0-3, 21, 23, 25,
27-29: contra_kd's REAL cut, common.hf.keep_layers), warmed up once by SFT (contra_kd/train.py --type sft,
`warmup_steps` steps on stand-in items no row trains on). Every row starts from that one checkpoint. Prompts are
the model's chat template around one user turn (instruction [+ blank line + input]).

The data. Training: the first `steps x batch_size` items of the Dolly stand-in (data/contra_kd/dolly_standin,
data/README.md) whose prompt fits `max_prompt_length` tokens; DistiLLM's dev CE uses the first `dev_items` of its
dev split. Evaluation: the first `eval_items` such items of the Dolly **test** set (data/instruct/dolly), used
for nothing else: no row, epoch or setting is chosen on them.

The budget, the same for every row: `steps` optimiser steps of `batch_size` prompts, one pass over the pool with
the same items in the same order (each seed's permutation, written into each folder's data file through the
inverse of that folder's own shuffle), sequences cut at `max_length` tokens, AdamW (weight decay 0.01) at `lr`
with a cosine to 0 and no warmup, clip 1.0, bf16 autocast, one process.

Rows (ROWS): each trained by its own folder's entry point, called with flags; nothing is re-implemented here.

Metrics on the held-out items, per item, then averaged:
  fwd KL   KL(teacher || student) per response token of the gold responses, teacher-forced: what logit
           distillation minimises, and the least noisy number here (teacher logits computed once, cached);
  rev KL   KL(student || teacher) per token along the student's own sampled responses: exposure bias, what
           DistiLLM, MiniLLM and GKD target;
  Rouge-L  of those samples against the reference with contra_kd.md §4's protocol (temperature 1, top-p 1, no
           repeated 6-gram, at most max_length - max_prompt_length new tokens, rouge-score F with stemming, x100);
  steps/s  over the whole training call (model loading and the folder's checkpoints and exports included); CPU s
           per step (less sensitive to a shared machine's load); peak MiB = the rise of the training process's
           peak resident set over its size when training began.
Paired tests: each row against SFT and against forward KL over the (seed, held-out item) pairs, a two-sided
sign-flip permutation test of the mean difference. The curve: held-out fwd KL at `curve_points` points of training.

Resume: the preparation stages and every (row, seed) run in their own forked process and write their results
atomically; a finished one is never redone, and a killed training run resumes from its folder's last
checkpoint. Logs: OUT/logs/. Settings are fixed per OUT folder (another setting: another --out).
"""
import json
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # work runs in forked processes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common.cli import UserError, run_cli  # noqa: E402
from common.io import atomic_write_json, atomic_write_text, write_jsonl  # noqa: E402

# name: (label, the folder whose entry point trains it, that entry point's flags beyond the shared budget)
ROWS = {
    "sft": ("SFT (no teacher)", "contra_kd", dict(type="sft")),
    "seqkd": ("SeqKD", "contra_kd", dict(type="seqkd")),
    "fkl": ("forward KL", "atkd", dict(kl_method="forward")),
    "rkl": ("reverse KL", "atkd", dict(kl_method="reverse")),
    "jsd": ("JSD (0.9 FKL + 0.1 RKL)", "atkd", dict(kl_method="jsd")),
    "gjsd": ("generalised JSD (beta 0.5)", "atkd", dict(kl_method="gjsd")),
    "tvd": ("TVD", "atkd", dict(kl_method="tvd")),
    "skl": ("skew KL (alpha 0.1)", "contra_kd", dict(type="distillm", loss="skl", init_threshold=0.0)),
    "srkl": ("skew reverse KL (alpha 0.1)", "contra_kd", dict(type="distillm", loss="srkl", init_threshold=0.0)),
    "dkd": ("DKD", "atkd", dict(kl_method="dkd")),
    "atkd": ("ATKD", "atkd", dict(kl_method="atkd")),
    "distillm": ("DistiLLM (adaptive SRKL)", "contra_kd", dict(type="distillm", loss="srkl", init_threshold=0.2)),
    "distillm2": ("DistiLLM-2", "contra_kd", dict(type="distillm2")),
    "fdd": ("FDD", "contra_kd", dict(type="fdd")),
    "contra": ("CONTRA (on DistiLLM)", "contra_kd", dict(type="distillm+contra", loss="srkl", init_threshold=0.2)),
    "minillm": ("MiniLLM", "anli_reverse_kl", dict(type="minillm", teacher_mixed_alpha=0.2, single_step_reg=True)),
    "gkd": ("on-policy GKD (gen. JSD 0.5)", "atkd", dict(kl_method="gjsd", sample_source="student")),
}
BASELINES = ("sft", "fkl")
METRICS = {"fwd_kl": ("fwd KL", "fwd KL (gold) ↓"), "rev_kl": ("rev KL", "rev KL (own samples) ↓"),
           "rouge_l": ("Rouge-L", "Rouge-L ↑")}
FULL = dict(seeds=3, steps=16, eval_items=32)
QUICK = dict(seeds=1, steps=8, eval_items=16)
STUDENT_LAYERS = "0,1,2,3,21,23,25,27,28,29"
MODEL_TYPE = "chat"  # contra_kd's processed-data folder name for this tokenisation
EVAL_SEED = 10  # contra_kd.md §4's first sampling seed; seed s of training samples with EVAL_SEED + 10 s


# ---- the data: chat prompts, the pool, its per-seed orders in each folder's format ----

def chat_prompt(tokenizer, record) -> str:
    content = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def fitting(tokenizer, path, max_prompt_length: int, count: int, skip: int = 0) -> list:
    """Records of `path` whose chat prompt fits max_prompt_length tokens, with `prompt` set: the `count` after
    the first `skip` such records, in file order."""
    from contra_kd.data import read_records

    out = []
    for record in read_records(str(path)):
        prompt = chat_prompt(tokenizer, record)
        if len(tokenizer.encode(prompt, add_special_tokens=False)) <= max_prompt_length:
            out.append(dict(record, prompt=prompt))
    if len(out) < skip + count:
        raise UserError(f"{path}: {len(out)} items fit --max_prompt_length, {skip + count} are needed; lower "
                        f"--steps / --batch_size / --eval_items or raise --max_prompt_length")
    return out[skip:skip + count]


def seed_order(n: int, seed: int) -> list:
    """The order in which every row of seed `seed` visits the pool's n items."""
    order = list(range(n))
    random.Random(f"objectives-{seed}").shuffle(order)
    return order


def file_order(order: list, folder_perm: list) -> list:
    """File contents (pool indices) such that a folder visiting file position folder_perm[j] at slot j meets
    pool item order[j]."""
    out = [None] * len(order)
    for slot, position in enumerate(folder_perm):
        out[position] = order[slot]
    return out


def reorder_split(src: Path, dst: Path, items: list) -> None:
    """A contra_kd processed folder with train item items[i] of `src` at position i; the valid split copied."""
    from common.binarized import write_indexed
    from contra_kd.data import InstructionSplit

    split = InstructionSplit(str(src), "train")
    dst.mkdir(parents=True, exist_ok=True)
    write_indexed(str(dst / "train_0"), (split.tokens[i].tolist() for i in items), split.tokens.dtype)
    write_jsonl([split.records[i] for i in items], str(dst / "train.jsonl"))
    for name in ("valid_0.bin", "valid_0.idx", "valid.jsonl"):
        shutil.copyfile(src / name, dst / name)


# ---- running work in forked processes ----

def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _child(ctx: dict, fn, args, log: Path, result: Path):
    try:
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: end with the fork server (and the run)
        CTX.update(ctx)
        import torch

        torch.set_num_threads(ctx["threads"])
        sys.stdout = sys.stderr = open(log, "a", buffering=1)  # Python's writers (tqdm, print) ...
        os.dup2(sys.stdout.fileno(), 1)  # ... and the C library's
        os.dup2(sys.stdout.fileno(), 2)
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn(*args)
        out.update(wall_s=time.perf_counter() - wall, cpu_s_total=time.process_time() - cpu)
        atomic_write_json(out, str(result))
        code = 0
    except BaseException:  # noqa: BLE001 - the parent reads the log
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.exit(code)  # multiprocessing's own exit: its finalizers release tqdm's lock


def run_forked(name: str, result: Path, fn, *args, threads: int = None) -> dict:
    """fn(*args) -> dict in a forked process (output to OUT/logs/name.log) unless `result` holds it already.

    Forked from a fork server that imported torch, transformers and the folders once and computed nothing:
    a fresh process without the import time, and without the parent's thread pools (a process forked after
    torch ran parallel work cannot use them)."""
    if result.exists():
        return json.loads(result.read_text())
    result.parent.mkdir(parents=True, exist_ok=True)
    log = _path("logs", f"{name}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    ctx = dict(CTX, threads=threads or CTX["threads"] or len(os.sched_getaffinity(0)))
    proc = FORK_SERVER.Process(target=_child, args=(ctx, fn, args, log, result))
    proc.start()
    proc.join()
    code = proc.exitcode
    proc.close()
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:]) if log.exists() else "(no log: it failed to start)"
        raise RuntimeError(f"{name} failed (exit code {code}); {log} ends:\n{tail}")
    return json.loads(result.read_text())


def run_parallel(call, items: list, jobs: int) -> dict:
    """call(item, threads) for each item, `jobs` at a time -> {item: its result, or the RuntimeError it raised}.
    The processes running at once share the cores (OMP_NUM_THREADS, if set, is each one's count)."""
    from concurrent.futures import ThreadPoolExecutor

    threads = CTX["threads"] or max(1, len(os.sched_getaffinity(0)) // max(1, min(jobs, len(items))))

    def attempt(item):
        try:
            return call(item, threads)
        except RuntimeError as e:
            return e

    with ThreadPoolExecutor(jobs) as pool:
        return dict(zip(items, pool.map(attempt, items)))


CTX = {}  # the run's settings and paths
FORK_SERVER = multiprocessing.get_context("forkserver")
FORK_SERVER.set_forkserver_preload(["torch", "transformers", "transformers.models.llama.modeling_llama",
                                    "atkd.train", "contra_kd.train", "contra_kd.generate_data",
                                    "contra_kd.train_velocity_field", "anli_reverse_kl.train"])


def _path(*parts) -> Path:
    return CTX["out"].joinpath(*parts)


# ---- preparation stages (each once per OUT folder) ----

def stage_models() -> dict:
    from common import hf
    from common.pretrained import fetch

    if CTX["model_dir"] == CTX["default_model_dir"]:
        fetch("smollm2-135m-instruct", CTX["model_dir"])
    hf.save_kept_layers(CTX["model_dir"], str(_path("student")), CTX["student_layers"])
    return {}


def stage_data() -> dict:
    """Chat-prompt records -> contra_kd's DSKD layout, tokenised by contra_kd/prepare_data.py; the eval items."""
    from common import hf
    from contra_kd import prepare_data

    s = CTX
    tok = hf.load_tokenizer(s["model_dir"])
    if not tok.chat_template:
        raise UserError(f"{s['model_dir']}: the tokenizer has no chat template; give an instruct model")
    train_file = ROOT / "data/contra_kd/dolly_standin/train.jsonl"
    n_pool, n_warm = s["steps"] * s["batch_size"], s["warmup_steps"] * s["batch_size"]
    dev = fitting(tok, ROOT / "data/contra_kd/dolly_standin/dev.jsonl", s["max_prompt_length"], s["dev_items"])
    for name, records in (("pool", fitting(tok, train_file, s["max_prompt_length"], n_pool)),
                          ("warmup", fitting(tok, train_file, s["max_prompt_length"], n_warm, skip=n_pool))):
        raw = _path("data", "raw", name)
        raw.mkdir(parents=True, exist_ok=True)
        write_jsonl(records, str(raw / "train.jsonl"))
        write_jsonl(dev, str(raw / "dev.jsonl"))
        prepare_data.dolly(str(raw), str(_path("data", name)), s["model_dir"], MODEL_TYPE,
                           max_prompt_length=s["max_prompt_length"], dev_num=len(dev))
        with open(_path("data", name, "full", MODEL_TYPE, "train.jsonl")) as f:
            assert sum(1 for _ in f) == len(records), "contra_kd/prepare_data.py dropped a prompt that fits"
    evals = fitting(tok, ROOT / "data/instruct/dolly/valid.jsonl", s["max_prompt_length"], s["eval_items"])
    write_jsonl(evals, str(_path("data", "eval.jsonl")))
    return dict(pool=n_pool, warmup=n_warm, dev=len(dev), eval=len(evals))


def contra_flags() -> dict:
    s = CTX
    return dict(lr=s["lr"], lr_min=0.0, weight_decay=0.01, batch_size=s["batch_size"], gradient_accumulation_steps=1,
                epochs=1, max_length=s["max_length"], max_prompt_length=s["max_prompt_length"],
                num_distill_layers=s["num_distill_layers"], select_by="loss", dtype="bfloat16",
                eval_batch_size=s["eval_batch_size"])


def stage_warmup() -> dict:
    from contra_kd import train

    save = _path("prep", "warmup")
    train.main(type="sft", model_path=str(_path("student")), data_dir=str(_path("data", "warmup", "full", MODEL_TYPE)),
               save=str(save), seed=0, **contra_flags())
    shutil.rmtree(save / "checkpoints", ignore_errors=True)
    return {}


def stage_generate(model: str, name: str) -> dict:
    """contra_kd/generate_data.py: responses to the pool's prompts (SeqKD's and DistiLLM-2's training data)."""
    from contra_kd import generate_data

    s = CTX
    generate_data.main(model_path=model, data_dir=str(_path("data", "pool", "full", MODEL_TYPE)),
                       save=str(_path("prep", name)), max_length=s["max_length"],
                       max_prompt_length=s["max_prompt_length"], top_p=1.0, batch_size=s["eval_batch_size"], seed=0,
                       dtype="bfloat16")
    return {}


def stage_velocity_field() -> dict:
    from contra_kd import train_velocity_field

    s = CTX
    train_velocity_field.main(model_path=start_model(), teacher_model_path=s["model_dir"],
                              data_dir=str(_path("data", "pool", "full", MODEL_TYPE)), save=str(_path("prep", "vf")),
                              epochs=1, batch_size=s["batch_size"], lr=s["lr"], lr_min=0.0, seed=0,
                              max_length=s["max_length"], num_distill_layers=s["num_distill_layers"],
                              velocity_width=s["velocity_width"], velocity_blocks=2, dtype="bfloat16")
    return {}


def start_model() -> str:
    return str(_path("prep", "warmup", "final"))


def eval_batches(records, tok):
    """(indices, prompt ids, gold response ids + EOS) in batches of eval_batch_size, responses cut at max_length."""
    from contra_kd.data import tokenize_record

    pairs = [tokenize_record(tok, r) for r in records]
    pairs = [(p, r[:CTX["max_length"] - len(p)]) for p, r in pairs]
    b = CTX["eval_batch_size"]
    for start in range(0, len(pairs), b):
        idx = list(range(start, min(start + b, len(pairs))))
        yield idx, [pairs[i][0] for i in idx], [pairs[i][1] for i in idx]


def gold_logits(model, tok, records):
    """Per item: the model's logits [n_i, V] at the positions that score its gold response tokens."""
    import torch

    from common.hf_training import autocast
    from common.labels import causal_lm_batch, targets_and_mask

    for idx, prompts, responses in eval_batches(records, tok):
        batch = causal_lm_batch(prompts, responses, pad_id=tok.pad_token_id)
        _, mask = targets_and_mask(batch["labels"], shift=True)
        with torch.no_grad(), autocast("bfloat16", "cpu"):
            logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
        for row, i in enumerate(idx):
            yield i, logits[row, mask[row]].float()


def stage_teacher_logits() -> dict:
    import torch

    from common import hf
    from common.io import save_tensors

    tok, teacher = hf.load_tokenizer(CTX["model_dir"]), hf.load_model(CTX["model_dir"], frozen=True)
    rows = [logits.half() for _, logits in gold_logits(teacher, tok, eval_records())]
    offsets = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    save_tensors({"logits": torch.cat(rows), "offsets": offsets}, str(_path("prep", "teacher_logits.safetensors")))
    return dict(tokens=int(offsets[-1]))


def eval_records() -> list:
    from common.io import read_jsonl

    return read_jsonl(str(_path("data", "eval.jsonl")))


# ---- evaluation ----

def evaluate(model_dir: str, sample_seed=None) -> dict:
    """Per held-out item: fwd KL on the gold response; with `sample_seed`, also a sampled response, the rev KL
    along it and its Rouge-L."""
    import torch

    from common import hf, losses
    from common.generation import generate, pad_rollouts
    from common.hf_training import autocast
    from common.io import read_tensors
    from common.metrics import rouge_l
    from contra_kd.eval import clean_response, no_repeat_ngram, references

    tok, model, records = hf.load_tokenizer(model_dir), hf.load_model(model_dir, frozen=True), eval_records()
    cache = read_tensors(str(_path("prep", "teacher_logits.safetensors")))
    offsets = cache["offsets"].tolist()
    fwd = [None] * len(records)
    for i, logits in gold_logits(model, tok, records):
        teacher = cache["logits"][offsets[i]:offsets[i + 1]].float()
        fwd[i] = losses.forward_kl(logits[None], teacher[None], mask=torch.ones(1, len(logits), dtype=torch.bool)).item()
    if sample_seed is None:
        return dict(fwd_kl=fwd)

    teacher = hf.load_model(CTX["model_dir"], frozen=True)
    gen = torch.Generator().manual_seed(sample_seed)
    new_tokens = CTX["max_length"] - CTX["max_prompt_length"]
    rev, rouge, texts = [], [], []
    for idx, prompts, _ in eval_batches(records, tok):
        with torch.no_grad(), autocast("bfloat16", "cpu"):
            samples = generate(model, prompts, new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                               eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, padding="left", generator=gen,
                               logits_processor=no_repeat_ngram(6))
            rollouts = pad_rollouts(prompts, samples, pad_id=tok.pad_token_id)
            s_logits = model(**rollouts.model_inputs()).logits.float()
            t_logits = teacher(**rollouts.model_inputs()).logits.float()
        for row, i in enumerate(idx):
            mask = rollouts.response_mask[row:row + 1]
            rev.append(losses.reverse_kl(s_logits[row:row + 1], t_logits[row:row + 1], mask=mask).item())
            texts.append(clean_response(tok, samples[row]))
            rouge.append(100 * rouge_l(texts[-1], references(records[i])))
    return dict(fwd_kl=fwd, rev_kl=rev, rouge_l=rouge, samples=texts)


def stage_reference(name: str) -> dict:
    return evaluate(CTX["model_dir"] if name == "teacher" else start_model(), sample_seed=EVAL_SEED)


# ---- the rows: each folder's entry point with the shared budget ----

def seed_data(seed: int, folder: str) -> Path:
    """This seed's training data in `folder`'s format, visited in seed_order(seed) (written once, atomically)."""
    from anli_reverse_kl.prepare_data import write_tokenized
    from anli_reverse_kl.train import item_order
    from common import hf
    from common.io import atomic_folder
    from common.training import epoch_order
    from contra_kd.data import InstructionSplit

    out = _path("data", f"seed-{seed}", folder)
    pool = _path("data", "pool", "full", MODEL_TYPE)
    n = CTX["steps"] * CTX["batch_size"]
    order = seed_order(n, seed)
    if folder == "contra_kd":  # slot j of epoch 0 reads file position epoch_order(n, seed, 0)[j]
        at = file_order(order, epoch_order(n, seed, 0))
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(str(out)) as tmp:
            tmp = Path(tmp)
            if folder == "atkd":  # --mode online reads the file in order; `instruction` holds the rendered prompt
                records = [json.loads(line) for line in open(pool / "train.jsonl")]
                write_jsonl([dict(instruction=records[i]["prompt"], output=records[i]["output"]) for i in order],
                            str(tmp / "train.jsonl"))
            elif folder == "contra_kd":
                reorder_split(pool, tmp / "gt", at)
            else:  # anli_reverse_kl: iteration i's prompts: item_order(n, i * b, b, seed); prompt ⟂ target ⟂ 4 empty
                split = InstructionSplit(str(pool), "train")
                items = [split[i] for i in file_order(order, item_order(n, 0, n, seed))]
                write_tokenized(str(tmp), "train", [p + [-1] + r + [-1] * 4 for p, r in items],
                                [dict(prompt_tokens=p, target_tokens=r) for p, r in items],
                                len(hf.load_tokenizer(CTX["model_dir"])))
    if folder == "contra_kd":
        add_responses(out, at)
    return out


def add_responses(out: Path, at: list) -> None:
    """The teacher / student responses (SeqKD, DistiLLM-2) in the file order `at`, once the prep has drawn them:
    also into a seed folder written by a run without those rows."""
    from common.io import atomic_folder

    if _path("prep", "tgo").exists() and not (out / "distillm2").exists():
        with atomic_folder(str(out / "distillm2")) as tmp:
            for name in ("tgo", "sgo"):
                reorder_split(_path("prep", name), Path(tmp) / name, at)


def stage_seed_data(seed: int, folder: str) -> dict:
    seed_data(seed, folder)
    return {}


def train_atkd(flags: dict, seed: int, save: Path) -> Path:
    from atkd import train

    s = CTX
    train.main(student_model_path=start_model(), teacher_model_path=s["model_dir"],
               data_path=str(seed_data(seed, "atkd") / "train.jsonl"), output_dir=str(save), mode="online",
               num_train_epochs=1, per_device_train_batch_size=s["batch_size"], gradient_accumulation_steps=1,
               learning_rate=s["lr"], weight_decay=0.01, warmup_ratio=0.0, lr_scheduler_type="cosine",
               max_grad_norm=1.0, model_max_length=s["max_length"], bf16=True, seed=seed, save_strategy="steps",
               save_steps=s["curve_every"], **flags)
    return save / "model"


def train_contra(flags: dict, seed: int, save: Path) -> Path:
    from contra_kd import train

    data = seed_data(seed, "contra_kd")
    paths = dict(data_dir=str(data / "gt"))
    if flags["type"] == "seqkd":
        paths = dict(data_dir=str(data / "distillm2" / "tgo"))
    if flags["type"] == "distillm2":
        paths = dict(data_dir=str(data / "distillm2"), gt_data_dir=str(data / "gt"))
    if flags["type"].endswith("+contra"):
        paths.update(velocity_field=str(_path("prep", "vf", "velocity_field.safetensors")),
                     projector=str(_path("prep", "vf", "projector.safetensors")))
    train.main(model_path=start_model(), teacher_model_path=CTX["model_dir"], save=str(save), seed=seed,
               save_steps=CTX["curve_every"], save_interval=CTX["curve_every"], **paths, **contra_flags(), **flags)
    return save / "final"


def train_anli(flags: dict, seed: int, save: Path) -> Path:
    from anli_reverse_kl.train import train

    s = CTX
    b = s["batch_size"]  # one rollout iteration of batch_size prompts = one PPO epoch = one optimiser step
    train(model_path=start_model(), teacher_model_path=s["model_dir"], data_dir=str(seed_data(seed, "anli_reverse_kl")),
          save=str(save), lr=s["lr"], optimizer="adamw", batch_size=b, gradient_accumulation_steps=1,
          total_iters=s["steps"], warmup_iters=0, weight_decay=0.01, clip_grad=1.0, lr_decay_style="cosine",
          max_len=s["max_length"], max_prompt_length=s["max_prompt_length"], ppo_epochs=1, num_rollouts=b,
          chunk_size=b, max_new_tokens=s["max_length"] - s["max_prompt_length"], dtype="bfloat16",
          save_interval=s["curve_every"], seed=seed, **flags)
    return save / "model"


TRAINERS = {"atkd": train_atkd, "contra_kd": train_contra, "anli_reverse_kl": train_anli}


def run_row(row: str, seed: int) -> dict:
    """Train `row` for seed `seed` (unless done), evaluate its curve exports and final weights, clean up."""
    _, folder, flags = ROWS[row]
    save = _path("runs", row, f"seed-{seed}")
    trained = save / "trained.json"
    if trained.exists() and not Path(json.loads(trained.read_text())["final"]).exists():
        shutil.rmtree(save)  # evaluated and cleaned up, but its result was lost: train again
    if not trained.exists():
        resumed = (save / "checkpoints").exists()
        rss, wall, cpu = _rss_kib("VmRSS"), time.perf_counter(), time.process_time()
        final = TRAINERS[folder](flags, seed, save)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        atomic_write_json(dict(final=str(final), train_s=wall, cpu_s=cpu, resumed=resumed,
                               peak_mib=(_rss_kib("VmHWM") - rss) / 1024), str(trained))
    cost = json.loads(trained.read_text())
    steps = CTX["steps"]
    curve = [[k, float(np.mean(evaluate(str(save / f"step-{k}"))["fwd_kl"]))]
             for k in range(CTX["curve_every"], steps, CTX["curve_every"])]
    final = evaluate(cost.pop("final"), sample_seed=EVAL_SEED + 10 * seed)
    curve.append([steps, float(np.mean(final["fwd_kl"]))])
    for path in save.iterdir():  # keep the logs, drop the weights
        if path.is_dir():
            shutil.rmtree(path)
    return dict(final, row=row, seed=seed, steps=steps, curve=curve, steps_per_s=steps / cost["train_s"],
                cpu_s_per_step=cost["cpu_s"] / steps, **cost)


# ---- statistics, table, figure ----

def sign_flip_p(diffs, draws: int = 20000) -> float:
    """Two-sided p of mean(diffs) = 0 against random sign flips of the paired differences."""
    d = np.asarray(diffs, dtype=float)
    if not len(d) or not d.any():
        return 1.0
    signs = np.random.default_rng(0).choice([-1.0, 1.0], size=(draws, len(d)))
    null = np.abs((signs * d).mean(1))
    return float((1 + np.sum(null >= abs(d.mean()) * (1 - 1e-12))) / (draws + 1))


def summarise(results: dict, refs: dict) -> dict:
    """results[row][seed] -> per row: each metric's mean and sd over seeds (of per-seed item means), the paired
    difference to each baseline with its p, cost, and the mean curve."""
    out = {}
    for row, seeds in results.items():
        entry = dict(label=ROWS[row][0], folder=ROWS[row][1], flags=ROWS[row][2], seeds=sorted(seeds))
        for metric in METRICS:
            means = [float(np.mean(seeds[s][metric])) for s in sorted(seeds)]
            entry[metric] = dict(mean=float(np.mean(means)), sd=statistics.stdev(means) if len(means) > 1 else 0.0)
            for base in BASELINES:
                if base == row or base not in results:
                    continue
                shared = sorted(set(seeds) & set(results[base]))
                diffs = [a - b for s in shared for a, b in zip(seeds[s][metric], results[base][s][metric])]
                entry[metric][f"vs_{base}"] = dict(diff=float(np.mean(diffs)), p=sign_flip_p(diffs), pairs=len(diffs))
        for key in ("steps_per_s", "cpu_s_per_step", "peak_mib"):
            entry[key] = float(np.mean([seeds[s][key] for s in seeds]))
        units = [seeds[s]["wall_s"] for s in seeds if "wall_s" in seeds[s]]  # training + evaluation
        entry["unit_s"] = float(np.mean(units)) if units else None
        start = float(np.mean(refs["start"]["fwd_kl"]))
        points = [k for k, _ in seeds[min(seeds)]["curve"]]
        entry["curve"] = [[0, start]] + [[k, float(np.mean([dict(seeds[s]["curve"])[k] for s in seeds]))]
                                         for k in points]
        out[row] = entry
    return out


def table(summary: dict, refs: dict, settings: dict) -> str:
    def cell(m):
        return f"{m['mean']:.3f} ± {m['sd']:.3f}"

    def diff(m, base):
        d = m.get(f"vs_{base}")
        if d is None:
            return "—"
        return f"{d['diff']:+.3f} (p {'< 0.001' if d['p'] < 0.001 else format(d['p'], '.3f')})"

    lines = ["| objective | trained by | " + " | ".join(t for _, t in METRICS.values())
             + " | steps/s | CPU s/step | peak MiB |",
             "|---|---|" + "---|" * (len(METRICS) + 3)]
    for name in ("teacher", "start"):
        r = refs[name]
        label = "teacher (reference)" if name == "teacher" else "student start (SFT warm-up)"
        lines.append(f"| {label} | — | " + " | ".join(f"{np.mean(r[m]):.3f}" for m in METRICS) + " | | | |")
    for row, e in summary.items():
        lines.append(f"| {e['label']} | {e['folder']} | " + " | ".join(cell(e[m]) for m in METRICS)
                     + f" | {e['steps_per_s']:.3f} | {e['cpu_s_per_step']:.1f} | {e['peak_mib']:.0f} |")
    lines += ["", "Paired differences (row − baseline; mean over seeds × held-out items, sign-flip p):", "",
              "| objective | " + " | ".join(f"{short} vs {b}" for short, _ in METRICS.values()
                                          for b in ("SFT", "FKL")) + " |",
              "|---|" + "---|" * (2 * len(METRICS))]
    for row, e in summary.items():
        lines.append(f"| {e['label']} | " + " | ".join(diff(e[m], b) for m in METRICS for b in BASELINES) + " |")
    s = settings
    lines += ["", f"{len(summary)} rows × seeds {s['seeds']}: {s['steps']} steps × batch {s['batch_size']}, lr "
              f"{s['lr']} cosine, sequences ≤ {s['max_length']} tokens (prompt ≤ {s['max_prompt_length']}); "
              f"{s['eval_items']} held-out Dolly test items; student warmed up {s['warmup_steps']} SFT steps."]
    return "\n".join(lines)


def figure(summary: dict, refs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(summary)
    labels = [summary[r]["label"] for r in rows]
    fig, axes = plt.subplots(2, 3, figsize=(17, 10))
    panels = [(m, t) for m, (_, t) in METRICS.items()] + [("steps_per_s", "training steps/s ↑"),
                                                     ("peak_mib", "peak memory (MiB) ↓")]
    for k, (ax, (key, title)) in enumerate(zip(axes.flat, panels)):
        means = [summary[r][key]["mean"] if key in METRICS else summary[r][key] for r in rows]
        sds = [summary[r][key]["sd"] if key in METRICS else 0 for r in rows]
        ax.barh(range(len(rows)), means, xerr=sds, color="tab:blue", alpha=0.8, capsize=3)
        if key in METRICS:
            for name, style in (("start", "--"), ("teacher", ":")):
                ax.axvline(np.mean(refs[name][key]), color="k", linestyle=style, linewidth=1, label=name)
            ax.legend(loc="lower right", fontsize=7)
        ax.set_yticks(range(len(rows)), labels if k % 3 == 0 else [""] * len(rows), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title)
    ax = axes.flat[-1]
    cmap = plt.get_cmap("tab20")
    for k, r in enumerate(rows):
        steps, values = zip(*summary[r]["curve"])
        ax.plot(steps, values, marker="o", markersize=3, color=cmap(k % 20), label=summary[r]["label"])
    ax.set_xlabel("optimiser step")
    ax.set_title("held-out fwd KL during training (mean over seeds)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- the command ----

def main(out: str = None, quick: bool = False, rows: str = None, seeds: int = None, steps: int = None,
         eval_items: int = None, batch_size: int = 8, lr: float = 2e-4, warmup_steps: int = 32,
         max_length: int = 256, max_prompt_length: int = 128, curve_points: int = 4, dev_items: int = 4,
         eval_batch_size: int = 8, model_dir: str = None, student_layers: str = STUDENT_LAYERS,
         num_distill_layers: int = 4, velocity_width: int = 384, jobs: int = 2):
    """Train and evaluate each of `rows` (default: all of ROWS) for seeds 0..seeds-1; print and write the table.

    `jobs` stages or (row, seed) runs at a time, sharing the cores (OMP_NUM_THREADS, if set: each one's threads):
    on 2 cores two one-thread processes beat one two-thread process (no synchronisation between the cores)."""
    from common.pretrained import cache_dir

    quick = quick or os.environ.get("QUICK", "") not in ("", "0")
    defaults = QUICK if quick else FULL
    seeds, steps = seeds or defaults["seeds"], steps or defaults["steps"]
    eval_items = eval_items or defaults["eval_items"]
    rows = list(ROWS) if rows is None else (rows.split(",") if isinstance(rows, str) else list(rows))
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise UserError(f"--rows {','.join(unknown)}: not a row; choose from {','.join(ROWS)}")
    default_model_dir = str(cache_dir() / "models" / "smollm2-135m-instruct")
    settings = dict(model_dir=model_dir or default_model_dir, student_layers=str(student_layers), steps=steps,
                    batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, max_length=max_length,
                    max_prompt_length=max_prompt_length, eval_items=eval_items, dev_items=dev_items,
                    curve_every=max(1, steps // curve_points), eval_batch_size=eval_batch_size,
                    num_distill_layers=num_distill_layers, velocity_width=velocity_width)
    out = Path(out or ROOT / "runs" / ("objectives-quick" if quick else "objectives"))
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "settings.json"
    if saved.exists() and json.loads(saved.read_text()) != settings:
        old = json.loads(saved.read_text())
        changed = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in settings.items() if old.get(k) != v)
        raise UserError(f"{out} holds a run with other settings ({changed}): pass another --out or the same settings")
    atomic_write_json(settings, str(saved))
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or None
    CTX.update(settings, out=out, default_model_dir=default_model_dir, threads=threads)

    clock = {}

    def stages(calls):  # [(name, fn, *args)] -> {name: result}, `jobs` at a time
        def call(c, threads):
            return run_forked(c[0], _path("prep", f"{c[0]}.json"), *c[1:], threads=threads)

        done = run_parallel(call, calls, jobs)
        for (name, *_), result in done.items():
            if isinstance(result, RuntimeError):
                raise result
            clock[name] = result.get("wall_s")
        return {name: result for (name, *_), result in done.items()}

    folders = {ROWS[r][1] for r in rows}
    for name, fn in (("models", stage_models), ("data", stage_data), ("warmup", stage_warmup)):
        stages([(name, fn)])
    needs = [("teacher_logits", stage_teacher_logits)]
    if {"seqkd", "distillm2"} & set(rows):
        needs += [("tgo", stage_generate, CTX["model_dir"], "tgo"), ("sgo", stage_generate, start_model(), "sgo")]
    if "contra" in rows:
        needs.append(("velocity_field", stage_velocity_field))
    stages(needs)
    refs = {name[len("reference-"):]: r for name, r in
            stages([(f"reference-{name}", stage_reference, name) for name in ("teacher", "start")]).items()}
    responses = "+responses" if {"seqkd", "distillm2"} & set(rows) else ""  # a folder first run without them
    stages([(f"data-seed{seed}-{folder}{responses if folder == 'contra_kd' else ''}", stage_seed_data, seed, folder)
            for seed in range(seeds) for folder in sorted(folders)])
    print(f"prepared {out} ({', '.join(f'{k} {v:.0f} s' for k, v in clock.items() if v is not None)}); rows of "
          f"{sorted(folders)}; {jobs} at a time" + (f", {threads} thread(s) each" if threads else ""))

    bar = tqdm(total=seeds * len(rows), desc="rows x seeds")

    def unit(row_seed, threads):
        row, seed = row_seed
        r = run_forked(f"{row}-seed{seed}", _path("results", row, f"seed-{seed}.json"), run_row, row, seed,
                       threads=threads)
        bar.update()
        tqdm.write(f"{row} seed {seed}: fwd KL {np.mean(r['fwd_kl']):.3f}, rev KL {np.mean(r['rev_kl']):.3f}, "
                   f"Rouge-L {np.mean(r['rouge_l']):.2f}, {r['steps_per_s']:.3f} steps/s, {r['peak_mib']:.0f} MiB")
        return r

    done = run_parallel(unit, [(row, seed) for seed in range(seeds) for row in rows], jobs)
    bar.close()
    results, failed = {}, []
    for (row, seed), r in sorted(done.items(), key=lambda kv: rows.index(kv[0][0])):  # the table in --rows order
        if isinstance(r, RuntimeError):
            failed.append(f"{row} seed {seed}")
            tqdm.write(str(r))
        else:
            results.setdefault(row, {})[seed] = r
    summary = summarise(results, refs)
    text = table(summary, refs, dict(settings, seeds=seeds))
    atomic_write_text(text + "\n", str(out / "objectives.md"))
    atomic_write_json(dict(settings=settings, seeds=seeds, prep_s=clock, references=refs, summary=summary,
                           results={r: {str(s): v for s, v in by_seed.items()} for r, by_seed in results.items()}),
                      str(out / "objectives.json"))
    figure(summary, refs, out / "objectives.png")
    print(text)
    print(f"\n{out}/objectives.md, objectives.json, objectives.png")
    if failed:
        raise UserError(f"{len(failed)} runs failed ({', '.join(failed)}); their logs are in {out}/logs; rerun "
                        f"the same command to retry them")


if __name__ == "__main__":
    from benchmarks import objectives  # one module for this process and the fork server's children

    run_cli(objectives.main)
