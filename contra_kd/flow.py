"""CONTRA-KD's projector and velocity field (contra_kd.md §5.6), saved as safetensors with the shapes and the
layer pairing they were trained for, so a field is never reused for another student/teacher pair.

    projector = Projector(d_student, d_teacher)                      # Linear(LayerNorm(h^S))
    field = VelocityField(d_teacher, width=1024, num_distill_layers=6)
    v = field(z, t, j)                                               # z [n, d_T], t [n] in [0, 1], j [n] layer id
    save_flow(path_field, path_projector, field, projector, pairing)
    field, projector = load_flow(path_field, path_projector, expected) # clear error on any mismatch
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.cli import UserError
from common.losses import velocity_field_loss


class Projector(nn.Module):
    """f_proj(h) = Linear(d_S → d_T)(LayerNorm(d_S)(h))."""

    def __init__(self, d_student: int, d_teacher: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_student)
        self.proj = nn.Linear(d_student, d_teacher)

    def forward(self, h):
        return self.proj(self.norm(h))


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the raw t ∈ [0, 1]: f_k = exp(-ln(10⁴)·k/(dim/2 - 1)), k < dim/2, [sin(t f), cos(t f)]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Block(nn.Module):
    """x + Dropout(Linear(4d → d)(GELU(Linear(d → 4d)(LayerNorm(x)))))."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return x + self.dropout(self.down(F.gelu(self.up(self.norm(x)))))


class VelocityField(nn.Module):
    """v_θ(z, t, j): Linear(d_T → d)(z) + TimeEmb(t) + LayerEmb(j) → n residual MLP blocks → Linear(d → d_T)."""

    def __init__(self, d_teacher: int, width: int = 1024, num_distill_layers: int = 6, num_blocks: int = 4,
                 dropout: float = 0.1):
        super().__init__()
        self.width = width
        self.inp = nn.Linear(d_teacher, width)
        self.time_mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.layer_emb = nn.Embedding(num_distill_layers, width)
        self.blocks = nn.ModuleList(Block(width, dropout) for _ in range(num_blocks))
        self.out = nn.Linear(width, d_teacher)

    def forward(self, z, t, j):
        x = self.inp(z) + self.time_mlp(time_embedding(t, self.width)) + self.layer_emb(j)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


class Flow(nn.Module):
    """Field and projector as one module (one optimiser, one DDP wrapper); calling it gives L_RF (losses.md §4.3)."""

    def __init__(self, field: VelocityField, projector: Projector):
        super().__init__()
        self.field, self.projector = field, projector

    def forward(self, student_states, teacher_states, *, mask, t, normalizer=None):
        return velocity_field_loss(self.field, self.projector, student_states, teacher_states, mask=mask, t=t,
                                   normalizer=normalizer)


def flow_config(field: VelocityField, projector: Projector, pairing: dict) -> dict:
    """What a saved field is valid for: widths, depth and the (student, teacher) hidden-state indices."""
    return {"d_student": projector.norm.normalized_shape[0], "d_teacher": field.inp.in_features,
            "width": field.width, "num_blocks": len(field.blocks), "num_distill_layers": field.layer_emb.num_embeddings,
            "student_layers": list(pairing["student_layers"]), "teacher_layers": list(pairing["teacher_layers"])}


def _save(path, module, config):
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, path + ".tmp", metadata={"contra_kd": json.dumps(config)})
    os.replace(path + ".tmp", path)


def save_flow(field_path: str, projector_path: str, field: VelocityField, projector: Projector, pairing: dict):
    config = flow_config(field, projector, pairing)
    _save(projector_path, projector, config)
    _save(field_path, field, config)


def read_flow_config(path: str, flag: str) -> dict:
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path} does not exist; train one with contra_kd/train_velocity_field.py")
    with safe_open(path, "pt") as f:
        meta = (f.metadata() or {}).get("contra_kd")
    if meta is None:
        raise UserError(f"{flag} {path} has no contra_kd metadata; pass a file written by "
                        f"contra_kd/train_velocity_field.py")
    return json.loads(meta)


def load_flow(field_path: str, projector_path: str, expected: dict, dropout: float = 0.1):
    """(VelocityField, Projector) built from the files' own config, after checking every key of `expected`
    (hidden sizes, layer pairing) against it: a field trained for another pair is refused in one line."""
    from safetensors.torch import load_file
    configs = {}
    for path, flag in ((field_path, "--velocity-field"), (projector_path, "--projector")):
        have = configs[flag] = read_flow_config(path, flag)
        diff = {k: (have.get(k), v) for k, v in expected.items() if have.get(k) != v}
        if diff:
            said = ", ".join(f"{k} {a} (this run: {b})" for k, (a, b) in diff.items())
            raise UserError(f"{flag} {path} was trained for {said}; train one for this pair with "
                            f"contra_kd/train_velocity_field.py")
    if configs["--velocity-field"] != configs["--projector"]:
        raise UserError(f"--velocity-field {field_path} and --projector {projector_path} come from different "
                        f"trainings; pass the pair written together")
    c = configs["--velocity-field"]
    field = VelocityField(c["d_teacher"], c["width"], c["num_distill_layers"], c["num_blocks"], dropout)
    projector = Projector(c["d_student"], c["d_teacher"])
    field.load_state_dict(load_file(field_path))
    projector.load_state_dict(load_file(projector_path))
    return field, projector
