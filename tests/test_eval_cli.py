"""Tests of evaluate.py's command line: where results are written (never over another task's),
option values that make no sense, one line for every user error, and the feature cache's key
(checkpoint SHA-256, images) and its read-only fallback."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import evaluate as ev
import msd
from test_evaluate import FAST, cache_path, strict_json


def run_copy(trained, tmp_path, name="copy"):
    """The trained checkpoint in a folder of its own (its results and caches land there)."""
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(trained["ckpt"], folder / "ckpt.pt")
    return folder / "ckpt.pt"


# --------------------------------------------------------------------------- results files


def test_results_are_never_overwritten_and_record_split_and_protocol(trained, tmp_path, capsys):
    ckpt = run_copy(trained, tmp_path)
    eval_dir = ckpt.parent / "eval"
    ev.main(["--task", "all", "--checkpoint", str(ckpt), *FAST])
    assert f"wrote {eval_dir / 'all.json'}" in capsys.readouterr().out
    ev.main(["--task", "zeroshot", "--checkpoint", str(ckpt)])
    ev.main(["--task", "zeroshot", "--checkpoint", str(ckpt), "--split", "valid", "--no-5x"])
    ev.main(["--task", "zeroshot", "--checkpoint", str(ckpt), "--prompt-set", "chexpert"])
    ev.main(["--task", "zeroshot", "--checkpoint", str(ckpt)])   # a rerun: replaces its own file
    assert sorted(p.name for p in eval_dir.iterdir()) == [
        "all.json", "zeroshot-2.json", "zeroshot.json", "zeroshot_valid.json"]
    everything = strict_json(eval_dir / "all.json")
    assert {"zeroshot", "fewshot", "retrieval"} <= set(everything)  # not replaced by a later task
    assert everything["split"] == "test" and everything["protocol"]["shots"] == [1, 4]
    assert strict_json(eval_dir / "zeroshot_valid.json")["protocol"]["split"] == "valid"
    assert strict_json(eval_dir / "zeroshot-2.json")["protocol"]["prompt_set"] == "chexpert"
    assert strict_json(eval_dir / "zeroshot.json")["protocol"]["prompt_set"] is None
    # an untrained model of the config: a folder named after the config, beside its run
    ev.main(["--task", "zeroshot", "--checkpoint", "random", "--config", str(trained["config"])])
    assert (trained["root"] / "random-tiny" / "eval" / "zeroshot.json").is_file()


def test_default_paths_of_the_benchmarks_are_not_in_results():
    def out(*argv):
        return ev.default_out(ev.build_parser().parse_args(list(argv)))
    assert out("--task", "efficiency") == Path("runs/efficiency/small.json")
    assert out("--task", "pixel-probe", "--data", "datasets/rsna/manifest.csv") == \
        Path("runs/pixel-probe/small_rsna.json")
    assert out("--task", "ablation", "--ablation", "configs/ablation_warm.json",
               "--ablation-dir", "runs/ablation_warm") == Path("runs/ablation_warm/ablation_warm.json")
    assert out("--task", "plots", "--readme-pictures") == Path("runs/plots/readme-pictures.json")
    assert out("--task", "plots", "--checkpoint", "runs/x/ckpt.pt") == Path("runs/x/plots/plots.json")
    assert out("--task", "fewshot", "--checkpoint", "runs/x/ckpt.pt", "--data", "d/chexpert.csv",
               "--label-column", "my label") == Path("runs/x/eval/fewshot_chexpert_my-label.json")


def exits_with_one_line(capsys, argv, code=2, main=ev.main):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code and err.startswith("evaluate.py: error: ") and err.count("\n") == 1, err
    return err


def test_unwritable_results_path_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("the results path must be checked before anything runs")
    monkeypatch.setattr(ev, "load_for_eval", no_work)
    base = ["--task", "zeroshot", "--checkpoint", str(tmp_path / "ckpt.pt")]
    assert "is a folder" in exits_with_one_line(capsys, base + ["--out", str(tmp_path)])
    (tmp_path / "file").write_text("x")
    err = exits_with_one_line(capsys, base + ["--out", str(tmp_path / "file" / "a" / "r.json")])
    assert "is a file, not a folder" in err
    monkeypatch.setattr(ev.os, "access", lambda *a: False)   # a read-only folder (root ignores modes)
    err = exits_with_one_line(capsys, base)
    assert "default results file" in err and "not writable; choose another --out" in err


# --------------------------------------------------------------------------- option values


@pytest.mark.parametrize("bad,names", [
    (["--shots", "0"], "--shots 0"), (["--shots", "1,1"], "none twice"), (["--shots", "a"], "--shots"),
    (["--fractions", "2.0"], "--fractions 2"), (["--fractions", "0"], "--fractions 0"),
    (["--fractions", "0.001"], "whole percent"), (["--fractions", "nan"], "--fractions nan"),
    (["--weight-decays=-1"], "--weight-decays -1"), (["--weight-decays", "inf"], "finite"),
    (["--ks", "0"], "--ks 0"), (["--seeds", "0"], "--seeds 0"), (["--batch-size", "-4"], "--batch-size -4"),
    (["--chunk-size", "0"], "--chunk-size 0"), (["--device", "gpu"], "--device gpu"),
    (["--task", "pixel-probe", "--epochs", "0"], "--epochs 0"),
    (["--task", "efficiency", "--steps", "0"], "--steps 0"),
    (["--task", "efficiency", "--time-budget", "-1"], "--time-budget -1"),
    (["--task", "ablation", "--jobs", "0"], "--jobs 0"),
    (["--task", "zeroshot", "--readme-pictures"], "--readme-pictures is not used by --task zeroshot")])
def test_option_values_that_make_no_sense_are_refused_in_one_line(bad, names, capsys):
    argv = bad if bad[0] == "--task" else ["--task", "fewshot", *bad]
    assert names in exits_with_one_line(capsys, argv)


def test_more_shots_than_the_train_split_has_is_an_error(trained, tmp_path):
    with pytest.raises(ValueError, match=r"--shots 100000: the train split has at most \d+ positives"):
        ev.main(["--task", "fewshot", "--checkpoint", str(trained["ckpt"]), "--out",
                 str(tmp_path / "f.json"), "--shots", "1,100000", "--fractions", "1", "--seeds", "1"])


# --------------------------------------------------------------------------- user errors


def test_missing_checkpoint_says_how_to_train_in_one_line(tmp_path, capsys):
    err = exits_with_one_line(capsys, ["--task", "all", "--checkpoint", str(tmp_path / "ckpt.pt")],
                              code=1, main=ev.cli)
    assert "checkpoint not found" in err and "python msd.py --config" in err
    assert "--checkpoint random" in err
    with pytest.raises(FileNotFoundError):          # --debug: the traceback instead
        ev.cli(["--task", "all", "--checkpoint", str(tmp_path / "ckpt.pt"), "--debug"])


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(trained, tmp_path, capsys, monkeypatch):
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,text\n")             # no split column
    err = exits_with_one_line(capsys, ["--task", "zeroshot", "--checkpoint", str(trained["ckpt"]),
                                       "--data", str(manifest), "--out", str(tmp_path / "r.json")],
                              code=1, main=ev.cli)
    assert "m.csv" in err
    monkeypatch.setitem(ev.TASKS, "zeroshot", lambda *a: len(5))   # a bug: TypeError
    with pytest.raises(TypeError):
        ev.cli(["--task", "zeroshot", "--checkpoint", str(trained["ckpt"]), "--out", str(tmp_path / "r.json")])


# --------------------------------------------------------------------------- feature cache


def counting_encodes(monkeypatch):
    calls, real = [], ev.encode_images
    monkeypatch.setattr(ev, "encode_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_replaced_images_are_not_served_from_the_cache(trained, tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    shutil.copytree(trained["cfg"].synth_dir, data_dir)
    run = ["--task", "retrieval", "--no-5x", "--checkpoint", str(trained["ckpt"]), "--data",
           str(data_dir / "manifest.csv"), "--out", str(tmp_path / "r.json")]
    ev.main(run)
    calls = counting_encodes(monkeypatch)
    ev.main(run)
    assert calls == []                                           # unchanged: from the cache
    rows = [r for r in ev.data.read_manifest(data_dir / "manifest.csv") if r["split"] == "test"]
    for a, b in zip(rows, rows[1:] + rows[:1]):                  # same manifest, other pixels
        shutil.copy(b["_path"], a["_path"] + ".new")
    for r in rows:
        Path(r["_path"] + ".new").replace(r["_path"])
    replaced = ev.main(run)["retrieval"]
    assert calls == [1]                                          # recomputed
    for old in trained["ckpt"].parent.glob("features_test_*.pt"):
        old.unlink()
    assert ev.main(run)["retrieval"] == replaced                 # the numbers of a fresh pass


def other_checkpoint(trained, path):
    """A checkpoint like the trained one with other weights (and its own SHA-256)."""
    ckpt = msd.read_checkpoint(trained["ckpt"])
    ckpt.pop("sha256")
    ckpt["model"]["student.vision_proj.weight"] = -ckpt["model"]["student.vision_proj.weight"]
    ckpt["sha256"] = msd.checkpoint_sha256(ckpt)
    path.parent.mkdir()
    torch.save(ckpt, path)
    return path


def test_cache_copied_from_another_checkpoint_is_recomputed(trained, tmp_path, capsys):
    a = run_copy(trained, tmp_path, "a")
    b = other_checkpoint(trained, tmp_path / "b" / "ckpt.pt")
    ev.main(["--task", "retrieval", "--no-5x", "--checkpoint", str(a), "--out", str(tmp_path / "a.json")])
    shutil.copy(cache_path(a, "test"), cache_path(b, "test"))   # A's features under B's name
    capsys.readouterr()
    model, tokenizer, cfg, ckpt = msd.load_checkpoint(b)
    evaluation = ev.Evaluation(model, tokenizer, cfg, msd.prepare_data(cfg), ckpt["step"], b)
    embed = evaluation.images("test")["embed"]
    assert "its key differs" in capsys.readouterr().err
    fresh = ev.encode_images(model, evaluation.dataset("test"))["embed"]
    assert torch.equal(embed, fresh)
    assert torch.load(cache_path(b, "test"), weights_only=True)["key"] == evaluation.cache.file(
        "test", evaluation.images("test")["rows"])[1]                # rewritten under B's key


def test_read_only_checkpoint_folder_is_evaluated_without_a_cache(trained, tmp_path, monkeypatch, capsys):
    writable = run_copy(trained, tmp_path, "rw")
    read_only = run_copy(trained, tmp_path, "ro")
    expected = ev.main(["--task", "retrieval", "--checkpoint", str(writable), "--out", str(tmp_path / "a.json")])
    real_save = torch.save

    def save(obj, f, *a, **k):                   # what writing into a read-only folder does
        if read_only.parent in Path(f).parents:       # the temporary file beside the cache
            raise PermissionError(13, "Permission denied")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save)
    read_only.parent.chmod(0o555)                # really read-only, unless run as root
    try:
        got = ev.main(["--task", "retrieval", "--checkpoint", str(read_only), "--out", str(tmp_path / "b.json")])
    finally:
        read_only.parent.chmod(0o755)
    assert "cannot write the feature cache" in capsys.readouterr().err
    assert got["retrieval"] == expected["retrieval"]
    assert sorted(p.name for p in read_only.parent.iterdir()) == ["ckpt.pt"]


# --------------------------------------------------------------------------- pictures of a run


def test_task_plots_draws_the_users_own_run_into_its_folder(trained, tmp_path, capsys):
    ckpt = run_copy(trained, tmp_path)
    with pytest.raises(ValueError, match="nothing to draw.*python msd.py.*--readme-pictures"):
        ev.main(["--task", "plots", "--checkpoint", str(ckpt)])
    shutil.copy(trained["ckpt"].parent / "log.jsonl", ckpt.parent / "log.jsonl")
    ev.main(["--task", "all", "--checkpoint", str(ckpt), *FAST])
    res = ev.main(["--task", "plots", "--checkpoint", str(ckpt)])
    plots = ckpt.parent / "plots"
    assert sorted(p.name for p in plots.iterdir()) == ["eval_all.svg", "log.svg", "plots.json"]
    assert res["missing"] == {} and set(res["plots"]) == {str(plots / "eval_all.svg"), str(plots / "log.svg")}
    assert not Path("results/plots/plots.json").exists()
