"""What evaluate.py writes and reads, and the cases that would otherwise pass silently: --out never
replaces a checkpoint, a log, a manifest, a device, a file it did not write or another task's
results (--force: its own results of another task or protocol); atomic writes leave no temporary
file, even on a full disk; retrieval refuses a pool of one; --task plots draws only the current
checkpoint's evaluations; repeated JSON keys and deep nesting are errors; the feature cache is keyed
by the images' bytes; the efficiency noise warning."""
import errno
import json
import os
import shutil

from pathlib import Path

import pytest
import torch

import data
import evaluate as ev
from test_eval_cli import exits_with_one_line, run_copy
from test_evaluate import cache_path, strict_json


def no_work(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the results path must be checked before anything runs")
    monkeypatch.setattr(ev, "load_for_eval", fail)


# --------------------------------------------------------------------------- --out


def test_out_never_replaces_a_checkpoint_log_manifest_picture_device_or_a_file_of_yours(
        trained, tmp_path, capsys, monkeypatch):
    ckpt = run_copy(trained, tmp_path)
    (ckpt.parent / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image,text,split,study_id,patient_id,view\n")
    picture = tmp_path / "picture.svg"
    ev.Svg(10, 10).write(picture, "a picture of evaluate.py")
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "notes"}')
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    no_work(monkeypatch)
    for target in (ckpt, ckpt.parent / "log.jsonl", manifest, picture, mine):
        before = target.read_bytes()
        for force in ([], ["--force"]):
            err = exits_with_one_line(capsys, ["--task", "zeroshot", "--checkpoint", str(ckpt),
                                               "--out", str(target), *force])
            assert f"--out {target} is not a results file of evaluate.py" in err
            assert "choose another --out" in err and "--force" not in err
        assert target.read_bytes() == before
    err = exits_with_one_line(capsys, ["--task", "zeroshot", "--checkpoint", str(ckpt), "--out", str(fifo)])
    assert f"--out {fifo} is not a regular file" in err
    assert not fifo.is_file() and fifo.exists()                  # still a FIFO


def test_another_tasks_or_protocols_results_need_force(trained, tmp_path, capsys):
    ckpt = run_copy(trained, tmp_path)
    shared = tmp_path / "shared.json"
    base = ["--checkpoint", str(ckpt), "--out", str(shared)]
    ev.main(["--task", "zeroshot", *base])
    first = shared.read_bytes()
    res = strict_json(shared)
    assert res["written_by"] == "evaluate.py" and res["task"] == "zeroshot"
    err = exits_with_one_line(capsys, ["--task", "retrieval", *base])
    assert f"--out {shared} holds evaluate.py's results of --task zeroshot" in err and "--force" in err
    err = exits_with_one_line(capsys, ["--task", "zeroshot", "--prompt-set", "chexpert", *base])
    assert "results of --task zeroshot under another protocol" in err
    assert shared.read_bytes() == first
    ev.main(["--task", "zeroshot", *base])                       # the same task and protocol: a rerun
    ev.main(["--task", "retrieval", "--force", *base])
    assert strict_json(shared)["task"] == "retrieval" and "zeroshot" not in strict_json(shared)


def test_results_written_before_the_mark_are_still_known(tmp_path):
    ablation = tmp_path / "study.json"                           # continued by later calls
    ablation.write_text(json.dumps({"ablation": "a.json", "recorded": {}, "table": {}, "eval": {}}))
    assert ev.replace_problem(ablation, "ablation", {"any": "protocol"}) is None
    old_eval = tmp_path / "zeroshot.json"
    old_eval.write_text(json.dumps({"checkpoint_sha256": "ab", "protocol": {"split": "test"},
                                    "zeroshot": {}}))
    assert ev.results_kind(json.loads(old_eval.read_text())) == ("zeroshot", {"split": "test"})
    assert ev.replace_problem(old_eval, "zeroshot", {"split": "test"}) is None
    assert "another protocol" in ev.replace_problem(old_eval, "zeroshot", {"split": "valid"})


def test_pictures_replace_only_pictures_that_evaluate_drew(tmp_path):
    mine = tmp_path / "plots" / "ablation.svg"
    mine.parent.mkdir()
    mine.write_text('<svg xmlns="http://www.w3.org/2000/svg"><circle r="3"/></svg>')
    with pytest.raises(ValueError, match="not a picture that evaluate.py drew"):
        ev.Svg(10, 10).write(mine, "title")
    assert "circle" in mine.read_text()
    ours = tmp_path / "plots" / "ours.svg"
    ev.Svg(10, 10).write(ours, "first")
    ev.Svg(20, 10).write(ours, "second")                          # its own picture: redrawn
    assert "<title>second</title>" in ours.read_text()


# --------------------------------------------------------------------------- atomic writes


def test_a_full_disk_is_one_line_naming_the_file_and_the_free_space(trained, tmp_path, capsys, monkeypatch):
    ckpt = run_copy(trained, tmp_path)
    real_write_text = Path.write_text

    def full_disk(path, *args, **kwargs):  # the results file's temporary file, as it is written
        if path.name.startswith(".r.json."):
            real_write_text(path, "{")                   # half written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(path, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", full_disk)
    out = tmp_path / "r.json"
    err = exits_with_one_line(capsys, ["--task", "zeroshot", "--checkpoint", str(ckpt), "--out", str(out)],
                              code=1, main=ev.cli)
    assert f"cannot write {out} (" in err and "MB free there): No space left on device" in err
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    monkeypatch.setattr(Path, "write_text", real_write_text)
    # the feature cache: torch.save's RuntimeError on a full disk is a note; the evaluation goes on
    real_save = torch.save

    def cache_full_disk(obj, f, *a, **k):
        if "features_" in str(getattr(f, "name", f)):
            Path(f).write_bytes(b"PK half")
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", cache_full_disk)
    for cached in ckpt.parent.glob("features_*"):
        cached.unlink()
    res = ev.main(["--task", "retrieval", "--no-5x", "--checkpoint", str(ckpt), "--out", str(out)])
    err = capsys.readouterr().err
    assert "note: cannot write the feature cache (cannot write" in err and "MB free there" in err
    assert res["retrieval"]["test"]["i2t"]["R@1"] >= 0
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt.pt"]   # no cache, no temporary file


def test_a_fifo_at_the_feature_caches_path_is_left_as_it_is(trained, tmp_path, capsys):
    ckpt = run_copy(trained, tmp_path)
    fifo = cache_path(ckpt, "test")
    os.mkfifo(fifo)
    res = ev.main(["--task", "retrieval", "--no-5x", "--checkpoint", str(ckpt), "--out", str(tmp_path / "r.json")])
    assert f"{fifo} is not a regular file, left as it is" in capsys.readouterr().err
    assert fifo.exists() and not fifo.is_file() and res["retrieval"]["test"]["n_images"] > 0
    assert not list(ckpt.parent.glob("*.tmp"))


# --------------------------------------------------------------------------- silent cases


def collapsed(trained, tmp_path, column):
    """The tiny set with every test row's `column` set to one value (blank study ids, one text)."""
    rows = [{**r, "image": r["_path"], column: ("" if column == "study_id" else "the same report.")
             if r["split"] == "test" else r[column]}
            for r in data.read_manifest(ev.msd.prepare_data(trained["cfg"]))]
    manifest = tmp_path / column / "manifest.csv"
    data.write_manifest(manifest, rows)
    return manifest


@pytest.mark.parametrize("column", ["study_id", "text"])
def test_retrieval_refuses_a_pool_of_one(trained, tmp_path, capsys, column):
    manifest = collapsed(trained, tmp_path, column)
    n_test = sum(r["split"] == "test" for r in data.read_manifest(manifest))
    with pytest.raises(SystemExit) as e:
        ev.cli(["--task", "retrieval", "--no-5x", "--checkpoint", str(trained["ckpt"]), "--data",
                str(manifest), "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.splitlines()                  # data.py may warn before it
    assert e.value.code == 1 and err[-1].startswith("evaluate.py: error: retrieval on split 'test'")
    err = err[-1]
    assert f"the {n_test} rows of {manifest} in that split have 1 distinct value(s) of column " \
        f"{column!r}" in err
    assert "every recall would be 1" in err and not (tmp_path / "r.json").exists()


def test_plots_draw_only_the_evaluations_of_the_current_checkpoint(trained, tmp_path, capsys):
    ckpt = run_copy(trained, tmp_path)
    ev.main(["--task", "zeroshot", "--checkpoint", str(ckpt)])
    stale = ckpt.parent / "eval" / "zeroshot-old.json"            # an earlier run's, left in the folder
    old = strict_json(ckpt.parent / "eval" / "zeroshot.json")
    stale.write_text(json.dumps({**old, "checkpoint_sha256": "0" * 64}))
    res = ev.main(["--task", "plots", "--checkpoint", str(ckpt)])
    assert sorted(p.name for p in (ckpt.parent / "plots").glob("*.svg")) == ["eval_zeroshot.svg"]
    assert list(res["not_drawn"]) == [str(stale)]
    assert f"note: {stale}: evaluates checkpoint 000000000000, not {ckpt}" in capsys.readouterr().out


def test_repeated_keys_and_deep_nesting_are_errors_naming_the_file(trained, tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text('{"Edema": ["edema"], "Edema": ["oedema"]}')
    with pytest.raises(ValueError, match=rf"prompt file {prompts}: key 'Edema' appears 2 times"):
        ev.load_prompt_set(str(prompts))
    results = tmp_path / "eval.json"
    results.write_text('{"zeroshot": {"multiclass": {"accuracy": 0.5, "accuracy": 0.9}}}')
    with pytest.raises(ValueError, match=rf"{results}: key 'accuracy' appears 2 times"):
        ev.plot_eval(results, tmp_path / "e.svg")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200000 + "]" * 200000)
    err = exits_with_one_line(capsys, ["--task", "zeroshot", "--checkpoint", str(trained["ckpt"]),
                                       "--prompts", str(deep), "--out", str(tmp_path / "z.json")],
                              code=1, main=ev.cli)
    assert f"prompt file {deep}: JSON nested too deeply to read" in err


def test_gloria_records_and_prints_the_prompts_actually_used(trained, tmp_path, capsys):
    res = ev.main(["--task", "zeroshot", "--checkpoint", str(trained["ckpt"]), "--zeroshot-protocol",
                   "gloria", "--prompts-per-class", "100000", "--out", str(tmp_path / "z.json")])
    mc = res["zeroshot"]["multiclass"]
    synth = ev.load_prompt_set("synth")["positive"]
    sizes = [len(synth[c]) for c in mc["classes"]]
    assert mc["protocol"]["prompts_used"] == {"min": min(sizes), "max": max(sizes)}
    out = capsys.readouterr().out
    assert f"100000 prompts per class, seed 6, z-scored per class; {min(sizes)}-{max(sizes)} used" in out
    assert "warning: --prompts-per-class 100000: fewer prompts exist for 5 of 5 classes" in out


def test_feature_cache_key_follows_the_images_bytes_not_their_size_and_time(tmp_path):
    """cp -p (or rsync -t) keeps an image's size and modification time: the key must still change."""
    image, other = tmp_path / "a.png", tmp_path / "b.png"
    image.write_bytes(b"pixels A")
    other.write_bytes(b"pixels B")                                # the same size
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("x")
    cache = ev.FeatureCache(tmp_path / "ckpt.pt", manifest, 32, 14, checkpoint_sha256="0" * 64)
    stat = image.stat()
    _, key = cache.file("test", [{"_path": str(image)}])
    shutil.copy(other, image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))      # what cp -p does
    assert image.stat().st_size == stat.st_size and image.stat().st_mtime_ns == stat.st_mtime_ns
    assert cache.file("test", [{"_path": str(image)}])[1] != key


@pytest.mark.parametrize("device,cuda,count,mps,message", [
    ("cuda", False, 0, False, "no CUDA device"), ("cuda:7", False, 0, False, "no CUDA device"),
    ("cuda:7", True, 1, False, "1 CUDA device(s), cuda:0 to cuda:0"),
    ("mps", False, 0, False, "no MPS device")])
def test_a_device_the_machine_lacks_is_one_line(capsys, monkeypatch, device, cuda, count, mps, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    err = exits_with_one_line(capsys, ["--task", "zeroshot", f"--device={device}"])
    assert f"--device {device}: this machine has {message}" in err


# --------------------------------------------------------------------------- efficiency noise


def test_efficiency_warns_when_the_spread_or_the_load_means_its_ratios_cannot_be_trusted():
    quiet = [{"name": "CLIP", "cv": 0.02}, {"name": "MSD", "cv": 0.09}, {"name": "one repeat", "cv": None}]
    assert ev.noise_warnings(quiet, 0.5, 1.9, cores=2) == []
    noisy = ev.noise_warnings(quiet + [{"name": "MSD no queue", "cv": 0.25}], 0.5, 0.5, cores=2)
    assert len(noisy) == 2
    assert "1 of 4 rows vary by more than 10% between repeats (MSD no queue (25%))" in noisy[0]
    busy = ev.noise_warnings(quiet, 2.5, 1.0, cores=2)
    assert "load average before 2.5 above the 2 cores" in busy[0] and "rerun on an idle machine" in busy[-1]
    assert ev.noise_warnings(quiet, None, None, cores=2) == []          # no load average on this system


def test_a_results_file_from_before_the_mark_is_replaced_by_its_own_task(tmp_path):
    """results/efficiency.json and its kind, written before results_mark: the documented
    command (--task efficiency --out results/efficiency.json) regenerates it; another task may not."""
    old = tmp_path / "efficiency.json"
    old.write_text(json.dumps({"rows": [], "matmul_tflops": 0.1}))
    assert ev.replace_problem(old, "efficiency", {"steps": 5}) is None
    assert "choose another --out" in ev.replace_problem(old, "pixel-probe", {})
