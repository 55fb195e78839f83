"""Tests of msd.py: every invariant of docs/method.md has a test here that fails if it breaks."""
import contextlib
import copy
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data
import msd

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 30


def tiny_cfg(**kw):
    base = dict(image_size=16, patch_size=4, vision_width=16, vision_layers=2, vision_heads=2,
                text_width=16, text_layers=2, text_heads=2, mlp_ratio=2, embed_dim=8, max_len=10,
                dropout=0.0, queue_size=12, momentum=0.9, alpha=0.4, batch_size=2, accum_steps=4,
                grad_clip=1.0, lr=1e-3, seed=0)
    base.update(kw)
    return msd.Config(**base)


def fake_batch(B, cfg, seed=0):
    """B pairs: random images, random reports of varying length (with [CLS] first), pair ids."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 1, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(5, VOCAB, (B, cfg.max_len), generator=g)
    ids[:, 0] = 1  # [CLS]
    lengths = torch.randint(3, cfg.max_len + 1, (B,), generator=g)
    mask = (torch.arange(cfg.max_len)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # [PAD] = 0 after the end
    pair_ids = torch.arange(100, 100 + B)
    return images, ids, mask, pair_ids


def no_autocast():
    return contextlib.nullcontext()


def one_step(cfg, batch, model=None):
    model = model or msd.build_model(cfg, VOCAB)
    model.train()
    opt = msd.configure_optimizer(model, cfg)
    msd.train_step(model, opt, msd.Batch(*batch), cfg, lr=cfg.lr, alpha=cfg.alpha, autocast=no_autocast)
    return model


# ---------------------------------------------------------------- encoders


@pytest.mark.parametrize("with_mask", [False, True])
def test_manual_attention_equals_sdpa_forward_and_backward(with_mask):
    torch.manual_seed(0)
    fast = msd.Attention(16, 4, dropout=0.0, impl="sdpa")
    slow = copy.deepcopy(fast)
    slow.impl = "manual"
    x = torch.randn(3, 7, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5]) if with_mask else None
    y_fast, y_slow = fast(x, mask), slow(x2, mask)
    torch.testing.assert_close(y_fast, y_slow, atol=1e-6, rtol=1e-5)
    w = torch.randn_like(y_fast)
    (y_fast * w).sum().backward()
    (y_slow * w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=1e-5)
    for p, q in zip(fast.parameters(), slow.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "manual"])
def test_padding_does_not_change_text_feature(impl):
    cfg = tiny_cfg(attn_impl=impl)
    enc = msd.DualEncoder(cfg, VOCAB).eval()
    ids = torch.tensor([[1, 7, 8, 9, 2, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    mask[0, 0] = 1
    short = enc.encode_text(ids[:, :5], mask[:, :5])
    long = enc.encode_text(ids, mask)
    torch.testing.assert_close(short, long, atol=1e-6, rtol=1e-5)
    # and whatever sits in the padded positions does not matter either
    junk = ids.clone()
    junk[0, 5:] = 17
    torch.testing.assert_close(enc.encode_text(junk, mask), long, atol=1e-6, rtol=1e-5)


def test_encoders_are_per_sample_and_normalised():
    """No cross-sample operation (no BatchNorm): a row's feature does not depend on its batch.
    This is the encoder property that makes accumulation exact."""
    cfg = tiny_cfg()
    enc = msd.DualEncoder(cfg, VOCAB).eval()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in enc.modules())
    images, ids, mask, _ = fake_batch(6, cfg)
    v_all, t_all = enc.encode_image(images), enc.encode_text(ids, mask)
    v_two, t_two = enc.encode_image(images[2:4]), enc.encode_text(ids[2:4], mask[2:4])
    torch.testing.assert_close(v_all[2:4], v_two, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(t_all[2:4], t_two, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(v_all.norm(dim=1), torch.ones(6))
    assert v_all.shape == (6, cfg.embed_dim) and enc.image_features(images).shape == (6, cfg.vision_width)


# ---------------------------------------------------------------- teacher


def test_teacher_is_a_frozen_copy_in_eval_mode():
    model = msd.build_model(tiny_cfg(dropout=0.1), VOCAB)
    for p, q in zip(model.student.parameters(), model.teacher.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
        assert not q.requires_grad
    model.train()
    assert model.student.training and not model.teacher.training
    assert not any(m.training for m in model.teacher.modules())


def test_momentum_update_formula_and_extremes():
    torch.manual_seed(0)
    student = msd.DualEncoder(tiny_cfg(), VOCAB)
    teacher = msd.copy_params(student)
    for p in student.parameters():
        p.data.add_(torch.randn_like(p))
    before = [q.clone() for q in teacher.parameters()]
    msd.momentum_update(teacher, student, 0.9)
    for q0, q, p in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(q, 0.9 * q0 + 0.1 * p)
    before = [q.clone() for q in teacher.parameters()]
    msd.momentum_update(teacher, student, 1.0)  # m = 1: unchanged
    assert all(torch.equal(a, q) for a, q in zip(before, teacher.parameters()))
    msd.momentum_update(teacher, student, 0.0)  # m = 0: a copy of the student
    assert all(torch.equal(q, p) for q, p in zip(teacher.parameters(), student.parameters()))


# ---------------------------------------------------------------- queue


def test_queue_wraps_with_a_batch_size_that_does_not_divide_K():
    q = msd.FeatureQueue(size=7, dim=2)
    assert q.keys()[0].shape == (0, 2)  # nothing written: no keys at all, never zeros or noise
    written = []
    for step in range(5):  # batches of 3 into 7 slots: 3, 6, 9 -> wraps, ...
        ids = torch.arange(3 * step, 3 * step + 3)
        feats = torch.stack([ids.float(), -ids.float()], dim=1)
        q.enqueue(feats, ids)
        written.extend(ids.tolist())
        feats_q, ids_q = q.keys()
        assert len(ids_q) == min(len(written), 7)
        assert sorted(ids_q.tolist()) == sorted(written[-7:])  # exactly the most recent K
        assert torch.equal(feats_q[:, 0], ids_q.float())       # each feature beside its own id
    assert int(q.ptr) == 15 % 7


def test_queue_batch_larger_than_K_and_partial_fill_and_state_dict():
    q = msd.FeatureQueue(size=4, dim=1)
    q.enqueue(torch.ones(2, 1), torch.tensor([5, 6]))
    feats, ids = q.keys()
    assert ids.tolist() == [5, 6] and int(q.filled) == 2  # unwritten slots are not keys
    q.enqueue(torch.arange(10.0)[:, None], torch.arange(10))
    assert sorted(q.keys()[1].tolist()) == [6, 7, 8, 9]
    q2 = msd.FeatureQueue(size=4, dim=1)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.feats, q.feats) and torch.equal(q2.ids, q.ids)
    assert int(q2.ptr) == int(q.ptr) and int(q2.filled) == int(q.filled)
    empty = msd.FeatureQueue(size=0, dim=3)
    empty.enqueue(torch.ones(2, 3), torch.tensor([1, 2]))
    assert empty.keys()[0].shape == (0, 3)


# ---------------------------------------------------------------- loss


def random_features(b, M, d=8, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    f = lambda n: F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_(requires_grad)
    return f(b), f(b), f(b), f(b), f(M), f(M)


def test_loss_with_alpha_zero_is_cross_entropy_on_the_positive_column():
    v, t, v_m, t_m, image_keys, text_keys = random_features(4, 9)
    row_ids = torch.tensor([10, 11, 12, 13])
    key_ids = torch.tensor([10, 11, 12, 13, 20, 21, 22, 23, 24])  # positives in columns 0..3
    logit_scale = torch.tensor(math.log(1 / 0.07))
    loss = msd.msd_loss(v, t, v_m, t_m, image_keys, text_keys, row_ids, key_ids, logit_scale, 0.0)
    target = torch.arange(4)
    expected = (F.cross_entropy(v @ text_keys.t() / 0.07, target)
                + F.cross_entropy(t @ image_keys.t() / 0.07, target)) / 2
    torch.testing.assert_close(loss, expected)


def test_soft_targets_sum_to_one_and_teacher_path_has_no_gradient():
    v, t, v_m, t_m, image_keys, text_keys = random_features(4, 9, requires_grad=True)
    row_ids = torch.arange(4)
    key_ids = torch.tensor([0, 1, 2, 3, 7, 8, 2, 9, 10])  # pair 2 repeats in the "queue"
    y = msd.positive_targets(row_ids, key_ids)
    q = msd.soft_targets(torch.randn(4, 9), y, 0.4)
    torch.testing.assert_close(q.sum(1), torch.ones(4))
    assert (q > 0).all()
    logit_scale = torch.tensor(2.0, requires_grad=True)
    loss = msd.msd_loss(v, t, v_m, t_m, image_keys, text_keys, row_ids, key_ids, logit_scale, 0.4)
    loss.backward()
    assert v.grad is not None and t.grad is not None and logit_scale.grad is not None
    for teacher_side in (v_m, t_m, image_keys, text_keys):
        assert teacher_side.grad is None  # stop-gradient: nothing flows into the teacher or keys


def test_repeated_pair_id_is_a_positive():
    row_ids = torch.tensor([0, 1])
    key_ids = torch.tensor([0, 1, 5, 0])  # pair 0 also sits in the queue (column 3)
    y = msd.positive_targets(row_ids, key_ids)
    torch.testing.assert_close(y, torch.tensor([[0.5, 0, 0, 0.5], [0, 1.0, 0, 0]]))
    v, t, v_m, t_m, image_keys, text_keys = random_features(2, 4, seed=3)
    s = torch.tensor(0.0)  # tau = 1
    loss = msd.msd_loss(v, t, v_m, t_m, image_keys, text_keys, row_ids, key_ids, s, 0.0)
    log_p = F.log_softmax(v @ text_keys.t(), 1)
    i2t = -(0.5 * (log_p[0, 0] + log_p[0, 3]) + log_p[1, 1]) / 2
    log_p = F.log_softmax(t @ image_keys.t(), 1)
    t2i = -(0.5 * (log_p[0, 0] + log_p[0, 3]) + log_p[1, 1]) / 2
    torch.testing.assert_close(loss, (i2t + t2i) / 2)


def albef_itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue,
                   idx, idx_queue, temp, alpha):
    """ALBEF's image-text contrastive loss with momentum distillation, re-typed independently in
    ALBEF's own layout (keys as COLUMNS: (d, M) tensors, the queue stored transposed) and with
    its idx-based targets (models/model_retrieval.py): nothing of msd.py is used."""
    image_feat_all = torch.cat([image_feat_m.t(), image_queue.t()], dim=1)   # (d, b + K)
    text_feat_all = torch.cat([text_feat_m.t(), text_queue.t()], dim=1)
    idx_all = torch.cat([idx, idx_queue]).view(1, -1)
    pos_idx = torch.eq(idx.view(-1, 1), idx_all).to(image_feat.dtype)
    sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
    sim_i2t_m = image_feat_m @ text_feat_all / temp
    sim_t2i_m = text_feat_m @ image_feat_all / temp
    sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
    sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image_feat @ text_feat_all / temp
    sim_t2i = text_feat @ image_feat_all / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


@pytest.mark.parametrize("K", [0, 16, 64])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("tau", [0.07, 0.5])
@pytest.mark.parametrize("repeats", [False, True])
def test_msd_loss_equals_albef_in_float64(K, alpha, tau, repeats):
    """msd_loss against the independent ALBEF formula: loss and gradients to 1e-12 in float64
    (y must follow the features' dtype: a float32 y alone would stop this at ~1e-7)."""
    b, d = 6, 8
    g = torch.Generator().manual_seed(K + int(100 * alpha) + int(10 * tau) + repeats)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    v, t = unit(b, d).requires_grad_(), unit(b, d).requires_grad_()
    v_m, t_m, q_v, q_t = unit(b, d), unit(b, d), unit(K, d), unit(K, d)
    idx = torch.tensor([0, 1, 2, 2, 3, 4]) if repeats else torch.arange(b)   # a repeated study
    idx_queue = torch.randint(0, 3 * b, (K,), generator=g) if repeats else torch.arange(100, 100 + K)
    logit_scale = torch.tensor(math.log(1 / tau), dtype=torch.float64, requires_grad=True)
    ours = msd.msd_loss(v, t, v_m, t_m, torch.cat([v_m, q_v]), torch.cat([t_m, q_t]), idx,
                        torch.cat([idx, idx_queue]), logit_scale, alpha)
    grads_ours = torch.autograd.grad(ours, (v, t))
    theirs = albef_itc_loss(v, t, v_m, t_m, q_v, q_t, idx, idx_queue, tau, alpha)
    grads_theirs = torch.autograd.grad(theirs, (v, t))
    assert abs(ours.item() - theirs.item()) < 1e-12, (ours.item(), theirs.item())
    for a, c in zip(grads_ours, grads_theirs):
        assert (a - c).abs().max().item() < 1e-12


# ---------------------------------------------------------------- the training step


def assert_models_close(a, b, tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=tol, rtol=tol, msg=f"weights differ: {name}")
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=tol, rtol=tol, msg=f"grads differ: {name}")
    for (name, x), y in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol, msg=f"buffers differ: {name}")


