"""A run folder's second round of guarantees: one run at a time in a folder (a lock), a resumed
run sees the data it was trained on, every output path is checked before step 1, a finished run
is not an error to ask for again, and every user error is one line without a traceback."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import msd
from test_msd import tiny_run_cfg
from test_runs import cfg_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """The tiny synthetic set of this file (its tests touch image files)."""
    return tmp_path_factory.mktemp("synth_safety") / "synthcxr_tiny"


def cli(*args, cwd, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "msd.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, env=env)


def tiny_args(out, synth, *more):
    return ["--config", ROOT / "configs" / "tiny.json", f"--out_dir={out}", f"--synth_dir={synth}",
            "--progress=false", *more]


# ---------------------------------------------------------------- one run at a time in a folder


def test_a_folder_in_use_is_refused_and_the_lock_is_removed_after_the_run(tmp_path, synth):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.lock").write_text(f"{os.getpid()} {__import__('socket').gethostname()}\n")  # alive
    with pytest.raises(msd.RunLockedError, match=f"in use by another run \\(process {os.getpid()}"):
        msd.pretrain(cfg_for(out, synth))
    assert not (out / "ckpt.pt").exists()
    (out / "run.lock").unlink()
    msd.pretrain(cfg_for(out, synth))
    assert not (out / "run.lock").exists()          # removed when the run ends
    with pytest.raises(msd.NonFiniteError):
        msd.pretrain(cfg_for(out, synth, "--lr=1e6", "--max_steps=6"), overwrite=True)
    assert not (out / "run.lock").exists()          # ... however it ends


def test_a_stale_lock_of_a_dead_process_says_how_to_clear_it(tmp_path, synth):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.lock").write_text(f"{dead.pid} {__import__('socket').gethostname()}\n")
    with pytest.raises(msd.RunLockedError, match="stale lock .* no longer running .* delete"):
        msd.pretrain(cfg_for(out, synth))


def test_two_trainings_started_together_into_one_folder(tmp_path, synth):
    """Exactly one trains; the other is refused in one line; the survivor's files are whole."""
    msd.prepare_data(cfg_for(tmp_path / "x", synth))  # the data exist before the race
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(ROOT / "msd.py"),
            *map(str, tiny_args(out, synth, "--max_steps=20", "--ckpt_every=1", "--log_every=1"))]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path, env=env) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    refused = next(err for code, err in results if code == 1)
    assert "in use by another run" in refused and "Traceback" not in refused
    assert len(refused.strip().splitlines()) == 1
    assert msd.read_checkpoint(out / "ckpt.pt")["step"] == 20
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()
             if '"loss"' in line]  # training records (held-out ones carry valid_loss)
    assert steps == list(range(1, 21))
    assert not list(out.glob("*.tmp")) and not (out / "run.lock").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_leaves_no_lock_and_the_run_resumes(tmp_path, synth):
    msd.prepare_data(cfg_for(tmp_path / "x", synth))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "msd.py"),
                             *map(str, tiny_args(out, synth, "--max_steps=5000", "--ckpt_every=2"))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    deadline = time.time() + 240
    while not (out / "ckpt.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert not (out / "run.lock").exists()
    step = msd.read_checkpoint(out / "ckpt.pt")["step"]
    msd.pretrain(cfg_for(out, synth, f"--max_steps={step + 2}", "--ckpt_every=2"), resume=True)
    assert msd.read_checkpoint(out / "ckpt.pt")["step"] == step + 2


# ---------------------------------------------------------------- the data of a resumed run


def own_manifest(tmp_path, synth):
    """A copy of the tiny synthetic manifest, with absolute image paths, to change under a run."""
    src = msd.prepare_data(cfg_for(tmp_path / "x", synth))
    with open(src, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["image"] = str((src.parent / row["image"]).resolve())
    manifest = tmp_path / "manifest.csv"
    write_rows(manifest, rows)
    return manifest, rows


def write_rows(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_resume_refuses_a_manifest_that_changed(tmp_path, synth):
    manifest, rows = own_manifest(tmp_path, synth)
    out = tmp_path / "run"
    msd.pretrain(cfg_for(out, synth, f"--data={manifest}"), stop_after=2)
    train = [r for r in rows if r["split"] == "train"]
    write_rows(manifest, [r for r in rows if r["split"] != "train"] + train[: 2 * len(train) // 3])
    with pytest.raises(msd.CheckpointError, match="trained on other data .* training rows"):
        msd.pretrain(cfg_for(out, synth, f"--data={manifest}"), resume=True)


def test_resume_refuses_images_replaced_under_the_same_manifest(tmp_path, synth):
    manifest, rows = own_manifest(tmp_path, synth)
    out = tmp_path / "run"
    msd.pretrain(cfg_for(out, synth, f"--data={manifest}"), stop_after=2)
    image = Path(next(r["image"] for r in rows if r["split"] == "train"))
    before = manifest.read_bytes()
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # replaced in place
    assert manifest.read_bytes() == before
    with pytest.raises(msd.CheckpointError, match="the training images"):
        msd.pretrain(cfg_for(out, synth, f"--data={manifest}"), resume=True)


# ---------------------------------------------------------------- paths and values, before step 1


def test_output_paths_are_checked_before_anything_trains(tmp_path, synth):
    out = tmp_path / "run"
    (out / "ckpt.pt").mkdir(parents=True)           # a folder where the checkpoint goes
    with pytest.raises(FileExistsError, match="ckpt.pt exists and is not a file"):
        msd.pretrain(cfg_for(out, synth))
    assert not (out / "log.jsonl").exists()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        msd.pretrain(cfg_for(tmp_path / "a_file", synth))


@pytest.mark.parametrize("override, message", [
    ("--min_lr=0.5", "'min_lr': expected a floor of the schedule <= lr"),
    ("--out_dir=", "'out_dir': expected a folder"),
])
def test_values_that_make_no_sense_are_refused(tmp_path, synth, override, message):
    with pytest.raises(ValueError, match=message):
        tiny_run_cfg(tmp_path / "run", synth, override)


def test_resume_and_evaluate_share_one_rule_for_unknown_config_keys(tmp_path, synth):
    out = tmp_path / "run"
    msd.pretrain(cfg_for(out, synth), stop_after=2)
    import torch
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt.pop("sha256")
    ckpt["config"]["future_key"] = 1
    ckpt["sha256"] = msd.checkpoint_sha256(ckpt)
    torch.save(ckpt, out / "ckpt.pt")
    with pytest.raises(msd.CheckpointError, match="future_key"):
        msd.load_checkpoint(out / "ckpt.pt")
    with pytest.raises(msd.CheckpointError, match="future_key"):
        msd.pretrain(cfg_for(out, synth), resume=True)


def test_a_damaged_log_line_names_the_file_and_line(tmp_path, synth):
    out = tmp_path / "run"
    msd.pretrain(cfg_for(out, synth, "--log_every=1"), stop_after=2)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo\n')
    with pytest.raises(ValueError, match=r"log.jsonl, line 3: not a log record"):
        msd.pretrain(cfg_for(out, synth, "--log_every=1"), resume=True)


def test_a_zero_byte_checkpoint_is_one_clear_line(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"")
    with pytest.raises(msd.CheckpointError, match="cannot be read as a checkpoint"):
        msd.read_checkpoint(tmp_path / "ckpt.pt")


# ---------------------------------------------------------------- the command line


def test_the_quick_start_line_can_run_twice(tmp_path, synth):
    args = tiny_args(tmp_path / "run", synth, "--max_steps=3")
    first, second = cli(*args, cwd=tmp_path), cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0 and "already finished (step 3" in second.stdout


def test_a_run_folder_follows_its_config_name(tmp_path):
    cfg_file = tmp_path / "my_experiment.json"
    cfg_file.write_text(json.dumps({"batch_size": 16}))
    assert msd.load_config(cfg_file).out_dir == "runs/my_experiment"
    assert msd.load_config().out_dir == "runs/default"
    assert msd.load_config(ROOT / "configs" / "small.json").out_dir == "runs/small"


def test_key_value_with_a_space_and_did_you_mean():
    cfg = msd.load_config(None, ["--batch_size", "16", "--lr=0.002", "--amp", "false"])
    assert (cfg.batch_size, cfg.lr, cfg.amp) == (16, 0.002, False)
    with pytest.raises(KeyError, match="did you mean 'batch_size'"):
        msd.load_config(None, ["--batchsize=16"])
    with pytest.raises(ValueError, match="has no value"):
        msd.load_config(None, ["--batch_size"])


@pytest.mark.parametrize("args, code, words", [
    (["--config", "missing.json"], 2, "config file not found"),
    (["--batch_size=-3"], 2, "'batch_size'"),
    (["--data=nowhere.csv", "--out_dir=run"], 1, "manifest not found"),
    (["--resume", "--out_dir=run"], 1, "no checkpoint"),
])
def test_user_errors_are_one_line_without_a_traceback(tmp_path, monkeypatch, capsys, args, code, words):
    """Through main() in this process (the next test runs one case as a real process)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        msd.main(args)
    err = capsys.readouterr().err
    assert exited.value.code == code, err
    assert "Traceback" not in err and words in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("msd.py: error:")
    with pytest.raises(msd.USER_ERRORS, match=words.strip("'")):  # --debug: the error itself, so
        msd.main([*args, "--debug"])                                # its traceback shows


def test_a_user_error_of_a_real_process_is_one_line_and_debug_shows_its_traceback(tmp_path):
    proc = cli("--data=nowhere.csv", "--out_dir=run", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "manifest not found" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("msd.py: error:")
    debug = cli("--data=nowhere.csv", "--out_dir=run", "--debug", cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
