"""Issue 28 through the command lines, as a new user meets it: a metadata table with the traps of
a real one -> `data.py prepare csv` -> `msd.py` (--skip_bad, the held-out check, SIGTERM) ->
`evaluate.py --label-column` (majority class and chance over the classes present). Plus the
invariants the training side adds: the held-out check changes no number of the run, the bar
shows alpha for MSD only."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import msd

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.json"
SMALL_MODEL = ["--image_size=32", "--patch_size=8", "--vision_width=32", "--vision_layers=1",
               "--vision_heads=2", "--text_width=32", "--text_layers=1", "--text_heads=2",
               "--embed_dim=16", "--max_len=24", "--queue_size=16", "--batch_size=4",
               "--accum_steps=2", "--warmup_steps=2", "--min_freq=1", "--progress=false"]


def cli(script, *args, cwd):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def metadata_table(root):
    """60 X-ray rows of 30 patients, 70 % of them one class; notes built from the finding; CT
    rows to filter out; one listed file missing and one empty note (bad rows)."""
    findings = ["No Finding"] * 42 + ["Effusion, left"] * 10 + ["Pneumonia"] * 8
    rows = []
    for k, finding in enumerate(findings):
        name = f"img/x{k}.png"
        pixels = np.random.default_rng(k).integers(0, 256, (36, 40), dtype=np.uint8)
        pixels[:, :20] = {"No Finding": 40, "Effusion, left": 140, "Pneumonia": 230}[finding]
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / name)
        rows.append([f"P{k % 30}", finding, "PA", "X-ray", name, f"study {k}: {finding.lower()} seen."])
    rows[5][5] = "   "                                             # an empty note
    rows.append(["P3", "No Finding", "PA", "X-ray", "img/not_downloaded.png", "missing file"])
    rows.append(["P4", "Nodule", "AXIAL", "CT", "img/ct.png", "a CT row"])
    with open(root / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([["patient", "finding", "view", "modality", "file", "notes"], *rows])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("own")
    metadata_table(tmp / "own")
    args = ["prepare", "csv", tmp / "own", "--out", tmp / "own.csv", "--image-column", "file",
            "--text-column", "notes", "--patient-column", "patient", "--label-column", "finding",
            "--view-column", "view", "--keep", "modality=X-ray", "--valid-frac", "0.2", "--test-frac", "0.3"]
    refused = cli("data.py", *args, cwd=tmp)
    assert refused.returncode != 0 and "2 bad row(s)" in refused.stderr, refused.stderr
    done = cli("data.py", *args, "--skip-bad", cwd=tmp)
    assert done.returncode == 0, done.stderr
    return tmp


def test_prepare_train_evaluate_from_a_metadata_table(prepared):
    tmp = prepared
    run = tmp / "run"
    train = cli("msd.py", "--config", TINY, f"--data={tmp / 'own.csv'}", f"--out_dir={run}",
                *SMALL_MODEL, "--max_steps=12", "--eval_every=4", cwd=tmp)
    assert train.returncode == 0, train.stderr[-2000:]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    heldout = [r for r in records if "valid_loss" in r]
    assert [r["step"] for r in heldout] == [4, 8, 12] and all(0 <= r["valid_R@10"] <= 1 for r in heldout)
    config = tmp / "own_config.json"                  # the run's config, as a file evaluate.py reads
    config.write_text(json.dumps(msd.asdict(msd.load_config(TINY, [f"--data={tmp / 'own.csv'}", *SMALL_MODEL]))))
    floor = cli("evaluate.py", "--task", "zeroshot", "--checkpoint", "random", "--config", config,
                "--label-column", "label", "--out", tmp / "floor.json", cwd=tmp)
    assert floor.returncode == 0, floor.stderr[-2000:]
    ev = cli("evaluate.py", "--task", "zeroshot", "--checkpoint", run / "ckpt.pt",
             "--label-column", "label", "--floor", tmp / "floor.json", cwd=tmp)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "majority" in ev.stdout and "balanced" in ev.stdout and "floor" in ev.stdout, ev.stdout
    assert "chance" in ev.stdout and "0.062" not in ev.stdout           # over the classes present


def test_skip_bad_trains_on_the_good_rows_and_lists_the_others(prepared):
    tmp = prepared
    rows = list(csv.DictReader(open(tmp / "own.csv", newline="")))
    rows[1]["text"] = ""                                            # a bad row, added by hand
    with open(tmp / "edited.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    args = ["--config", TINY, f"--data={tmp / 'edited.csv'}", *SMALL_MODEL, "--max_steps=2"]
    refused = cli("msd.py", *args, f"--out_dir={tmp / 'r1'}", cwd=tmp)
    assert refused.returncode == 1 and "1 empty text(s)" in refused.stderr and "Traceback" not in refused.stderr
    done = cli("msd.py", *args, f"--out_dir={tmp / 'r2'}", "--skip_bad=true", cwd=tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    listed = list(csv.DictReader(open(tmp / "r2" / "skipped_rows.csv", newline="")))
    assert [r["reason"] for r in listed] == ["empty text"] and "skip_bad: 1 bad row" in done.stdout


def test_sigterm_finishes_the_step_and_writes_a_checkpoint(prepared):
    """With the default ckpt_every = 0, SIGTERM still leaves a checkpoint of a whole step, and
    --resume from it ends where an uninterrupted run ends, bit for bit."""
    tmp = prepared
    args = [sys.executable, str(ROOT / "msd.py"), "--config", str(TINY), f"--data={tmp / 'own.csv'}",
            *SMALL_MODEL, "--max_steps=4000", "--log_every=1"]
    out = tmp / "term"
    proc = subprocess.Popen([*args, f"--out_dir={out}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / "log.jsonl").exists() and
                                          len((out / "log.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    step = msd.read_checkpoint(out / "ckpt.pt")["step"]
    assert step >= 3 and f"stopped after step {step}" in stdout and not (out / "run.lock").exists()
    def cfg(folder):  # the same schedule (4,000 steps), both runs stopped 2 steps later
        return msd.load_config(TINY, [f"--data={tmp / 'own.csv'}", *SMALL_MODEL, "--max_steps=4000",
                                      f"--out_dir={folder}"])
    # the bits of a step depend on the thread count (a reduction split over threads adds in
    # another order), so the resumed and the straight run use one thread, as the stopped run did
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        msd.pretrain(cfg(out), resume=True, stop_after=step + 2)
        msd.pretrain(cfg(tmp / "straight"), stop_after=step + 2)
    finally:
        torch.set_num_threads(threads)
    a, b = msd.read_checkpoint(out / "ckpt.pt"), msd.read_checkpoint(tmp / "straight" / "ckpt.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_the_heldout_check_changes_no_number_of_the_run(prepared):
    tmp = prepared
    states = []
    for every in ("0", "1"):
        cfg = msd.load_config(TINY, [f"--data={tmp / 'own.csv'}", *SMALL_MODEL, "--max_steps=4",
                                     f"--eval_every={every}", f"--out_dir={tmp / ('every' + every)}"])
        msd.pretrain(cfg)
        states.append(msd.read_checkpoint(tmp / ("every" + every) / "ckpt.pt")["model"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    log = (tmp / "every1" / "log.jsonl").read_text()
    assert log.count("valid_loss") == 4 and "valid_loss" not in (tmp / "every0" / "log.jsonl").read_text()


class Bar:
    def set_postfix(self, shown):
        self.shown = shown


def test_the_bar_and_the_log_show_alpha_for_msd_only(tmp_path):
    out = {"loss": torch.tensor(1.0), "grad_norm": torch.tensor(1.0), "lr": 1e-3, "alpha": 0.0,
           "tau": torch.tensor(0.07)}
    log = msd.RunLog(tmp_path / "log.jsonl", False, 0, msd.Dist(), echo=False)
    for method, shown in (("msd", True), ("clip", False)):
        bar = Bar()
        model = msd.build_model(msd.Config(method=method, vision_width=16, text_width=16, vision_layers=1,
                                           text_layers=1, vision_heads=2, text_heads=2, embed_dim=8,
                                           image_size=16, max_len=8, queue_size=4), 20)
        last = log.record(out, 1, 0, 10.0, model, msd.Dist(), bar)
        assert ("alpha" in bar.shown) == shown and ("alpha" in last) == shown
    log.close()
    assert ["alpha" in json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [True, False]


def test_evaluate_skip_bad_records_the_rows_it_left_out(prepared):
    tmp = prepared
    rows = list(csv.DictReader(open(tmp / "own.csv", newline="")))
    test_row = next(i for i, r in enumerate(rows) if r["split"] == "test")
    rows[test_row]["image"] = "own/img/not_there.png"               # a test image gone missing
    with open(tmp / "gone.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    config = tmp / "gone_config.json"
    config.write_text(json.dumps(msd.asdict(msd.load_config(TINY, [f"--data={tmp / 'gone.csv'}", *SMALL_MODEL]))))
    args = ["--task", "retrieval", "--checkpoint", "random", "--config", config]
    refused = cli("evaluate.py", *args, "--out", tmp / "r1.json", cwd=tmp)
    assert refused.returncode == 1 and "1 missing image(s)" in refused.stderr, refused.stderr
    done = cli("evaluate.py", *args, "--skip-bad", "--out", tmp / "r2.json", cwd=tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    skipped = json.loads((tmp / "r2.json").read_text())["skipped_rows"]
    assert [r["reason"] for r in skipped] == ["missing image"] and skipped[0]["row"] == test_row + 1