def test_accumulation_is_exact():
    """N micro-batches of b == one batch of N*b: gradients, weights after the step, teacher after
    the EMA, queue contents and pointer. Run twice, so the second step uses a non-empty queue."""
    big = tiny_cfg(batch_size=8, accum_steps=1)
    small = replace(big, batch_size=2, accum_steps=4)
    # float64, so that "equal" can mean 1e-10 and not float32 summation-order noise
    m_big, m_small = msd.build_model(big, VOCAB).double(), msd.build_model(small, VOCAB).double()
    opt_big, opt_small = msd.configure_optimizer(m_big, big), msd.configure_optimizer(m_small, small)
    m_big.train(), m_small.train()
    for step in range(2):
        batch = fake_batch(8, big, seed=step)
        batch = msd.Batch(batch[0].double(), *batch[1:])
        out_big = msd.train_step(m_big, opt_big, batch, big, 1e-3, 0.4, no_autocast)
        out_small = msd.train_step(m_small, opt_small, batch, small, 1e-3, 0.4, no_autocast)
        assert math.isclose(float(out_big["loss"]), float(out_small["loss"]), rel_tol=1e-12)
        assert_models_close(m_big, m_small, tol=1e-10)
    assert int(m_small.image_queue.filled) == 12 and int(m_small.image_queue.ptr) == 16 % 12


