import math

import pytest
import torch

from common.losses import contra_loss, velocity_field_loss
from contra_kd.flow import Projector, VelocityField, load_flow, save_flow, time_embedding


def _clouds(n_layers=2, batch=16, seq=8, d_s=4, d_t=6, seed=0):
    """Paired point clouds: teacher_j = student_j @ W_j + shift_j (a different map per layer)."""
    g = torch.Generator().manual_seed(seed)
    student, teacher = [], []
    for j in range(n_layers):
        x = torch.randn(batch, seq, d_s, generator=g)
        w = torch.randn(d_s, d_t, generator=g)
        student.append(x)
        teacher.append(x @ w + 3.0 * (j + 1))
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[:, -2:] = False  # padding rows take no part
    return student, teacher, mask


def _transport_error(field, projector, student, teacher, mask, steps=20):
    """Mean squared distance between Euler-integrated projected student points (t: 0 -> 1) and their teacher pairs."""
    errors = []
    with torch.no_grad():
        for j, (h_s, h_t) in enumerate(zip(student, teacher)):
            z, y = projector(h_s[mask]), h_t[mask]
            layer = torch.full((z.shape[0],), j)
            for i in range(steps):
                z = z + field(z, torch.full((z.shape[0],), i / steps), layer) / steps
            errors.append((z - y).pow(2).mean())
    return torch.stack(errors).mean().item()


def test_time_embedding_matches_the_spec_formula():
    t, d = torch.tensor([0.0, 0.3, 1.0]), 8
    emb = time_embedding(t, d)
    for row, tv in zip(emb, t.tolist()):
        freqs = [math.exp(-math.log(1e4) * k / (d // 2 - 1)) for k in range(d // 2)]
        want = [math.sin(tv * f) for f in freqs] + [math.cos(tv * f) for f in freqs]
        assert row.tolist() == pytest.approx(want, abs=1e-6)


def test_trained_field_transports_student_cloud_onto_teacher_cloud_ten_times_closer():
    torch.manual_seed(0)
    student, teacher, mask = _clouds()
    projector = Projector(4, 6)
    field = VelocityField(6, width=64, num_distill_layers=2, num_blocks=2, dropout=0.0)
    before = _transport_error(field, projector, student, teacher, mask)
    opt = torch.optim.AdamW(list(field.parameters()) + list(projector.parameters()), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        loss = velocity_field_loss(field, projector, student, teacher, mask=mask, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _transport_error(field, projector, student, teacher, mask)
    assert after < before / 10, (before, after)


def test_contra_loss_is_zero_when_the_student_sits_on_the_euler_target():
    torch.manual_seed(0)
    student, _, mask = _clouds()
    projector = Projector(4, 6)
    field = VelocityField(6, width=16, num_distill_layers=2, num_blocks=1, dropout=0.0)
    assert contra_loss(field, projector, student, mask=mask, k=0.5).item() > 1e-3
    # a field whose Euler step only rescales a (v = c·a): a + k·v is parallel to a, the cosine is 1
    with torch.no_grad():
        field.out.weight.zero_()
        field.out.bias.zero_()
    assert contra_loss(field, projector, student, mask=mask, k=0.5).item() == pytest.approx(0.0, abs=1e-6)

    class Scaling(torch.nn.Module):
        def forward(self, z, t, j):
            return 0.7 * z

    assert contra_loss(Scaling(), projector, student, mask=mask, k=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_contra_step_moves_the_student_towards_its_euler_target():
    torch.manual_seed(0)
    student, _, mask = _clouds(n_layers=1)
    h = student[0].clone().requires_grad_(True)
    projector = Projector(4, 6)
    field = VelocityField(6, width=16, num_distill_layers=1, num_blocks=1, dropout=0.0)
    loss = contra_loss(field, projector, [h], mask=mask, k=1.0)
    loss.backward()
    with torch.no_grad():
        h2 = h - 0.05 * h.grad / h.grad.norm() * h.norm()
    assert contra_loss(field, projector, [h2], mask=mask, k=1.0) < loss


def test_saved_flow_reloads_and_refuses_other_hidden_sizes_or_layer_pairing(tmp_path):
    pairing = {"student_layers": [1, 2], "teacher_layers": [3, 5]}
    projector, field = Projector(4, 6), VelocityField(6, width=16, num_distill_layers=2, num_blocks=1)
    paths = str(tmp_path / "vf.safetensors"), str(tmp_path / "proj.safetensors")
    save_flow(*paths, field, projector, pairing)
    expected = {"d_student": 4, "d_teacher": 6, **pairing}
    f2, p2 = load_flow(*paths, expected, dropout=0.0)
    for a, b in zip(list(field.state_dict().values()) + list(projector.state_dict().values()),
                    list(f2.state_dict().values()) + list(p2.state_dict().values())):
        assert torch.equal(a, b)
    assert f2.width == 16 and len(f2.blocks) == 1
    with pytest.raises(ValueError, match=r"--velocity-field .*vf\.safetensors was trained for d_student 4 \(this run: 8\)"):
        load_flow(*paths, dict(expected, d_student=8))
    with pytest.raises(ValueError, match=r"teacher_layers \[3, 5\] \(this run: \[3, 4\]\)") as e:
        load_flow(*paths, dict(expected, teacher_layers=[3, 4]))
    assert "\n" not in str(e.value)
