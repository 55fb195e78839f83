"""A training run's guarantees: checkpoints never run code and are verified on load, NaN never
overwrites good work, a re-run never destroys a run, a resumed run is the same run, and a warm
start (init_from) loads exactly. Every test trains the tiny config for a few steps."""
import errno
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

import evaluate
import msd
from test_msd import tiny_run_cfg

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def synth_dir(tiny_synth):
    """The session's tiny SynthCXR (conftest.py): the tests here only read it."""
    return tiny_synth


def cfg_for(out_dir, synth, *overrides):
    """configs/tiny.json for 4 steps (test_msd's recipe)."""
    return tiny_run_cfg(out_dir, synth, "--max_steps=4", *overrides)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synth_dir):
    """A finished 4-step run; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("finished") / "run"
    msd.pretrain(cfg_for(out, synth_dir))
    return out


def copy_run(src, dst):
    dst.mkdir(parents=True)
    for name in ("ckpt.pt", "log.jsonl"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


# ---------------------------------------------------------------- 1. no code runs from a checkpoint


class Payload:
    """Unpickling this object would create the directory `marker` (a stand-in for any code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_a_planted_payload_never_executes(tmp_path, finished_run, synth_dir):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil" / "ckpt.pt"
    evil.parent.mkdir()
    state = torch.load(finished_run / "ckpt.pt", weights_only=True)
    state["extra"] = Payload(marker)
    torch.save(state, evil)
    with pytest.raises(msd.CheckpointError, match="cannot be read as a checkpoint"):
        msd.load_checkpoint(evil)
    # the same file through the two command lines that read checkpoints
    with pytest.raises(SystemExit) as exit_:
        msd.main(["--config", str(ROOT / "configs" / "tiny.json"), f"--out_dir={evil.parent}",
                  f"--synth_dir={synth_dir}", "--resume", "--progress=false"])
    assert exit_.value.code == 1
    with pytest.raises(msd.CheckpointError):
        evaluate.main(["--task", "zeroshot", "--checkpoint", str(evil), "--out", str(tmp_path / "r.json")])
    assert not marker.exists()


# ---------------------------------------------------------------- 2. NaN / inf, corrupt files


@pytest.mark.parametrize("override", ["--lr=inf", "--lr=nan", "--momentum=nan", "--log_every=0",
                                      "--epochs=0", "--max_steps=-1", "--ckpt_every=-1",
                                      "--dropout=1.0", "--teacher_batch=0", "--compile=fast"])
def test_nonsense_config_values_are_refused(override):
    key = override[2:].split("=")[0]
    with pytest.raises(ValueError, match=f"config key '{key}'"):
        msd.load_config(None, [override])


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, synth_dir, monkeypatch):
    """The loss turns NaN at step 3: the run stops with the step named, writes nothing after it,
    and ckpt.pt stays the step-2 checkpoint, byte for byte."""
    out = tmp_path / "run"
    cfg = cfg_for(out, synth_dir, "--ckpt_every=2", "--log_every=1", "--max_steps=6")
    real_loss, calls, saved = msd.msd_loss, [], {}
    real_save = msd.save_checkpoint

    def loss_nan_from_step_3(*args):
        calls.append(1)
        loss = real_loss(*args)
        return loss * float("nan") if len(calls) > 2 * cfg.accum_steps else loss

    def save_and_remember(path, *args, **kw):
        real_save(path, *args, **kw)
        saved[args[2]] = Path(path).read_bytes()

    monkeypatch.setattr(msd, "msd_loss", loss_nan_from_step_3)
    monkeypatch.setattr(msd, "save_checkpoint", save_and_remember)
    with pytest.raises(msd.NonFiniteError, match="step 3: the loss or the gradient norm is not finite"):
        msd.pretrain(cfg)
    assert list(saved) == [2]
    assert (out / "ckpt.pt").read_bytes() == saved[2]
    assert [json.loads(r)["step"] for r in (out / "log.jsonl").read_text().splitlines()
            if '"loss"' in r] == [1, 2]