def test_naive_clip_accumulation_is_not_exact():
    """The contrast that motivates the method: end-to-end CLIP couples rows through in-batch
    negatives, so N x b naive accumulation is a different (smaller-batch) objective."""
    big = tiny_cfg(method="clip", batch_size=8, accum_steps=1)
    small = replace(big, batch_size=2, accum_steps=4)
    batch = fake_batch(8, big)
    m_big, m_small = one_step(big, batch), one_step(small, batch)
    grads_big = torch.cat([p.grad.flatten() for p in m_big.student.parameters()])
    grads_small = torch.cat([p.grad.flatten() for p in m_small.student.parameters()])
    assert not torch.allclose(grads_big, grads_small, rtol=1e-3, atol=1e-6)


def double_batch(B, cfg, seed):
    images, ids, mask, pair_ids = fake_batch(B, cfg, seed=seed)
    return msd.Batch(images.double(), ids, mask, pair_ids)


def test_exact_clip_accumulation_equals_one_batch():
    """clip_accum "exact" (GradCache): N x b equals end-to-end CLIP on one batch of N * b, in
    gradients, weights after the step and tau, over two steps (float64, 1e-10)."""
    big = tiny_cfg(method="clip", batch_size=8, accum_steps=1)
    small = replace(big, batch_size=2, accum_steps=4, clip_accum="exact")
    m_big, m_small = msd.build_model(big, VOCAB).double(), msd.build_model(small, VOCAB).double()
    opt_big, opt_small = msd.configure_optimizer(m_big, big), msd.configure_optimizer(m_small, small)
    m_big.train(), m_small.train()
    for step in range(2):
        batch = double_batch(8, big, seed=step)
        out_big = msd.train_step(m_big, opt_big, batch, big, 1e-3, 0.0, no_autocast)
        out_small = msd.train_step(m_small, opt_small, batch, small, 1e-3, 0.0, no_autocast)
        assert math.isclose(float(out_big["loss"]), float(out_small["loss"]), rel_tol=1e-12)
        assert m_small.logit_scale.grad is not None
        assert_models_close(m_big, m_small, tol=1e-10)


