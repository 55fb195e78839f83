"""The two options the ratio-matched study needs: the teacher's momentum set from its half-life
(and the half-life printed beside the paper's), and report-level positives."""
import math

import pytest
import torch

import msd
from test_msd import tiny_run_cfg


@pytest.mark.parametrize("half_life, total, m", [
    (69.0, 192, 0.99),           # the warm table's m = 0.99: 69 steps
    (0.005, 768, 0.835),         # 0.5 % of the study's 768 steps: m = 0.84
    (138.2, 10_000, 0.995),      # ALBEF's m = 0.995
])
def test_momentum_from_half_life_inverts_the_half_life(half_life, total, m):
    got = msd.momentum_from_half_life(half_life, total)
    assert got == pytest.approx(m, abs=1e-3)
    steps = half_life if half_life >= 1 else half_life * total
    assert got ** steps == pytest.approx(0.5)                       # m^h = 1/2
    assert msd.teacher_half_life(got) == pytest.approx(steps)
    assert msd.teacher_half_life(0.0) == 0.0 and msd.teacher_half_life(1.0) == math.inf


def test_the_half_life_is_printed_as_a_share_of_the_run_and_warned_when_large():
    slow = msd.teacher_scale_lines(0.99, 24, 192)                   # 69 steps of 192: 36 %
    assert "69.0 optimizer steps = 2.87 epochs = 35.92% of the run" in slow[0]
    assert "138 steps" in slow[0]                                   # the paper's setting beside it
    assert len(slow) == 2 and slow[1].startswith("warning:") and "momentum_half_life" in slow[1]
    fast = msd.teacher_scale_lines(0.84, 24, 768)                   # 4 steps of 768: 0.52 %
    assert len(fast) == 1 and "0.52% of the run" in fast[0]


def test_momentum_half_life_is_checked():
    with pytest.raises(ValueError, match="momentum_half_life"):
        msd.check_config(msd.Config(momentum_half_life=-1))
    with pytest.raises(ValueError, match="only read with method 'msd'"):
        msd.check_config(msd.Config(method="clip", momentum_half_life=0.005))


@pytest.fixture(scope="module")
def synth(tiny_synth):
    """The session's tiny SynthCXR (conftest.py): the tests here only read it."""
    return tiny_synth


def tiny(out_dir, synth, *overrides):
    return tiny_run_cfg(out_dir, synth, "--max_steps=2", *overrides)


def test_the_loop_updates_the_teacher_with_the_m_of_the_half_life(tmp_path, synth, monkeypatch):
    used = []
    update = msd.momentum_update
    monkeypatch.setattr(msd, "momentum_update", lambda t, s, m: (used.append(m), update(t, s, m)))
    msd.pretrain(tiny(tmp_path / "a", synth, "--momentum_half_life=1"))
    assert used == [0.5, 0.5]                                       # 0.5^1 = 1/2, once a step
    used.clear()
    msd.pretrain(tiny(tmp_path / "b", synth))                       # without it: cfg.momentum
    assert used == [0.995, 0.995]


def test_report_ids_join_identical_reports():
    ids = msd.report_ids(["No acute findings.", "no  acute findings.", "Small left effusion.",
                          "No acute findings."])
    assert ids.tolist() == [0, 0, 1, 0]


def test_report_positives_share_the_positive_mass_in_the_loss():
    """Rows 0 and 2 carry the same report: with report ids each is the other's positive (half
    the mass each), with study ids the other is a negative."""
    texts = ["normal chest.", "left effusion.", "normal chest.", "cardiomegaly."]
    y = msd.positive_targets(msd.report_ids(texts), msd.report_ids(texts), torch.float64)
    assert y[0].tolist() == [0.5, 0.0, 0.5, 0.0] and y[1].tolist() == [0.0, 1.0, 0.0, 0.0]
    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=1)
    t = torch.nn.functional.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=1)
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    study = msd.clip_loss(v, t, torch.arange(4), scale)
    report = msd.clip_loss(v, t, msd.report_ids(texts), scale)
    logits = scale.exp() * v @ t.T
    by_hand = -(y * logits.log_softmax(1)).sum(1).mean() / 2 - (y * logits.T.log_softmax(1)).sum(1).mean() / 2
    assert report.item() == pytest.approx(by_hand.item(), abs=1e-12) and report.item() != study.item()


def test_report_positives_give_the_training_pairs_report_ids(tmp_path, synth, monkeypatch):
    seen = {}
    start = msd.start_run
    monkeypatch.setattr(msd, "start_run", lambda *a: seen.setdefault("run", start(*a)))
    msd.pretrain(tiny(tmp_path / "r", synth, "--report_positives=true", "--max_steps=1"))
    train_set = seen["run"].train_set
    assert train_set.pair_ids.tolist() == msd.report_ids(train_set.texts).tolist()
    assert len(set(train_set.pair_ids.tolist())) < len(train_set)   # SynthCXR repeats reports