def test_a_huge_learning_rate_exits_nonzero_without_a_nan_checkpoint(tmp_path, synth_dir, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        msd.main(["--config", str(ROOT / "configs" / "tiny.json"), f"--out_dir={out}",
                  f"--synth_dir={synth_dir}", "--progress=false", "--lr=1e6", "--warmup_steps=0",
                  "--max_steps=30"])
    assert exit_.value.code == 1
    assert "is not finite" in capsys.readouterr().err
    assert not (out / "ckpt.pt").exists()


def flip_a_weight_byte(path):
    """Flip one byte inside the largest stored tensor, as a failing disk or copy would."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    # local file header: 30 bytes + name + extra; the tensor's bytes follow, stored uncompressed
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    pos = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[pos] ^= 0x40
    path.write_bytes(bytes(raw))


def test_a_damaged_checkpoint_is_refused(tmp_path, finished_run):
    run = copy_run(finished_run, tmp_path / "run")
    flip_a_weight_byte(run / "ckpt.pt")
    torch.load(run / "ckpt.pt", weights_only=True)  # torch itself reads it without complaint
    with pytest.raises(msd.CheckpointError, match="corrupt checkpoint"):
        msd.load_checkpoint(run / "ckpt.pt")


def test_non_finite_weights_in_a_checkpoint_are_refused(tmp_path, finished_run):
    state = msd.read_checkpoint(finished_run / "ckpt.pt")
    state["model"]["logit_scale"] = torch.tensor(float("nan"))
    state.pop("sha256")
    state["sha256"] = msd.checkpoint_sha256(state)
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(msd.CheckpointError, match="non-finite values"):
        msd.load_checkpoint(tmp_path / "nan.pt")
    # and save_checkpoint never writes such weights over a good checkpoint
    model, tokenizer, cfg, _ = msd.load_checkpoint(finished_run / "ckpt.pt")
    with torch.no_grad():
        model.logit_scale.fill_(float("inf"))
    good = copy_run(finished_run, tmp_path / "good")
    before = (good / "ckpt.pt").read_bytes()
    with pytest.raises(msd.NonFiniteError, match="non-finite values in logit_scale"):
        msd.save_checkpoint(good / "ckpt.pt", model, msd.configure_optimizer(model, cfg), 4, cfg, tokenizer)
    assert (good / "ckpt.pt").read_bytes() == before


def test_a_full_disk_says_so_and_leaves_no_temporary_file(tmp_path, finished_run, monkeypatch):
    run = copy_run(finished_run, tmp_path / "run")
    before = (run / "ckpt.pt").read_bytes()
    model, tokenizer, cfg, _ = msd.load_checkpoint(run / "ckpt.pt")

    def half_written(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError, match=r"ckpt\.pt \(.* MB free there\): No space left on device"):
        msd.save_checkpoint(run / "ckpt.pt", model, msd.configure_optimizer(model, cfg), 5, cfg, tokenizer)
    assert sorted(p.name for p in run.iterdir() if "tmp" in p.name) == []
    assert (run / "ckpt.pt").read_bytes() == before


# ---------------------------------------------------------------- 3. a re-run never destroys a run


def test_a_rerun_into_a_used_out_dir_is_refused(tmp_path, finished_run, synth_dir, capsys):
    """The same config again over a finished run: nothing to do, exit 0 (the quick start can run
    twice). Another config, or an unfinished run: refused, nothing touched."""
    run = copy_run(finished_run, tmp_path / "run")
    before = {n: (run / n).read_bytes() for n in ("ckpt.pt", "log.jsonl")}
    argv = ["--config", str(ROOT / "configs" / "tiny.json"), f"--out_dir={run}",
            f"--synth_dir={synth_dir}", "--progress=false", "--max_steps=4"]
    msd.main(argv)                                      # the same finished run: returns, exit 0
    assert "already finished (step 4" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        msd.main(argv + ["--lr=0.002"])                 # another config
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "already holds a run (of another config" in err and "--resume" in err and "--overwrite" in err
    assert {n: (run / n).read_bytes() for n in before} == before
    msd.pretrain(cfg_for(tmp_path / "half", synth_dir), stop_after=2)  # an unfinished run
    with pytest.raises(FileExistsError, match=r"already holds a run \(unfinished"):
        msd.pretrain(cfg_for(tmp_path / "half", synth_dir))
    msd.main(argv + ["--overwrite", "--max_steps=2"])  # explicitly asked: starts over
    assert msd.read_checkpoint(run / "ckpt.pt")["step"] == 2


def test_resuming_a_finished_run_writes_nothing(tmp_path, finished_run, synth_dir, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    before = (run / "ckpt.pt").read_bytes()
    msd.pretrain(cfg_for(run, synth_dir), resume=True)
    assert "nothing to do" in capsys.readouterr().out
    assert (run / "ckpt.pt").read_bytes() == before


# ---------------------------------------------------------------- 4. a resumed run is the same run


def test_resume_refuses_a_changed_config_and_lists_the_keys(tmp_path, finished_run, synth_dir):
    run = copy_run(finished_run, tmp_path / "run")
    with pytest.raises(msd.CheckpointError, match=r"batch_size 8 \(checkpoint\) -> 4 \(now\); lr 0.001 \(checkpoint\) -> 0.002 \(now\)"):
        msd.pretrain(cfg_for(run, synth_dir, "--batch_size=4", "--lr=0.002", "--max_steps=6"), resume=True)
    # keys that change neither the model, the optimizer state nor the data order may change
    summary = msd.pretrain(cfg_for(run, synth_dir, "--max_steps=6", "--log_every=3", "--ckpt_every=5",
                                "--teacher_batch=3"), resume=True)
    assert summary["steps"] == 6


def test_resume_truncates_the_log_to_the_checkpoint(tmp_path, synth_dir, monkeypatch):
    """Killed after step 5 with the last checkpoint at step 4: the resumed log holds every step once."""
    out = tmp_path / "run"
    cfg = cfg_for(out, synth_dir, "--ckpt_every=4", "--log_every=1", "--max_steps=7")
    real_step, calls = msd.train_step, []

    def killed_at_step_6(*args, **kw):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_step(*args, **kw)

    monkeypatch.setattr(msd, "train_step", killed_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        msd.pretrain(cfg)
    monkeypatch.setattr(msd, "train_step", real_step)
    assert msd.read_checkpoint(out / "ckpt.pt")["step"] == 4
    msd.pretrain(cfg, resume=True)
    steps = [json.loads(r)["step"] for r in (out / "log.jsonl").read_text().splitlines() if '"loss"' in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7]


# ---------------------------------------------------------------- warm start (init_from)


def test_init_from_starts_from_the_checkpoints_student_exactly(tmp_path, finished_run, synth_dir,
                                                               monkeypatch, capsys):
    source = msd.read_checkpoint(finished_run / "ckpt.pt")
    seen = {}
    real_step = msd.train_step

    def look_before_the_first_step(model, optimizer, *args, **kw):
        if not seen:
            seen["student"] = {k: v.clone() for k, v in model.student.state_dict().items()}
            seen["teacher"] = {k: v.clone() for k, v in model.teacher.state_dict().items()}
            seen["logit_scale"] = model.logit_scale.detach().clone()
            seen["queue"] = (model.image_queue.n_filled, model.text_queue.n_filled)
            seen["optimizer_state"] = len(optimizer.state)
        return real_step(model, optimizer, *args, **kw)

    monkeypatch.setattr(msd, "train_step", look_before_the_first_step)
    out = tmp_path / "warm"
    msd.pretrain(cfg_for(out, synth_dir, f"--init_from={finished_run / 'ckpt.pt'}", "--max_steps=2",
                      "--lr=0.0005", "--seed=7"))
    assert "init_from" in capsys.readouterr().out
    for key, value in seen["student"].items():
        assert torch.equal(value, source["model"][f"student.{key}"]), key
        assert torch.equal(seen["teacher"][key], value), key
    assert torch.equal(seen["logit_scale"], source["model"]["logit_scale"])
    assert seen["queue"] == (0, 0) and seen["optimizer_state"] == 0
    ckpt = msd.read_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == 2 and ckpt["init_from"]["sha256"] == source["sha256"]
    assert ckpt["tokenizer"] == source["tokenizer"]


def test_init_from_refuses_another_architecture_and_non_checkpoints(tmp_path, finished_run, synth_dir):
    with pytest.raises(msd.CheckpointError, match=r"vision_width 32 \(checkpoint\) -> 48 \(now\)"):
        msd.pretrain(cfg_for(tmp_path / "a", synth_dir, f"--init_from={finished_run / 'ckpt.pt'}",
                          "--vision_width=48"))
    manifest = msd.prepare_data(cfg_for(tmp_path / "b", synth_dir))
    with pytest.raises(msd.CheckpointError, match="cannot be read as a checkpoint"):
        msd.pretrain(cfg_for(tmp_path / "b", synth_dir, f"--init_from={manifest}"))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        msd.pretrain(cfg_for(tmp_path / "c", synth_dir, f"--init_from={tmp_path / 'nope.pt'}"))