def test_exact_clip_accumulation_with_dropout_replays_the_masks():
    """With dropout the cached pass and the re-encoding must draw the same masks (the RNG state
    is saved and replayed). Reference: the gradient of ONE loss over the whole batch whose
    features are encoded, with gradient, from the same RNG state micro-batch by micro-batch, so
    with the same dropout masks as the cached pass."""
    cfg = tiny_cfg(method="clip", batch_size=2, accum_steps=4, clip_accum="exact", dropout=0.3,
                   grad_clip=0.0)  # .grad as backward left it
    batch = double_batch(8, cfg, seed=0)
    model = msd.build_model(cfg, VOCAB).double().train()
    reference = copy.deepcopy(model)
    torch.manual_seed(123)
    msd.train_step(model, msd.configure_optimizer(model, cfg), batch, cfg, 1e-3, 0.0, no_autocast)
    torch.manual_seed(123)
    lengths = batch.attention_mask.sum(1).tolist()
    feats = [reference.student(batch.images[rows], *msd.trim_padding(
                batch.input_ids[rows], batch.attention_mask[rows], lengths[rows]))
             for rows in [slice(j * 2, j * 2 + 2) for j in range(4)]]
    image_feat = torch.cat([v for v, _ in feats])  # (B, d), one graph over the whole batch
    text_feat = torch.cat([t for _, t in feats])
    msd.clip_loss(image_feat, text_feat, batch.pair_ids, reference.logit_scale).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-10, rtol=1e-10, msg=f"grads differ: {name}")


