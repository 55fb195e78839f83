"""Tests for data.py: manifest, report sections, tokenizer, transforms, PairDataset, SynthCXR."""
import csv
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data

N, SIZE, N5X = 40, 64, 4


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A tiny SynthCXR dataset -> (folder, rows)."""
    out = tmp_path_factory.mktemp("synth")
    manifest = data.generate_synthetic(out, n=N, size=SIZE, seed=3, n_per_class_5x=N5X)
    return out, data.read_manifest(manifest)


# ---------------------------------------------------------------- SynthCXR

def test_same_seed_gives_identical_files(synth, tmp_path):
    out, _ = synth
    again = data.generate_synthetic(tmp_path, n=N, size=SIZE, seed=3, n_per_class_5x=N5X).parent
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert len(files) == 2 * (N + 5 * N5X) + 2  # images, reports, manifest.csv, meta.json
    for f in files:
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
    other = data.generate_synthetic(tmp_path / "other", n=N, size=SIZE, seed=4, n_per_class_5x=N5X)
    assert other.read_bytes() != (out / "manifest.csv").read_bytes()


def test_splits_are_patient_disjoint_with_repeat_patients(synth):
    _, rows = synth
    splits = {r["split"] for r in rows}
    assert splits == {"train", "valid", "test", "test_5x"}
    patients = {s: {r["patient_id"] for r in rows if r["split"] == s} for s in splits}
    for a in splits:
        for b in splits - {a}:
            assert not patients[a] & patients[b], (a, b)
    per_patient = {}
    for r in rows:
        per_patient.setdefault(r["patient_id"], []).append(r["study_id"])
    assert any(len(v) == 2 for v in per_patient.values())
    assert len({r["study_id"] for r in rows}) == len(rows) == N + 5 * N5X
    assert sum(r["split"] == "train" for r in rows) > 0.6 * N


def test_5x_set_obeys_exclusivity_rule(synth):
    _, rows = synth
    five = [r for r in rows if r["split"] == "test_5x"]
    others = [c for c in data.LABELS if c not in data.FIVE_CLASSES and c != "No Finding"]
    counts = {c: 0 for c in data.FIVE_CLASSES}
    for r in five:
        positive = [c for c in data.FIVE_CLASSES if r[c] == "1"]
        assert len(positive) == 1 and all(r[c] == "0" for c in data.FIVE_CLASSES if c != positive[0])
        assert all(r[c] == "0" for c in others), r
        counts[positive[0]] += 1
    assert counts == {c: N5X for c in data.FIVE_CLASSES}


# label -> (keyword of a sentence about it, cue words of a negation, cue words of a hedge)
KEYWORDS = {"Atelectasis": r"atelectasis", "Cardiomegaly": r"cardiomegaly|heart|cardiac silhouette",
            "Consolidation": r"consolidation", "Edema": r"edema", "Pleural Effusion": r"effusion",
            "Pneumothorax": r"pneumothorax", "Pneumonia": r"pneumonia", "Lung Lesion": r"nodule",
            "Lung Opacity": r"opacit", "Support Devices": r"tube|catheter|pacemaker"}
NEGATION = r"\bno\b|normal"
HEDGE = r"possibl|cannot be excluded|may reflect|concerning|borderline"


def test_labels_agree_with_report_text(tmp_path):
    manifest = data.generate_synthetic(tmp_path, n=150, size=16, seed=1, n_per_class_5x=0)
    rows = data.read_manifest(manifest)
    assert 0.2 < np.mean([r["No Finding"] == "1" for r in rows]) < 0.6
    for r in rows:
        sentences = re.split(r"(?<=\.)\s+", r["text"].lower())
        for label, keyword in KEYWORDS.items():
            about = [s for s in sentences if re.search(keyword, s)]
            value = r[label]
            if value == "1":
                assert any(not re.search(NEGATION, s) for s in about), (label, r["text"])
            elif value == "0":
                assert any(re.search(NEGATION, s) for s in about), (label, r["text"])
            elif value == "-1":
                assert any(re.search(HEDGE, s) for s in about), (label, r["text"])
            else:
                assert not about, (label, r["text"])
        sick = any(r[c] in ("1", "-1") for c in data.LABELS if c not in ("No Finding", "Support Devices"))
        assert r["No Finding"] == ("" if sick else "1")
    normal = [r["text"] for r in rows if r["findings"] == "normal"]
    assert max(normal.count(t) for t in normal) > 0.2 * len(normal)  # identical normal reports


def _region(img, box):
    x0, x1, y0, y1 = box
    s = img.shape[0]
    return img[int(y0 * s):int(y1 * s), int(x0 * s):int(x1 * s)].astype(np.float64)


# finding spec, region (x0, x1, y0, y1 as image fractions) that must change, sign, untouched region
RIGHT_BASE, LEFT_BASE = (0.6, 0.85, 0.55, 0.78), (0.15, 0.4, 0.55, 0.78)  # image right = patient left
FINDING_CASES = [
    ({"effusion": {"side": "left", "severity": "moderate", "height": 0.33}}, RIGHT_BASE, 10, LEFT_BASE),
    ({"effusion": {"side": "right", "severity": "moderate", "height": 0.33}}, LEFT_BASE, 10, RIGHT_BASE),
    ({"cardiomegaly": {"severity": "severe", "ctr": 0.7}}, (0.25, 0.8, 0.5, 0.72), 5, (0.1, 0.9, 0.0, 0.1)),
    ({"pneumothorax": {"side": "left", "severity": "moderate", "gap": 0.06}}, (0.6, 0.85, 0.12, 0.45), -0.3,
     (0.15, 0.4, 0.12, 0.45)),
    ({"consolidation": {"lobes": ["right lower"]}}, (0.15, 0.45, 0.5, 0.75), 3, (0.55, 0.85, 0.5, 0.75)),
    ({"edema": {"severity": "moderate"}}, (0.25, 0.4, 0.35, 0.6), 10, (0.1, 0.9, 0.0, 0.1)),
    ({"atelectasis": {"side": "left", "severity": "mild"}}, (0.55, 0.85, 0.5, 0.72), 0.3, LEFT_BASE),
    ({"nodule": {"lobe": "left upper", "mm": 25}}, (0.55, 0.85, 0.15, 0.5), 1, (0.15, 0.45, 0.15, 0.5)),
    ({"devices": {"items": ["ett"], "ett_cm": 4}}, (0.44, 0.56, 0.0, 0.2), 1, (0.6, 0.9, 0.3, 0.7)),
]


@pytest.mark.parametrize("findings,box,change,untouched", FINDING_CASES, ids=lambda c: str(c)[:30])
def test_each_finding_changes_pixels_in_its_region(findings, box, change, untouched):
    for seed in range(3):
        before = data.render_study(seed, {}, SIZE, study_seed=seed)
        after = data.render_study(seed, findings, SIZE, study_seed=seed)
        diff = (_region(after, box) - _region(before, box)).mean()
        assert diff > change if change > 0 else diff < change, (seed, diff)
        assert np.abs(_region(after, untouched) - _region(before, untouched)).mean() < 0.5


def test_render_is_deterministic_and_study_seed_varies_pose():
    f = {"effusion": {"side": "bilateral", "severity": "small", "height": 0.1}}
    a = data.render_study(5, f, SIZE, study_seed=1)
    assert a.dtype == np.uint8 and a.shape == (SIZE, SIZE)
    assert np.array_equal(a, data.render_study(5, f, SIZE, study_seed=1))
    assert not np.array_equal(a, data.render_study(5, f, SIZE, study_seed=2))


def test_ensure_synthetic_reuses_matching_data(tmp_path):
    path = data.ensure_synthetic(tmp_path, n=10, size=16, seed=0, n_per_class_5x=1)
    stamp = path.stat().st_mtime_ns
    assert data.ensure_synthetic(tmp_path, n=10, size=16, seed=0, n_per_class_5x=1).stat().st_mtime_ns == stamp
    # other settings: never regenerated in place (another run may be training on it)
    with pytest.raises(FileExistsError, match=r"made with n=10, seed=0; this run asks for n=12, "
                                              r"seed=1\..*another folder \(config key synth_dir"):
        data.ensure_synthetic(tmp_path, n=12, size=16, seed=1, n_per_class_5x=1)
    assert path.stat().st_mtime_ns == stamp and len(data.read_manifest(path)) == 10 + 5
    (tmp_path / "meta.json").unlink()  # an unfinished generation (no meta.json) is redone
    data.ensure_synthetic(tmp_path, n=12, size=16, seed=0, n_per_class_5x=1)
    assert len(data.read_manifest(path)) == 12 + 5


def test_preview_writes_contact_sheet(synth, tmp_path):
    out, _ = synth
    png = data.preview(out, tmp_path / "sheet.png")
    with Image.open(png) as img:
        assert img.width == 6 * 160 and img.height >= 160


def test_command_line_synth_and_preview(tmp_path):
    data.main(["synth", "--out", str(tmp_path), "--n", "6", "--size", "16", "--n-5x", "1"])
    assert len(data.read_manifest(tmp_path / "manifest.csv")) == 6 + 5
    data.main(["preview", str(tmp_path)])
    assert (tmp_path / "preview.png").is_file()


# ---------------------------------------------------------------- report sections

def test_extract_report_text_sections():
    report = ("EXAMINATION: CHEST\nINDICATION: ___ with fever, evaluate for pneumonia.\n\n"
              " FINDINGS: Old findings.\n\nFINDINGS:  Small left\n pleural effusion.\n"
              "IMPRESSION:\n1. Effusion.\n2. No pneumothorax.\nNOTIFICATION: called Dr. ___.\n")
    assert data.extract_report_text(report) == "Small left pleural effusion. 1. Effusion. 2. No pneumothorax."
    assert data.extract_report_text("IMPRESSION: No acute process.") == "No acute process."
    assert data.extract_report_text("FINDINGS AND IMPRESSION: Clear lungs.") == "Clear lungs."
    assert data.extract_report_text("INDICATION: cough.\nCOMPARISON: None.") == ""


# ---------------------------------------------------------------- tokenizer

TEXTS = ["Small left pleural effusion.", "No pleural effusion; 3.5 cm nodule.", "Small right effusion."]


def test_tokenizer_round_trip_truncation_padding_unknown(tmp_path):
    tok = data.Tokenizer.build(TEXTS, min_freq=1, max_len=8)
    assert tok.vocab[:5] == data.SPECIAL_TOKENS and (tok.pad_id, tok.cls_id) == (0, 1)
    assert tok.tokenize("No effusion; 3.5 cm ___.") == ["no", "effusion", ";", "3.5", "cm", "___", "."]
    assert tok.decode(tok.encode(TEXTS[0])) == "small left pleural effusion ."
    ids, mask = tok(["small effusion", "no pleural effusion ; 3.5 cm nodule . small left right"])
    assert ids.shape == mask.shape == (2, 8) and ids.dtype == mask.dtype == torch.long
    assert ids[0].tolist()[:5] == [tok.cls_id, tok.token_to_id["small"], tok.token_to_id["effusion"], tok.sep_id, 0]
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0] and mask[1].sum() == 8
    assert ids[1, -1] == tok.sep_id  # truncated, still closed by [SEP]
    assert tok.encode("pneumothorax")[1] == tok.unk_id
    assert tok.unk_rate(["small pneumothorax"]) == 0.5 and tok.unk_rate([]) == 0.0
    frequent = data.Tokenizer.build(TEXTS, min_freq=2)
    assert "nodule" not in frequent.token_to_id and "effusion" in frequent.token_to_id
    back = data.tokenizer_from_dict(tok.to_dict())      # as a checkpoint stores and restores it
    assert back.to_dict() == tok.to_dict() and torch.equal(back(TEXTS)[0], tok(TEXTS)[0])
    with pytest.raises(TypeError):
        tok("a single string")


# ---------------------------------------------------------------- transforms

def test_transform_shapes_dtypes_and_determinism():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 80), dtype=np.uint8))
    ev = data.ImageTransform(32, train=False)
    x = ev(img)
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, ev(img)) and x.min() >= -1 and x.max() <= 1
    assert (x[0, 0] == -1).all()  # wide image: zero padding above it, normalised (0 - 0.5) / 0.5
    tr = data.ImageTransform(32, train=True)
    with pytest.raises(ValueError):
        tr(img)
    a, b = tr(img, np.random.default_rng(1)), tr(img, np.random.default_rng(1))
    assert a.shape == (1, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, tr(img, np.random.default_rng(2)))


# ---------------------------------------------------------------- PairDataset

def test_pair_dataset_items(synth):
    out, rows = synth
    tok = data.Tokenizer.build([r["text"] for r in rows], max_len=32)
    ds = data.PairDataset(out / "manifest.csv", "train", tok, data.ImageTransform(32, train=True), seed=7)
    image, ids, mask, pair_id, labels = ds[0]
    assert image.shape == (1, 32, 32) and ids.shape == mask.shape == (32,)
    assert pair_id.dtype == torch.long and labels.shape == (14,) and labels.dtype == torch.float32
    studies = sorted({r["study_id"] for r in rows})
    assert int(pair_id) == studies.index(ds.rows[0]["study_id"])
    for k, name in enumerate(data.LABELS):
        raw = ds.rows[0][name]
        assert math.isnan(labels[k]) if raw == "" else labels[k] == float(raw)
    assert torch.equal(ds[0][0], image)  # same (seed, epoch, i) -> same augmentation
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], image)
    assert len(ds) == len(ds.texts) == sum(r["split"] == "train" for r in rows)
    with pytest.raises(ValueError, match="no rows with split"):
        data.PairDataset(out / "manifest.csv", "validate", tok, data.ImageTransform(32, train=False))


# ---------------------------------------------------------------- bad input

def _write(tmp_path, rows, header=("image", "text", "split", "study_id", "patient_id", "view", "Edema")):
    path = tmp_path / "m.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def good_png(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    return "a.png"


def test_missing_column_bad_label_empty_text_missing_image(tmp_path, good_png, capsys):
    path = _write(tmp_path, [[good_png, "ok", "train", "s1", "p1", "PA", "1.0"]], header=("image", "text"))
    with pytest.raises(data.ManifestError, match=r"m\.csv.*missing required column.*split"):
        data.read_manifest(path)
    good = [good_png, "ok", "train", "s1", "p1", "PA", "1.0"]
    cases = [([good_png, "ok", "train", "s2", "p2", "PA", "yes"], r"m\.csv, row 2, column 'Edema'.*'yes'"),
             ([good_png, "  ", "train", "s2", "p2", "PA", ""], r"m\.csv, row 2, column 'text': empty"),
             (["nope.png", "ok", "train", "s2", "p2", "PA", ""], r"m\.csv, row 2, column 'image'.*nope\.png")]
    for bad, message in cases:
        path = _write(tmp_path, [good, bad])
        with pytest.raises(data.ManifestError, match=message):
            data.read_manifest(path)
    path = _write(tmp_path, [good] + [bad for bad, _ in cases])
    rows = data.read_manifest(path, skip_bad=True)
    assert len(rows) == 1 and rows[0]["Edema"] == "1"
    err = capsys.readouterr().err
    assert "skipped 3 rows" in err and "missing image (1)" in err and "bad label value (1)" in err


def test_unreadable_and_truncated_images_name_file_and_row(tmp_path, good_png):
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    big = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:300])
    with pytest.raises(FileNotFoundError, match="gone.png"):
        data.load_image(tmp_path / "gone.png")
    for name in ("junk.png", "cut.png"):
        with pytest.raises(ValueError, match=name):
            data.load_image(tmp_path / name)
    path = _write(tmp_path, [[good_png, "ok", "train", "s1", "p1", "PA", ""],
                             ["cut.png", "ok", "train", "s2", "p2", "PA", "0"]])
    tok = data.Tokenizer.build(["ok"], min_freq=1)
    # the lazy path, when an image breaks after construction (the check at construction: below)
    ds = data.PairDataset(path, "train", tok, data.ImageTransform(16, train=False), check_images=False)
    assert ds[0][0].shape == (1, 16, 16)
    with pytest.raises(ValueError, match=r"m\.csv, row 2: cannot read image .*cut\.png"):
        ds[1]


def test_write_manifest_stores_relative_paths(tmp_path, good_png):
    rows = [{"image": str(tmp_path / good_png), "text": "ok", "split": "train", "study_id": "s1",
             "patient_id": "p1", "view": "PA", "Edema": 1.0, "Cardiomegaly": math.nan, "_row": 5}]
    data.write_manifest(tmp_path / "sub" / "m.csv", rows)
    with open(tmp_path / "sub" / "m.csv") as f:
        back = next(csv.DictReader(f))
    assert back["image"] == "../a.png" and back["Edema"] == "1" and back["Cardiomegaly"] == ""
    assert "_row" not in back and list(back)[:6] == list(data.REQUIRED_COLUMNS)


def test_manifest_not_utf8_bom_and_unknown_split(tmp_path, good_png, capsys):
    header = "image,text,split,study_id,patient_id,view,Edema\n"
    path = tmp_path / "m.csv"
    path.write_bytes((header + f"{good_png},caf\xe9 ok,train,s1,p1,PA,1\n").encode("latin-1"))
    with pytest.raises(data.ManifestError, match=r"m\.csv: not UTF-8 text \(byte \d+, line 2"):
        data.read_manifest(path)
    # Excel's "CSV UTF-8" starts with a byte-order mark: the first column is still 'image'
    path.write_bytes((header + f"{good_png},café ok,train,s1,p1,PA,1\n").encode("utf-8-sig"))
    assert data.read_manifest(path)[0]["image"] == good_png
    # a split outside train / valid / test / test_5x is an error naming row and value, never dropped
    path = _write(tmp_path, [[good_png, "ok", "train", "s1", "p1", "PA", ""],
                             [good_png, "ok", "Train", "s2", "p2", "PA", ""]])
    with pytest.raises(data.ManifestError, match=r"m\.csv, row 2, column 'split': unknown split 'Train'"):
        data.read_manifest(path)
    assert len(data.read_manifest(path, skip_bad=True)) == 1
    assert "unknown split (1)" in capsys.readouterr().err


def _bad_image_manifest(tmp_path, good_png):
    """A manifest whose rows 2-4 point at a truncated PNG, a text file and a truncated JPEG."""
    big = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:300])
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    Image.fromarray(big).save(tmp_path / "full.jpg", quality=95)
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:-200])
    return _write(tmp_path, [[good_png, "ok", "train", "s1", "p1", "PA", ""],
                             ["cut.png", "ok", "train", "s2", "p2", "PA", "0"],
                             ["junk.png", "ok", "train", "s3", "p3", "PA", "0"],
                             ["cut.jpg", "ok", "train", "s4", "p4", "PA", "0"],
                             ["full.jpg", "ok", "train", "s5", "p5", "PA", "0"]])


def test_bad_images_all_reported_at_construction(tmp_path, good_png, capsys):
    path = _bad_image_manifest(tmp_path, good_png)
    tok = data.Tokenizer.build(["ok"], min_freq=1)
    with pytest.raises(data.ManifestError) as e:
        data.PairDataset(path, "train", tok, data.ImageTransform(16, train=False))
    message = str(e.value)
    assert "3 unreadable image(s)" in message
    for row, name in ((2, "cut.png"), (3, "junk.png"), (4, "cut.jpg")):   # all of them, at once
        assert re.search(rf"row {row}: .*{re.escape(name)}", message), message
    assert "full.jpg" not in message and "row 1" not in message
    ds = data.PairDataset(path, "train", tok, data.ImageTransform(16, train=False), skip_bad=True)
    assert [r["_row"] for r in ds.rows] == [1, 5] and len(ds.texts) == len(ds.pair_ids) == 2
    assert "skipped 3 rows of split 'train': unreadable image (3)" in capsys.readouterr().err


def test_image_check_is_paid_once_per_image(tmp_path, good_png, monkeypatch):
    path = _write(tmp_path, [[good_png, "ok", "train", "s1", "p1", "PA", ""]])
    Image.fromarray(np.full((8, 8), 50, np.uint8)).save(tmp_path / "b.png")
    tok = data.Tokenizer.build(["ok"], min_freq=1)
    calls = []
    original = data.check_image
    monkeypatch.setattr(data, "check_image", lambda p: calls.append(Path(p).name) or original(p))
    data.PairDataset(path, "train", tok, data.ImageTransform(16, train=False))
    assert calls == ["a.png"] and (tmp_path / "m.image_check.json").is_file()
    data.PairDataset(path, "train", tok, data.ImageTransform(16, train=False))
    assert calls == ["a.png"]                                  # cached: not checked again
    path = _write(tmp_path, [[good_png, "ok", "train", "s1", "p1", "PA", ""],
                             ["b.png", "ok", "train", "s2", "p2", "PA", ""]])
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")     # a.png rewritten
    os.utime(tmp_path / "a.png", ns=(1, 1))
    data.PairDataset(path, "train", tok, data.ImageTransform(16, train=False))
    assert sorted(calls) == ["a.png", "a.png", "b.png"]        # the changed and the new image only


def test_check_image_cases(tmp_path):
    big = np.random.default_rng(1).integers(0, 256, (40, 40), dtype=np.uint8)
    for fmt in ("PNG", "JPEG", "BMP"):
        Image.fromarray(big).save(tmp_path / f"ok.{fmt.lower()}", format=fmt)
        assert data.check_image(tmp_path / f"ok.{fmt.lower()}") is None
    (tmp_path / "cut.jpeg").write_bytes((tmp_path / "ok.jpeg").read_bytes()[:-100])
    assert "truncated JPEG" in data.check_image(tmp_path / "cut.jpeg")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:-30])
    assert data.check_image(tmp_path / "cut.png") is not None
    (tmp_path / "empty.png").write_bytes(b"")
    assert data.check_image(tmp_path / "empty.png") is not None


def test_report_text_html_is_unescaped_and_tags_dropped():
    report = ("FINDINGS: Heart size normal.<BR>Lungs clear.<br/>Nodule &gt; 5 mm [&lt;XXXX]. "
              "Lucency &amp;gt; 2 cm, score < 3 and <5 mm, A &amp; B.\nIMPRESSION: <b>No</b> acute disease.")
    assert data.extract_report_text(report) == (
        "Heart size normal. Lungs clear. Nodule > 5 mm [<XXXX]. Lucency > 2 cm, score < 3 and <5 mm, "
        "A & B. No acute disease.")
    assert data.extract_report_text("  A chest CT,&nbsp;axial<BR>view. ", sections=False) == \
        "A chest CT, axial view."


def test_truncated_share_counts_cls_and_sep():
    texts = ["one two three", "one two three four", "", "a b c d e f"]   # 3, 4, 6 tokens (+2)
    assert data.truncated_share(texts, 5) == pytest.approx(2 / 3)        # 6 and 8 > 5
    assert data.truncated_share(texts, 6) == pytest.approx(1 / 3)
    assert data.truncated_share(texts, 8) == 0.0
    assert math.isnan(data.truncated_share(["", " "], 8))
    assert data.truncated_share(["a-b"], 4, tokenize=str.split) == 0.0


def test_both_tokenizers_share_one_truncated_share_encode_and_batching():
    """truncated_share is defined once: a tokenizer's is data.truncated_share with keep_empty=True
    (an empty text encodes as [CLS] [SEP] and fits), the module's leaves empty texts out. The
    word-level and WordPiece tokenizers inherit encode, batching and unk_rate from one base."""
    word = data.Tokenizer.build(["a b c d", "a b"], min_freq=1, max_len=5)
    texts = ["a b c d", "a b", ""]                                       # 6, 4, 2 with [CLS] [SEP]
    assert word.truncated_share(texts) == pytest.approx(1 / 3)
    assert data.truncated_share(texts, 5, keep_empty=True) == pytest.approx(1 / 3)
    assert data.truncated_share(texts, 5) == 0.5
    piece = data.WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b"], max_len=5)
    assert piece.truncated_share(texts) == pytest.approx(1 / 3) and piece.unk_rate(["a z"]) == 0.5
    for name in ("encode", "__call__", "unk_rate", "truncated_share", "vocab_size"):
        assert name not in vars(data.Tokenizer) and name not in vars(data.WordPieceTokenizer), name
