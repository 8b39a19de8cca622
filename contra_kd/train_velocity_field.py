"""CONTRA-KD stage 1: train the projector and the velocity field by rectified flow (contra_kd.md §5.6, losses.md §4.3).

    torchrun --nproc_per_node N contra_kd/train_velocity_field.py --model-path INIT --teacher-model-path TEACHER \
        --data-dir processed_data/dolly/full/gpt2 --save runs/gpt2/velocity_field \
        [--epochs 3] [--batch-size 8] [--lr 5e-4] [--velocity-width 1024] [--num-distill-layers 6]

The teacher and the student init are frozen (eval mode) and run on the ground-truth `full` sequences with their
hidden states; at each paired layer j (pairing of losses.md §4.2) the student's state is projected to teacher
space and the field learns the straight-line velocity y_T - y_S at Y_t = (1-t)·y_S + t·y_T, one t ~ U(0, 1)
per sequence. Projector and field train jointly (AdamW, weight decay 0.01, cosine to lr_min). Writes
`velocity_field.safetensors` and `projector.safetensors`, each carrying the hidden sizes and layer pairing it
was trained for. `fit_step` below is also the per-epoch re-fit of contra_kd/train.py. A DistiLLM-2 data folder
(holding `tgo/` and `sgo/`, contra_kd/generate_data.py) trains on the teacher- and student-output sequences
together, as CONTRA's `lm-distillm2` field.
"""
import os
import random
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (torchrun contra_kd/train_velocity_field.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from common import hf
from common.cli import UserError, check_choice, check_range, run_cli
from common.distributed import DTYPES, all_reduce_dp, print0, setup, shutdown
from common.hf_training import autocast, grad_sync, lr_schedule, optimizer_step, unwrap, wrap_ddp
from common.losses import distill_layer_indices
from common.training import epoch_order, global_count
from contra_kd.data import InstructionSplit, collate, model_inputs, rank_micro_batches
from contra_kd.flow import Flow, Projector, VelocityField, save_flow


def layer_pairing(student, teacher, num_distill_layers: int = 6) -> dict:
    """HF hidden_states indices paired by linspace (GPT-2 XL/base: [6, 13, ..., 41] / [1, 3, 5, 6, 8, 10])."""
    return {"student_layers": distill_layer_indices(unwrap(student).config.num_hidden_layers, num_distill_layers),
            "teacher_layers": distill_layer_indices(teacher.config.num_hidden_layers, num_distill_layers)}


def flow_expectation(student, teacher, pairing) -> dict:
    """What a saved field must have been trained for to serve this student/teacher pair."""
    return {"d_student": unwrap(student).config.hidden_size, "d_teacher": teacher.config.hidden_size,
            "num_distill_layers": len(pairing["student_layers"]), **pairing}


def sequence_times(seed: int, round_: int, step: int, n: int) -> torch.Tensor:
    """t ~ U(0, 1) per sequence of one global batch, keyed by (seed, round, step): the same draw whatever the
    number of processes and on resume."""
    g = torch.Generator().manual_seed(random.Random(f"{seed}-rf-{round_}-{step}").getrandbits(62))
    return torch.rand(n, generator=g)


def fit_step(flow, student, teacher, micro_batches, pairing, times, lay, dtype="float32"):
    """One optimiser step of L_RF over this rank's micro-batches [(offset in the global batch, batch dict)],
    normalised by the attention tokens of the whole step (all micro-batches, all ranks). `flow`: the
    (DDP-wrapped) Flow. Returns the step's global loss; the caller steps the optimiser."""
    norm = global_count(sum(int(b["attention_mask"].sum()) for _, b in micro_batches), lay.device)
    total = torch.zeros((), device=lay.device)
    for i, (offset, batch) in enumerate(micro_batches):
        with torch.no_grad(), autocast(dtype, lay.device):
            h_s = unwrap(student)(**model_inputs(batch), output_hidden_states=True).hidden_states
            h_t = teacher(**model_inputs(batch), output_hidden_states=True).hidden_states
        states_s = [h_s[k] for k in pairing["student_layers"]]
        states_t = [h_t[k] for k in pairing["teacher_layers"]]
        t = times[offset:offset + batch["input_ids"].shape[0]].to(lay.device)
        with grad_sync(flow, i == len(micro_batches) - 1):
            loss = flow(states_s, states_t, mask=batch["attention_mask"], t=t, normalizer=norm)
            loss.backward()
        total += loss.detach()
    return all_reduce_dp(total).item()


def flow_data(data_dir: str):
    """The `full` train split, or for a DistiLLM-2 folder the TGO items followed by the SGO items."""
    if all(os.path.isdir(os.path.join(data_dir, k)) for k in ("tgo", "sgo")):
        parts = [InstructionSplit(os.path.join(data_dir, k), "train") for k in ("tgo", "sgo")]
        return [part[i] for part in parts for i in range(len(part))]
    return InstructionSplit(data_dir, "train")


def flow_optimizer(field, projector, lr: float, weight_decay: float = 0.01):
    return torch.optim.AdamW(list(field.parameters()) + list(projector.parameters()), lr=lr, weight_decay=weight_decay)


def main(model_path: str, teacher_model_path: str, data_dir: str, save: str, epochs: int = 3, batch_size: int = 8,
         gradient_accumulation_steps: int = 1, lr: float = 5e-4, lr_min: float = 1e-7, seed: int = 10,
         max_length: int = 512, num_distill_layers: int = 6, velocity_width: int = 1024, velocity_blocks: int = 4,
         velocity_dropout: float = 0.1, clip_grad: float = 1.0, dtype: str = "float32"):
    check_choice("--dtype", dtype, DTYPES)
    for flag, value in (("--epochs", epochs), ("--batch-size", batch_size), ("--max-length", max_length),
                        ("--gradient-accumulation-steps", gradient_accumulation_steps),
                        ("--num-distill-layers", num_distill_layers), ("--velocity-width", velocity_width),
                        ("--velocity-blocks", velocity_blocks)):
        check_range(flag, value, low=1)
    # every input is checked before the models load: the folders, then the data
    hf.check_model_folder(model_path, "--model-path")
    hf.check_model_folder(teacher_model_path, "--teacher-model-path")
    data = flow_data(data_dir)
    if len(data) and data[0][1] is None:
        raise UserError(f"--data-dir {data_dir} holds prompt-only items; the flow is fitted on the ground-truth "
                        f"responses: pass the `full` variant (processed_data/dolly/full/...)")
    lay = setup(seed)
    flags = ("--model-path", "--teacher-model-path")
    tokenizer, teacher_tokenizer = hf.load_tokenizer(model_path, flags[0]), hf.load_tokenizer(teacher_model_path, flags[1])
    hf.check_tokenizers(tokenizer, teacher_tokenizer, flags)
    student = hf.load_model(model_path, device=lay.device, frozen=True, flag="--model-path")
    teacher = hf.load_model(teacher_model_path, device=lay.device, frozen=True, flag="--teacher-model-path")
    hf.check_vocab(student, teacher, tokenizer, teacher_tokenizer, flags=flags)
    pairing = layer_pairing(student, teacher, num_distill_layers)
    field = VelocityField(teacher.config.hidden_size, velocity_width, num_distill_layers, velocity_blocks,
                          velocity_dropout).to(lay.device)
    projector = Projector(student.config.hidden_size, teacher.config.hidden_size).to(lay.device)
    flow = wrap_ddp(Flow(field, projector), lay)
    global_batch = batch_size * gradient_accumulation_steps * lay.dp_size
    steps_per_epoch = len(data) // global_batch
    if steps_per_epoch == 0:
        raise UserError(f"--data-dir {data_dir}: {len(data)} items, fewer than one global batch of {global_batch}")
    optimizer = flow_optimizer(field, projector, lr)
    scheduler = lr_schedule(optimizer, "cosine", 0, epochs * steps_per_epoch, min_lr=lr_min)
    print0(f"velocity field: pairing student {pairing['student_layers']} -> teacher {pairing['teacher_layers']}, "
           f"{sum(p.numel() for p in flow.parameters()):,} parameters, {epochs} x {steps_per_epoch} steps")
    flow.train()
    for epoch in range(epochs):
        order = epoch_order(len(data), seed, epoch)
        bar = tqdm(range(steps_per_epoch), desc=f"flow epoch {epoch}", disable=not lay.is_main)
        for step in bar:
            items = order[step * global_batch:(step + 1) * global_batch]
            micro = [(off, collate([data[i] for i in idx], tokenizer.pad_token_id, max_length, lay.device))
                     for off, idx in rank_micro_batches(items, lay.dp_rank, lay.dp_size, batch_size)]
            times = sequence_times(seed, 0, epoch * steps_per_epoch + step, global_batch)
            loss = fit_step(flow, student, teacher, micro, pairing, times, lay, dtype)
            optimizer_step(optimizer, scheduler, max_grad_norm=clip_grad)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    if lay.is_main:
        save_flow(os.path.join(save, "velocity_field.safetensors"), os.path.join(save, "projector.safetensors"),
                  field, projector, pairing)
        print0(f"saved {save}/velocity_field.safetensors and projector.safetensors")
    shutdown()


if __name__ == "__main__":
    run_cli(main)