def test_msd_with_momentum_0_alpha_0_no_queue_is_clip_with_detached_keys():
    """The "detached keys" row of the batch-size study: with m = 0 the teacher is the student of
    the current step, with alpha = 0 and no queue the target is one-hot, so MSD's step is CLIP
    whose key side carries no gradient (each tower learns only as a query)."""
    cfg = tiny_cfg(momentum=0.0, alpha=0.0, queue_size=0, batch_size=2, accum_steps=4, grad_clip=0.0)
    model = msd.build_model(cfg, VOCAB).double().train()
    reference = copy.deepcopy(model.student)
    scale = model.logit_scale.detach().clone().requires_grad_()
    for step in range(2):  # step 2: the teacher is the student after step 1's EMA with m = 0
        batch = double_batch(8, cfg, seed=step)
        reference.load_state_dict(model.student.state_dict())
        reference.zero_grad()
        with torch.no_grad():
            scale.copy_(model.logit_scale)
        msd.train_step(model, msd.configure_optimizer(model, cfg), batch, cfg, 0.0, 0.0, no_autocast)
        v, t = reference(batch.images, batch.input_ids, batch.attention_mask)
        logits = scale.exp() * v @ t.detach().t()      # queries with gradient, keys without
        target = torch.arange(8)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(scale.exp() * t @ v.detach().t(), target)) / 2
        loss.backward()
        for (name, p), q in zip(model.student.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-10, rtol=1e-10, msg=f"grads differ: {name}")


def test_clip_accum_is_checked():
    with pytest.raises(ValueError, match="clip_accum"):
        msd.check_config(tiny_cfg(method="msd", clip_accum="exact"))   # MSD is exact already
    with pytest.raises(ValueError, match="'naive' or 'exact'"):
        msd.check_config(tiny_cfg(method="clip", clip_accum="gradcache"))


def test_ema_runs_once_per_optimizer_step():
    cfg = tiny_cfg(batch_size=2, accum_steps=4, momentum=0.9)
    model = msd.build_model(cfg, VOCAB)
    teacher_before = [p.clone() for p in model.teacher.parameters()]
    model = one_step(cfg, fake_batch(8, cfg), model)
    for q0, q, p in zip(teacher_before, model.teacher.parameters(), model.student.parameters()):
        # once: m * theta'_0 + (1 - m) * theta_after_step (four times would be m^4)
        torch.testing.assert_close(q, 0.9 * q0 + 0.1 * p.detach())


def test_ema_per_micro_batch_bug_gives_momentum_m_to_the_N():
    cfg = tiny_cfg(batch_size=2, accum_steps=4, momentum=0.9, ema_per_micro_batch=True)
    model = msd.build_model(cfg, VOCAB)
    teacher_before = [p.clone() for p in model.teacher.parameters()]
    student_before = [p.clone() for p in model.student.parameters()]
    one_step(cfg, fake_batch(8, cfg), model)
    m4 = 0.9 ** 4
    for q0, q, p0 in zip(teacher_before, model.teacher.parameters(), student_before):
        torch.testing.assert_close(q, m4 * q0 + (1 - m4) * p0)


