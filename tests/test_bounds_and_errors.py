"""Issue 27, the training side: sizes bounded before anything is allocated, a checkpoint's own
config and tokenizer checked, the device and temperature named, whether vision_weights is set
treated as architecture, a full disk reported in one line with nothing left behind, and only
the project's own error types turned into one-line errors (a real bug keeps its traceback)."""
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import data
import evaluate
import msd

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.json"


def run_cli(script, *args, cwd, preexec=None):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300, preexec_fn=preexec,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(cwd),
                               "PYTHONDONTWRITEBYTECODE": "1"})  # no .pyc cut short by a file limit


@pytest.mark.parametrize("override", ["--queue_size=1000000000", "--max_len=100000000",
                                      "--image_size=100000", "--vision_width=1000000",
                                      "--text_layers=1000000"])
def test_absurd_sizes_are_refused_before_anything_is_allocated(override, monkeypatch):
    monkeypatch.setattr(msd, "memory_free", lambda device=None: 16 * 2**30)  # any machine: 16 GB free
    start = time.perf_counter()
    with pytest.raises(data.InputError, match="needs at least .* GB .* over the limit"):
        msd.load_config(TINY, [override])
    assert time.perf_counter() - start < 1.0           # estimated, not allocated


@pytest.mark.parametrize("kw", [{}, dict(vision_width=48, text_width=96, mlp_ratio=2, vision_layers=3,
                                         text_layers=1, embed_dim=32, image_size=32, patch_size=4,
                                         max_len=20)])
def test_the_parameter_count_is_the_models(kw):
    cfg = msd.Config(**kw)
    with torch.device("meta"):
        model = msd.MSD(cfg, 1000, None, pretrained=False)
    assert msd.parameter_count(cfg, 1000) == sum(p.numel() for p in model.student.parameters())


def test_memory_limit_gb_refuses_and_is_resume_safe():
    with pytest.raises(data.InputError, match="set by memory_limit_gb"):
        msd.load_config(TINY, ["--memory_limit_gb=0.000001"])
    assert "memory_limit_gb" in msd.RESUME_SAFE_KEYS
    assert msd.load_config(TINY, ["--memory_limit_gb=64"]).memory_limit_gb == 64


def test_temperature_outside_the_clamp_range_is_named():
    with pytest.raises(data.InputError, match="'temperature'"):
        msd.load_config(TINY, ["--temperature=1e-300"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:7"])
def test_a_device_this_torch_lacks_is_one_line(device):
    with pytest.raises(data.InputError, match=f"config key 'device': '{device}'"):
        msd.pick_device(device)


def test_whether_vision_weights_is_set_is_architecture():
    saved = asdict(msd.Config(vision_weights="vit.safetensors"))
    assert "vision_weights" in msd.architecture_changes(saved, msd.Config())
    assert not msd.architecture_changes(saved, msd.Config(vision_weights="moved/vit.safetensors"))
    ckpt = {"config": saved, "world_size": 1}
    with pytest.raises(msd.CheckpointError, match="vision_weights"):
        msd.check_resumable(ckpt, msd.Config(), msd.Dist(), "ckpt.pt")


def edited_checkpoint(trained, tmp_path, edit):
    ckpt = torch.load(trained["ckpt"], weights_only=True)
    ckpt.pop("sha256")
    edit(ckpt)
    ckpt["sha256"] = msd.checkpoint_sha256(ckpt)       # anyone can recompute a checksum
    torch.save(ckpt, tmp_path / "ckpt.pt")
    return tmp_path / "ckpt.pt"


def test_a_checkpoint_whose_tokenizer_pads_to_a_billion_is_refused(trained, tmp_path):
    path = edited_checkpoint(trained, tmp_path, lambda c: c["tokenizer"].update(max_len=10**9))
    with pytest.raises(msd.CheckpointError, match="pads to max_len 1000000000"):
        msd.load_checkpoint(path)


def test_a_bad_value_in_a_checkpoint_names_the_file(trained, tmp_path):
    path = edited_checkpoint(trained, tmp_path, lambda c: c["config"].update(vision_width=10**6))
    with pytest.raises(msd.CheckpointError, match=f"{path}: its stored config is refused: .*needs at least"):
        msd.load_checkpoint(path)


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(trained, tmp_path):
    out = tmp_path / "run"

    def small_files():  # 100 kB per file: the synthetic images fit, the checkpoint does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    proc = run_cli("msd.py", "--config", TINY, f"--out_dir={out}", f"--synth_dir={trained['cfg'].synth_dir}",
                   "--progress=false", "--max_steps=1", cwd=tmp_path, preexec=small_files)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot write {out / 'ckpt.pt'} (" in proc.stderr and "MB free there" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl"]


def test_only_user_errors_are_one_line(tmp_path, monkeypatch, capsys):
    """A user error prints one line; a KeyError / TypeError / plain ValueError from a bug keeps
    its traceback, in both command lines."""
    assert msd.USER_ERRORS == (data.InputError, OSError, msd.NonFiniteError, msd.RunLockedError)
    assert issubclass(msd.CheckpointError, data.InputError) and issubclass(data.ManifestError, data.InputError)
    for bug in (KeyError("a bug"), TypeError("a bug"), ValueError("a bug")):
        def raises(*a, **k):
            raise bug
        monkeypatch.setattr(msd, "pretrain", raises)
        with pytest.raises(type(bug)):
            msd.main(["--config", str(TINY), f"--out_dir={tmp_path / 'r'}"])
        monkeypatch.setattr(evaluate, "main", raises)
        with pytest.raises(type(bug)):
            evaluate.cli(["--task", "zeroshot"])
    monkeypatch.setattr(evaluate, "main", lambda argv: (_ for _ in ()).throw(data.InputError("bad\nfile")))
    with pytest.raises(SystemExit):
        evaluate.cli(["--task", "zeroshot"])
    assert capsys.readouterr().err == "evaluate.py: error: bad file\n"


def test_evaluate_refuses_a_huge_random_model_in_one_line(tmp_path):
    cfg = tmp_path / "huge.json"
    cfg.write_text('{"vision_width": 1000000, "vision_heads": 1}')
    proc = run_cli("evaluate.py", "--task", "zeroshot", "--checkpoint", "random", "--config", cfg, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "needs at least" in proc.stderr, proc.stderr


def test_a_config_with_a_key_twice_is_refused(tmp_path):
    path = tmp_path / "twice.json"
    path.write_text('{"batch_size": 16, "lr": 0.001, "batch_size": 64}')
    with pytest.raises(data.InputError, match=r"twice\.json: key 'batch_size' appears 2 times"):
        msd.load_config(path)


@pytest.mark.parametrize("what", ["folder", "device"])
def test_a_folder_or_a_device_is_named_as_such_not_as_missing(tmp_path, what):
    path = tmp_path if what == "folder" else Path("/dev/zero")
    words = "is a folder" if what == "folder" else "is not a regular file"
    with pytest.raises(OSError, match=f"config file {path} {words}"):
        msd.load_config(path)
    with pytest.raises(OSError, match=f"checkpoint {path} {words}"):
        msd.read_checkpoint(path)
    with pytest.raises(OSError, match=f"manifest {path} {words}"):
        msd.prepare_data(msd.Config(data=str(path)))
