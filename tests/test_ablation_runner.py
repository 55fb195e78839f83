"""The ablation runner survives a short session: each finished (run, seed) is recorded in the
results file as it ends, a later call skips every recorded one, a run whose config changed is
set aside (never dropped) and trained again, and --jobs trains runs in parallel processes."""
import json
from pathlib import Path

import pytest

import evaluate as ev
import msd

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"


def write_spec(tmp_path, lr="0.001"):
    spec = {"base": str(TINY), "shared": {"progress": False, "max_steps": 2,
                                          "synth_dir": str(tmp_path / "synth")},
            "seeds": [0, 1], "eval": {"split": "valid", "with_5x": False, "probe": False},
            "reference": "clip_b",
            "runs": {"clip_b": {"method": "clip", "batch_size": 8, "accum_steps": 1},
                     "msd": {"lr": lr}}}
    (tmp_path / "abl.json").write_text(json.dumps(spec))
    return ["--task", "ablation", "--ablation", str(tmp_path / "abl.json"),
            "--ablation-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "abl_out.json")]


def recorded(tmp_path):
    res = json.loads((tmp_path / "abl_out.json").read_text())
    return {(name, seed) for name, seeds in res["recorded"].items() for seed in seeds}, res


def test_each_run_is_recorded_as_it_ends_and_a_rerun_skips_it(tmp_path, monkeypatch):
    args = write_spec(tmp_path)
    real, calls = ev.ablation_job, []

    def dies_after_three(job):
        if len(calls) == 3:
            raise RuntimeError("the session ended")
        calls.append((job["name"], job["cfg"].seed))
        return real(job)
    monkeypatch.setattr(ev, "ablation_job", dies_after_three)
    with pytest.raises(RuntimeError, match="session ended"):
        ev.main(args)
    done, res = recorded(tmp_path)
    # seed by seed: a study stopped half-way has every row at the same number of seeds
    assert done == {("random", "0"), ("clip_b", "0"), ("msd", "0")}   # kept, atomically
    assert list(res["table"]) == ["random", "clip_b", "msd"] and res["table"]["clip_b"]["seeds"] == [0]

    calls.clear()
    monkeypatch.setattr(ev, "ablation_job", lambda job: calls.append((job["name"], job["cfg"].seed)) or real(job))
    ev.main(args)                                       # continues: only what was not recorded
    assert calls == [("random", 1), ("clip_b", 1), ("msd", 1)]
    done, res = recorded(tmp_path)
    assert len(done) == 6 and list(res["table"]) == ["random", "clip_b", "msd"]
    mean, std = res["table"]["msd"]["i2t_R@10"]
    assert 0 <= mean <= 1 and std is not None and std >= 0      # sample std over 2 seeds
    assert "welch_t" in res["table"]["msd"]["vs_reference"]["mean_R@10"]

    monkeypatch.setattr(ev, "ablation_job", lambda job: pytest.fail(f"ran {job['name']} again"))
    ev.main(args)                                       # everything recorded: nothing runs


def test_a_changed_config_is_set_aside_and_trained_again(tmp_path, monkeypatch):
    ev.main(write_spec(tmp_path))
    _, before = recorded(tmp_path)
    args = write_spec(tmp_path, lr="0.002")             # the msd row now asks for another lr
    real, calls = ev.ablation_job, []
    monkeypatch.setattr(ev, "ablation_job", lambda job: calls.append((job["name"], job["cfg"].seed)) or real(job))
    ev.main(args)
    assert calls == [("msd", 0), ("msd", 1)]
    _, after = recorded(tmp_path)
    assert [(s["run"], s["seed"]) for s in after["superseded"]] == [("msd", 0), ("msd", 1)]
    assert after["superseded"][0]["metrics"] == before["recorded"]["msd"]["0"]["metrics"]
    assert after["recorded"]["msd"]["0"]["config"]["lr"] == 0.002


def test_another_protocol_is_refused_rather_than_mixed(tmp_path):
    args = write_spec(tmp_path)
    ev.main(args)
    spec = json.loads((tmp_path / "abl.json").read_text())
    spec["eval"]["split"] = "test"
    (tmp_path / "abl.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="choose another --out"):
        ev.main(args)


def test_two_jobs_train_in_parallel_processes(tmp_path):
    ev.main(write_spec(tmp_path) + ["--jobs", "2"])
    done, res = recorded(tmp_path)
    assert len(done) == 6
    ckpt = msd.read_checkpoint(tmp_path / "runs" / "msd" / "seed1" / "ckpt.pt")
    assert ckpt["step"] == 2 and ckpt["config"]["seed"] == 1


def test_sample_std_and_welch_t():
    assert ev.seed_stats([1.0, 2.0, 3.0]) == (2.0, 1.0)            # ddof = 1
    assert ev.seed_stats([0.5]) == (0.5, None)
    assert ev.welch_t([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 0.0
    assert ev.welch_t([2.0, 3.0, 4.0], [1.0, 2.0, 3.0]) == pytest.approx(1 / (2 / 3) ** 0.5)


def test_report_prints_the_recorded_runs_and_touches_nothing(tmp_path, monkeypatch, capsys):
    args = write_spec(tmp_path)
    monkeypatch.setattr(ev, "ablation_job", lambda job: {"i2t_R@10": 0.5, "t2i_R@10": 0.25, "train_seconds": 1.0})
    ev.main(args)
    before = (tmp_path / "abl_out.json").read_bytes()
    capsys.readouterr()
    monkeypatch.setattr(ev, "ablation_job", lambda job: pytest.fail("--report trained a run"))
    res = ev.main(args + ["--report"])
    assert (tmp_path / "abl_out.json").read_bytes() == before          # written by the runner only
    assert res["report_only"] and res["table"]["msd"]["mean_R@10"][0] == pytest.approx(0.375)
    assert "msd" in capsys.readouterr().out


def test_a_contrast_family_under_an_unknown_name_is_refused(tmp_path):
    """A family the runner does not know ("valid", a typo) would be dropped without a word."""
    args = write_spec(tmp_path)
    spec = json.loads((tmp_path / "abl.json").read_text())
    spec["contrasts"] = {"metric": "mean_R@10", "valid": {"x": {"plus": ["msd"], "minus": ["clip_b"]}}}
    (tmp_path / "abl.json").write_text(json.dumps(spec))
    with pytest.raises(KeyError, match="unknown keys \\['valid'\\] in 'contrasts'"):
        ev.main(args + ["--report"])
