import random

import pytest

from contra_kd.distillm import AdaptiveSGO, ReplayBuffer, distillm2_beta


def test_threshold_rises_by_a_tenth_only_when_dev_loss_rises_by_loss_eps_over_the_last_rise():
    schedule = AdaptiveSGO(init_threshold=0.0, loss_eps=0.1)
    # scripted dev CE: start, then one value per epoch
    script = [2.00, 1.90, 2.05, 2.11, 2.15, 2.22, 2.40, 2.45, 2.60, 1.00]
    thresholds, prevs = [], []
    for loss in script:
        schedule.update(loss)
        thresholds.append(round(schedule.threshold, 10))
        prevs.append(schedule.prev_loss)
    # 1.90, 2.05 < 2.10; 2.11 ≥ 2.10 -> θ 0.1; 2.15 < 2.21; 2.22 -> 0.2; 2.40 ≥ 2.32 -> 0.3; 2.45 < 2.50; 2.60 -> 0.4
    assert thresholds == [0.0, 0.0, 0.0, 0.1, 0.1, 0.2, 0.3, 0.3, 0.4, 0.4]
    assert prevs == [2.00, 2.00, 2.00, 2.11, 2.11, 2.22, 2.40, 2.40, 2.60, 2.60]


def test_threshold_is_capped_at_one():
    schedule = AdaptiveSGO(init_threshold=0.95)
    schedule.update(1.0)
    schedule.update(2.0)
    assert schedule.threshold == 1.0


def test_decreasing_schedule_generates_while_the_buffer_fills_then_mostly_replays():
    schedule = AdaptiveSGO(init_threshold=0.5, capacity=3)
    total = 100
    # buffer not full: any r < θ generates
    assert schedule.choose(50, total, 0.49, buffer_len=2) == "generate"
    # full buffer, 50 steps done: the original's global_step is 51, so r < θ·(1 - 51/100) = 0.245 generates,
    # 0.245 ≤ r < 0.5 replays, r ≥ θ uses ground truth
    assert schedule.choose(50, total, 0.244, buffer_len=3) == "generate"
    assert schedule.choose(50, total, 0.246, buffer_len=3) == "replay"
    assert schedule.choose(50, total, 0.50, buffer_len=3) == "ground_truth"
    assert schedule.choose(0, total, 0.494, buffer_len=3) == "generate"  # global_step 1: 0.5·0.99 = 0.495
    assert schedule.choose(0, total, 0.496, buffer_len=3) == "replay"


def test_replay_ratios_give_the_spec_sampling_probabilities():
    for ratio, want in (("decreasing", 0.8 * 0.75), ("constant", 0.4), ("increasing", 0.8 * 0.25)):
        assert AdaptiveSGO(0.8, replay_ratio=ratio).sample_ratio(25, 100) == pytest.approx(want)
    with pytest.raises(ValueError, match="--replay-ratio 'sometimes': use one of decreasing, constant"):
        AdaptiveSGO(0.8, replay_ratio="sometimes")


def test_zero_threshold_never_leaves_the_ground_truth():
    schedule = AdaptiveSGO(init_threshold=0.0)
    assert {schedule.choose(s, 10, r / 10, 0) for s in range(10) for r in range(10)} == {"ground_truth"}


def test_scripted_run_uses_sgos_only_after_the_dev_loss_rises_and_the_buffer_is_fifo():
    schedule, buffer, rng = AdaptiveSGO(init_threshold=0.0, loss_eps=0.1, capacity=4), ReplayBuffer(4), random.Random(0)
    schedule.update(2.0)
    counts = []
    step, per_epoch, total = 0, 50, 200
    for dev_loss in (1.9, 2.3, 2.45, 2.6):
        seen = {"generate": 0, "replay": 0, "ground_truth": 0}
        for _ in range(per_epoch):
            source = schedule.choose(step, total, rng.random(), len(buffer))
            seen[source] += 1
            if source == "generate":
                buffer.push([([step], [step, step])])
            step += 1
        counts.append(seen)
        schedule.update(dev_loss)
    assert counts[0] == counts[1] == {"generate": 0, "replay": 0, "ground_truth": 50}  # θ 0 until epoch 2's rise
    assert counts[2]["generate"] + counts[2]["replay"] > 0 and counts[3]["generate"] + counts[3]["replay"] > 0
    assert len(buffer) == 4
    newest = sorted(p[0] for p, _ in buffer.items)
    assert newest == sorted(newest)[-4:] and buffer.items[-1][0][0] == max(newest)


def test_buffer_sample_and_state_round_trip():
    buffer = ReplayBuffer(3)
    buffer.push([([1], [2]), ([3], [4]), ([5], [6]), ([7], [8])])
    assert [p for p, _ in buffer.items] == [[3], [5], [7]]
    restored = ReplayBuffer(1)
    restored.load_state_dict(buffer.state_dict())
    assert list(restored.items) == list(buffer.items) and restored.items.maxlen == 3
    assert restored.sample(2, random.Random(1)) == buffer.sample(2, random.Random(1))
    assert len(buffer.sample(10, random.Random(0))) == 3


def test_distillm2_gradual_beta_counts_steps_from_one_as_the_original():
    """β = 1 + 0.5·min(1, 2·global_step / max_steps), global_step = 1 at the first optimiser step."""
    assert distillm2_beta(0, 40, gradual=False) == 1.0
    assert distillm2_beta(0, 40, gradual=True) == pytest.approx(1.025)
    assert distillm2_beta(9, 40, gradual=True) == pytest.approx(1.25)
    assert distillm2_beta(19, 40, gradual=True) == pytest.approx(1.5)
    assert distillm2_beta(39, 40, gradual=True) == 1.5