def test_enqueue_happens_after_the_loss():
    """The first step must see an empty queue: the batch's own features are enqueued only after
    the loss. With K = B, after one step the queue holds exactly this batch's teacher features."""
    cfg = tiny_cfg(batch_size=2, accum_steps=4, queue_size=8)
    model = msd.build_model(cfg, VOCAB).train()
    batch = fake_batch(8, cfg)
    with torch.no_grad():
        expected = model.teacher.encode_image(batch[0])
    model_keys_seen = []
    real_loss = msd.msd_loss

    def spy(*args):
        model_keys_seen.append(args[4].shape[0])
        return real_loss(*args)

    msd.msd_loss = spy
    try:
        one_step(cfg, batch, model)
    finally:
        msd.msd_loss = real_loss
    assert model_keys_seen == [8] * 4  # B batch keys, no queue keys yet, the same for every micro-batch
    feats, ids = model.image_queue.keys()
    torch.testing.assert_close(feats, expected)
    assert ids.tolist() == batch[3].tolist()


def test_temperature_is_clamped_and_not_weight_decayed():
    cfg = tiny_cfg(weight_decay=0.5)
    model = msd.build_model(cfg, VOCAB)
    opt = msd.configure_optimizer(model, cfg)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.logit_scale) not in decayed
    assert all(p.dim() >= 2 for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"])
    assert not any(id(p) in {id(q) for g in opt.param_groups for q in g["params"]}
                   for p in model.teacher.parameters())
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # tau far below 0.01
    one_step(cfg, fake_batch(8, cfg), model)
    assert model.logit_scale.item() <= math.log(100.0) + 1e-6


def test_schedules():
    cfg = tiny_cfg(lr=1.0, min_lr=0.1, warmup_steps=10)
    lrs = [msd.get_lr(s, cfg, 110) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:110]))  # cosine: non-increasing
    assert lrs[110] == pytest.approx(0.1) and lrs[60] == pytest.approx(0.55)
    assert msd.get_alpha(0, cfg, 50) == 0.0
    assert msd.get_alpha(25, cfg, 50) == pytest.approx(0.2)
    assert msd.get_alpha(500, cfg, 50) == pytest.approx(0.4)


def test_data_order_depends_on_the_effective_batch_only():
    a = msd.epoch_batches(50, 8, seed=1, epoch=2)
    assert a == msd.epoch_batches(50, 8, seed=1, epoch=2)
    assert a != msd.epoch_batches(50, 8, seed=1, epoch=3)
    assert len(a) == 6 and all(len(x) == 8 for x in a)
    assert len({i for batch in a for i in batch}) == 48  # no pair twice in an epoch


# ---------------------------------------------------------------- config


def test_config_overrides_are_type_checked(tmp_path):
    cfg = msd.load_config(None, ["--accum_steps=8", "--alpha=0.2", "--amp=false", "--method=clip"])
    assert cfg.accum_steps == 8 and cfg.alpha == 0.2 and cfg.amp is False and cfg.method == "clip"
    with pytest.raises(KeyError, match="unknown config key 'acum_steps'.*accum_steps"):
        msd.load_config(None, ["--acum_steps=8"])
    with pytest.raises(ValueError, match="'batch_size': expected int"):
        msd.load_config(None, ["--batch_size=big"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"lr": "fast"}))
    with pytest.raises(TypeError, match="'lr': expected float"):
        msd.load_config(bad)
    bad.write_text(json.dumps({"queue": 5}))
    with pytest.raises(KeyError, match=f"unknown config key 'queue' in {bad}"):
        msd.load_config(bad)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        msd.load_config(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="method"):
        msd.load_config(None, ["--method=moco"])


SHIPPED_CONFIGS = ["tiny", "small", "pretrain_small", "mimic", "mimic_pretrained"]


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_shipped_configs_load(name):
    """Every shipped training config loads and passes the checks (a deleted one fails here)."""
    path = ROOT / "configs" / f"{name}.json"
    assert path.is_file(), f"{path} is gone"
    cfg = msd.load_config(path)
    assert cfg.out_dir.startswith("runs/")


def test_every_config_file_is_listed_or_a_run_list():
    """A training config added to configs/ is tested above; an ablation file names its base."""
    for path in sorted((ROOT / "configs").glob("*.json")):
        spec = json.loads(path.read_text())
        if "runs" in spec:
            assert (ROOT / spec["base"]).is_file(), f"{path.name}: base {spec['base']} is missing"
        else:
            assert path.stem in SHIPPED_CONFIGS, f"{path.name} is not in SHIPPED_CONFIGS"


# ---------------------------------------------------------------- end to end (SynthCXR, tiny)


@pytest.fixture(scope="module")
def synth_dir(tiny_synth):
    """The session's tiny SynthCXR (conftest.py): the tests here only read it."""
    return tiny_synth


def tiny_run_cfg(out_dir, synth, *overrides):
    return msd.load_config(ROOT / "configs" / "tiny.json",
                           [f"--out_dir={out_dir}", f"--synth_dir={synth}", "--progress=false",
                            *overrides])


def contrastive_loss_on_training_pairs(model, tokenizer, cfg, n=64):
    """In-batch CLIP loss of the student at a fixed tau on the first n training pairs."""
    ds = data.PairDataset(msd.prepare_data(cfg), "train", tokenizer,
                          data.ImageTransform(cfg.image_size, train=False))
    images, ids, mask, pair_ids, _ = torch.utils.data.default_collate([ds[i] for i in range(n)])
    with torch.no_grad():
        v, t = model.student.encode_image(images), model.student.encode_text(ids, mask)
        return msd.clip_loss(v, t, pair_ids, torch.tensor(math.log(1 / 0.07))).item()


def test_cli_smoke_tiny_trains_and_the_loss_falls(tmp_path, synth_dir):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "msd.py"), "--config", str(ROOT / "configs" / "tiny.json"),
                           f"--out_dir={out}", f"--synth_dir={synth_dir}", "--progress=false"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "effective batch B = 2 x 8 = 16 pairs" in proc.stdout and "teacher half-life" in proc.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    heldout, log = [r for r in log if "valid_loss" in r], [r for r in log if "loss" in r]
    assert [r["step"] for r in heldout] == [8, 16, 24] and all(0 <= r["valid_R@10"] <= 1 for r in heldout)
    assert log[-1]["step"] == 30 and all(math.isfinite(r["loss"]) for r in log)
    model, tokenizer, cfg, ckpt = msd.load_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == 30 and cfg.synth_dir == str(synth_dir) and not model.training
    # the training loss itself rises while the queue fills and alpha ramps up, so "the loss falls"
    # is measured on a fixed yardstick: the in-batch contrastive loss before and after training
    untrained = msd.build_model(cfg, tokenizer.vocab_size).eval()
    before = contrastive_loss_on_training_pairs(untrained, tokenizer, cfg)
    after = contrastive_loss_on_training_pairs(model, tokenizer, cfg)
    assert after < before - 0.2, (before, after)


def test_cli_rejects_unknown_keys_with_the_valid_list(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "msd.py"), "--config", str(ROOT / "configs" / "tiny.json"),
                           "--acum_steps=2"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'acum_steps' on the command line" in proc.stderr
    assert "accum_steps" in proc.stderr


def test_resume_is_bit_identical(tmp_path, synth_dir):
    """Stopped after 3 steps (mid-epoch) and resumed to 10 (across an epoch boundary) ends with
    exactly the weights, teacher, queues and optimizer state of an uninterrupted run. Dropout on,
    so the RNG state must travel in the checkpoint too."""
    extra = ["--max_steps=10", "--dropout=0.1"]
    straight = tiny_run_cfg(tmp_path / "straight", synth_dir, *extra)
    msd.pretrain(straight)
    resumed = tiny_run_cfg(tmp_path / "resumed", synth_dir, *extra)
    msd.pretrain(resumed, stop_after=3)
    assert msd.read_checkpoint(tmp_path / "resumed" / "ckpt.pt")["step"] == 3
    msd.pretrain(resumed, resume=True)
    a = msd.read_checkpoint(tmp_path / "straight" / "ckpt.pt")
    b = msd.read_checkpoint(tmp_path / "resumed" / "ckpt.pt")
    assert a["step"] == b["step"] == 10
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    log = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log if '"loss"' in line] == [5, 10]  # appended


def test_training_refuses_a_labels_only_manifest(tmp_path):
    rows = [{"image": str(tmp_path / "a.png"), "text": "", "split": "train", "study_id": "s1",
             "patient_id": "p1", "view": "PA"}]
    from PIL import Image
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    data.write_manifest(tmp_path / "m.csv", rows)
    cfg = msd.load_config(None, [f"--data={tmp_path / 'm.csv'}"])
    with pytest.raises(ValueError, match="no report text"):
        msd.build_tokenizer(cfg, msd.prepare_data(cfg))


# ---------------------------------------------------------------- speed without changing the math


def test_teacher_chunks_do_not_change_the_step():
    """teacher_batch only sizes the teacher's forward chunks: 3 rows at a time (not aligned with
    the micro-batches of 2) gives the step of one chunk of 8, to 1e-10 in float64."""
    runs = []
    for teacher_batch in (3, 256):
        cfg = tiny_cfg(batch_size=2, accum_steps=4, teacher_batch=teacher_batch)
        model = msd.build_model(cfg, VOCAB).double().train()
        opt = msd.configure_optimizer(model, cfg)
        for step in range(2):
            batch = fake_batch(8, cfg, seed=step)
            msd.train_step(model, opt, msd.Batch(batch[0].double(), *batch[1:]), cfg, 1e-3, 0.4, no_autocast)
        runs.append(model)
    assert_models_close(*runs, tol=1e-10)


def test_trim_padding():
    ids = torch.arange(12).view(2, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    trimmed, m = msd.trim_padding(ids, mask, [3, 4])
    assert trimmed.shape == (2, 4) and m.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    trimmed, m = msd.trim_padding(ids, mask, [4, 4])
    assert trimmed.shape == (2, 4) and m is None  # no row padded: no mask at all
    trimmed, m = msd.trim_padding(ids, mask, [3, 4], multiple=5)
    assert trimmed.shape == (2, 5) and m is not None  # rounded up to 5 (at most the full width)
    assert msd.trim_padding(ids, mask, [3, 4], multiple=8)[0].shape == (2, 6)


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads(optimizer):
    """Inside: any read of a tensor's value by the host (.item(), int(), float(), bool(),
    .tolist(), .numpy(), use as an index) raises. On a GPU each would make the host wait for the
    device. AdamW's own .item() on its step counter is allowed: that counter lives on the CPU
    even when the model is on a GPU, so it is no device read."""
    names = ["item", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def read(self, *args, **kwargs):
            raise HostRead(f"the training step read a tensor on the host: Tensor.{name}")
        return read

    def patch():
        for n in names:
            setattr(torch.Tensor, n, refuse(n))

    def unpatch():
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)

    real_step = optimizer.step

    def step_unpatched(*args, **kwargs):
        unpatch()
        try:
            return real_step(*args, **kwargs)
        finally:
            patch()

    optimizer.step = step_unpatched
    patch()
    try:
        yield
    finally:
        unpatch()
        optimizer.step = real_step


@pytest.mark.parametrize("method", ["msd", "clip", "clip-exact"])
def test_the_training_step_never_waits_for_the_device(method):
    exact = dict(method="clip", clip_accum="exact", dropout=0.1) if method == "clip-exact" else {}
    cfg = tiny_cfg(**{"method": method, "batch_size": 2, "accum_steps": 4, **exact})
    model = msd.build_model(cfg, VOCAB).train()
    opt = msd.configure_optimizer(model, cfg)
    for step in range(3):  # later steps read a non-empty queue
        images, ids, mask, pair_ids = fake_batch(8, cfg, seed=step)
        batch = msd.Batch(images, ids, mask, pair_ids, text_lengths=mask.sum(1).tolist())
        with no_host_reads(opt):
            out = msd.train_step(model, opt, batch, cfg, 1e-3, 0.4, no_autocast)
    assert all(torch.is_tensor(out[k]) for k in ("loss", "grad_norm", "tau"))
    with pytest.raises(HostRead):  # the guard itself works
        with no_host_reads(opt):
            out["loss"].item()


@pytest.mark.slow
def test_compiled_encoders_keep_the_step_exact():
    """compile=on (torch.compile of the four encoders, here on the CPU): the float64 step equals
    the eager step to 1e-10, and the state dict keys stay those of the eager model."""
    cfg = tiny_cfg(batch_size=2, accum_steps=4, compile="on")
    models = []
    for compiled in (False, True):
        model = msd.build_model(cfg, VOCAB).double().train()
        keys = list(model.state_dict())
        if compiled:
            assert msd.compile_towers(model, cfg, torch.device("cpu")) == "on"
        opt = msd.configure_optimizer(model, cfg)
        for step in range(2):
            batch = fake_batch(8, cfg, seed=step)
            msd.train_step(model, opt, msd.Batch(batch[0].double(), *batch[1:]), cfg, 1e-3, 0.4, no_autocast)
        assert list(model.state_dict()) == keys
        models.append(model)
    assert_models_close(*models, tol=1e-10)
