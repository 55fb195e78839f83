"""`python data.py prepare csv`: a metadata table of your own -> the manifest, with the traps a
real table holds (missing files, empty notes, CT rows to filter out, one image under two patient
ids, labels with commas, a majority class, PNG and JPEG of mixed sizes); and what it relies on:
every bad row of a manifest reported in one pass (read_manifest, PairDataset, skip_bad,
write_skipped) and the split check by image content (check_split_overlap(contents=True))."""
import csv
import re

import numpy as np
import pytest
from PIL import Image

import data

HEADER = ["patient", "finding", "view", "modality", "file", "notes"]
CSV_OPTIONS = ["--image-column", "file", "--text-column", "notes", "--patient-column", "patient",
               "--label-column", "finding", "--view-column", "view", "--keep", "modality=X-ray"]


def write_image(path, size, seed, fmt="PNG"):
    """Noise of its own seed: no two images share their bytes unless a test copies one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def write_table(path, rows, header=HEADER):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def clean_table(root):
    """12 X-ray rows of 8 patients (PNG and JPEG, three sizes), a majority class, a label with a
    comma, two unlabelled rows, and 2 CT rows (one of them pointing at a missing file)."""
    findings = ["No Finding"] * 6 + ["Effusion, left", "Effusion, left", "Pneumonia", "Edema", "", ""]
    rows = []
    for k, finding in enumerate(findings):
        fmt, suffix = ("JPEG", "jpg") if k % 3 == 0 else ("PNG", "png")
        name = f"img/x{k}.{suffix}"
        write_image(root / name, [(40, 32), (64, 48), (24, 30)][k % 3], seed=k, fmt=fmt)
        rows.append([f"P{k % 8}", finding, "PA" if k % 2 else "AP", "X-ray", name,
                     f"Note {k}: <b>small</b> &amp; stable finding."])
    write_image(root / "img/ct0.png", (32, 32), seed=100)
    rows += [["P0", "Nodule", "AXIAL", "CT", "img/ct0.png", "CT of the chest."],
             ["P9", "Nodule", "AXIAL", "CT", "img/ct_missing.png", "CT, file not downloaded."]]
    return write_table(root / "metadata.csv", rows)


def read_rows(manifest):
    with open(manifest, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_prepare_csv_writes_the_manifest(tmp_path, capsys):
    root = tmp_path / "own"
    clean_table(root)
    data.main(["prepare", "csv", str(root), "--out", str(tmp_path / "m.csv"), *CSV_OPTIONS])
    out = capsys.readouterr().out
    rows = read_rows(tmp_path / "m.csv")
    assert len(rows) == 12 and "left out by --keep" in out and "12 rows written" in out
    assert not any(r["view"] == "AXIAL" for r in rows)                   # the CT rows: filtered
    assert list(rows[0])[:7] == [*data.REQUIRED_COLUMNS, "label"] and "Edema" not in rows[0]
    by_image = {r["image"]: r for r in rows}
    assert by_image["own/img/x6.jpg"]["label"] == "Effusion, left"       # the comma survives
    assert by_image["own/img/x10.png"]["label"] == ""                     # unlabelled: kept
    assert by_image["own/img/x1.png"]["text"] == "Note 1: small & stable finding."
    assert by_image["own/img/x1.png"]["view"] == "PA" and by_image["own/img/x1.png"]["patient_id"] == "P1"
    assert len({r["study_id"] for r in rows}) == 12                       # one study per row
    split_of = {}
    for r in rows:                                                        # patient-disjoint
        assert split_of.setdefault(r["patient_id"], r["split"]) == r["split"]
    assert re.search(r"the most frequent, 'No Finding', is 60% of them", out)   # 6 of 10 labelled
    assert "2 rows without a label are kept" in out and "(no label)" in out
    assert data.written_by_prepare(tmp_path / "m.csv")
    manifest_rows = data.read_manifest(tmp_path / "m.csv")                # reads back whole
    assert len(manifest_rows) == 12
    # the same seed, the same splits; several values of a filtered column; a study column
    data.main(["prepare", "csv", "--root", str(root), "--out", str(tmp_path / "pa.csv"), *CSV_OPTIONS,
               "--keep", "view=PA", "--keep", "view=AP", "--study-column", "view", "--seed", "0"])
    again = read_rows(tmp_path / "pa.csv")
    assert {r["image"]: r["split"] for r in again} == {r["image"]: r["split"] for r in rows}
    assert by_image["own/img/x0.jpg"]["study_id"] == "row1" and \
        {r["image"]: r["study_id"] for r in again}["own/img/x0.jpg"] == "P0/AP"


def test_prepare_csv_image_folder_option_and_column_errors(tmp_path, capsys):
    root = tmp_path / "own"
    clean_table(root)
    meta = root / "metadata.csv"
    moved = tmp_path / "table.csv"
    meta.rename(moved)                                    # --metadata elsewhere, --images = root
    data.main(["prepare", "csv", str(tmp_path), "--metadata", str(moved), "--images", str(root),
               "--out", str(tmp_path / "m.csv"), *CSV_OPTIONS])
    assert len(read_rows(tmp_path / "m.csv")) == 12
    with pytest.raises(SystemExit, match=r"prepare csv: .*table\.csv: no column --text-column 'report'; "
                                         r"the header is \['patient'"):
        data.main(["prepare", "csv", str(tmp_path), "--metadata", str(moved), "--out",
                   str(tmp_path / "x.csv"), *CSV_OPTIONS, "--text-column", "report"])
    with pytest.raises(SystemExit, match=r"--keep 'modality': expected COLUMN=VALUE"):
        data.main(["prepare", "csv", str(tmp_path), "--metadata", str(moved), "--out",
                   str(tmp_path / "x.csv"), *CSV_OPTIONS, "--keep", "modality"])
    with pytest.raises(SystemExit, match=r"does not apply to this dataset"):   # a csv-only option
        data.main(["prepare", "roco", str(tmp_path), "--out", str(tmp_path / "x.csv"), "--keep", "a=b"])
    with pytest.raises(SystemExit, match=r"give the dataset's folder once"):
        data.main(["prepare", "csv", "--out", str(tmp_path / "x.csv")])
    assert not (tmp_path / "x.csv").exists()


def test_a_table_without_any_text_is_a_labels_only_manifest(tmp_path):
    root = tmp_path / "own"
    clean_table(root)
    rows = read_rows(root / "metadata.csv")
    write_table(root / "metadata.csv", [[*list(r.values())[:5], ""] for r in rows])
    data.main(["prepare", "csv", str(root), "--out", str(tmp_path / "m.csv"), *CSV_OPTIONS])
    manifest = data.read_manifest(tmp_path / "m.csv")
    assert len(manifest) == 12 and not any(r["text"] for r in manifest)


def bad_table(root):
    """Rows 1-3 good; then every kind of bad row, and a filtered CT row whose file is missing."""
    for k in range(5):
        write_image(root / f"img/g{k}.png", (32 + k, 30), seed=k)
    full = write_image(root / "img/full.png", (64, 64), seed=50).read_bytes()
    (root / "img/cut.png").write_bytes(full[:300])                       # undecodable
    rows = [["P1", "No Finding", "PA", "X-ray", "img/g0.png", "clear"],
            ["P2", "Edema", "PA", "X-ray", "img/g1.png", "edema"],
            ["P3", "Edema", "PA", "X-ray", "img/g2.png", "edema again"],
            ["P4", "Edema", "PA", "X-ray", "img/gone.png", "missing"],     # row 4: missing image
            ["P5", "Edema", "PA", "X-ray", "img/g3.png", "  "],             # row 5: empty notes
            ["P2", "Edema", "PA", "X-ray", "img/g1.png", "edema"],          # row 6: duplicate of 2
            ["P6", "Edema", "PA", "X-ray", "img/cut.png", "cut"],           # row 7: undecodable
            ["P7", "Edema", "PA", "X-ray", "img/also_gone.jpg", "missing"],  # row 8: missing image
            ["P8", "Edema", "PA", "X-ray"],                                 # row 9: 4 fields
            ["P9", "Nodule", "AXIAL", "CT", "img/ct_gone.png", "CT"],       # row 10: filtered out
            ["", "Edema", "PA", "X-ray", "img/g4.png", "no patient"]]       # row 11: no patient id
    return write_table(root / "metadata.csv", rows)


def test_every_bad_row_is_reported_in_one_pass_and_skip_bad_lists_them(tmp_path, capsys):
    root = tmp_path / "own"
    bad_table(root)
    args = ["prepare", "csv", str(root), "--out", str(tmp_path / "m.csv"), *CSV_OPTIONS]
    with pytest.raises(SystemExit) as e:
        data.main(args)
    message = str(e.value)
    assert "\n" not in message and message.startswith("prepare csv: ")
    assert re.search(r"metadata\.csv: 7 bad row\(s\) of 10 \(2 missing image\(s\), ", message)
    for kind in ("1 empty text(s)", "1 duplicate row(s)", "1 unreadable image(s)",
                 "1 wrong number of fields(s)", "1 empty patient id(s)"):
        assert kind in message, kind
    for row, what in ((4, r"column 'file': file not found: .*gone\.png"), (5, "column 'notes': empty text"),
                      (6, "the same as row 2 in every column"), (7, r"cut\.png"),
                      (8, r"also_gone\.jpg"), (9, "has 4 fields, the header has 6"),
                      (11, "column 'patient': empty patient id")):
        assert re.search(rf"metadata\.csv, row {row}\b[^|]*{what}", message), (row, message)
    assert "row 10" not in message and "ct_gone" not in message           # filtered, not bad
    assert "--skip-bad" in message and not (tmp_path / "m.csv").exists()
    # --skip-bad: the 3 good rows are written, the 7 bad ones counted and listed
    data.main(args + ["--skip-bad"])
    out = capsys.readouterr().out
    assert "3 rows written" in out and re.search(r"skipped\s+2\s+missing image", out)
    assert "listed in" in out and "m_skipped.csv" in out
    listed = read_rows(tmp_path / "m_skipped.csv")
    assert [int(r["row"]) for r in listed] == [4, 5, 6, 7, 8, 9, 11]
    assert [r["image"] for r in listed] == ["img/gone.png", "img/g3.png", "img/g1.png", "img/cut.png",
                                            "img/also_gone.jpg", "", "img/g4.png"]   # as written
    assert listed[0] == {"row": "4", "image": "img/gone.png", "reason": "missing image",
                         "message": listed[0]["message"]} and "gone.png" in listed[0]["message"]
    assert sorted(r["image"] for r in read_rows(tmp_path / "m.csv")) == [
        "own/img/g0.png", "own/img/g1.png", "own/img/g2.png"]


def two_patient_table(root, second_patient, copy=False):
    """Image a.png listed under patient A and again under `second_patient` (or, copy=True, a
    byte-identical copy b.png of it), among 8 other patients' images."""
    write_image(root / "img/a.png", (40, 40), seed=7)
    rows = [["A", "Edema", "PA", "X-ray", "img/a.png", "edema"]]
    if copy:
        (root / "img/b.png").write_bytes((root / "img/a.png").read_bytes())
    rows.append([second_patient, "Edema", "PA", "X-ray", "img/b.png" if copy else "img/a.png",
                 "the same picture, another patient id"])
    for k in range(8):
        write_image(root / f"img/o{k}.png", (30, 30 + k), seed=20 + k)
        rows.append([f"O{k}", "No Finding", "PA", "X-ray", f"img/o{k}.png", f"other {k}"])
    return write_table(root / "metadata.csv", rows)


def seed_splitting(a, b, patients, apart):
    """The first seed whose patient split puts a and b in different splits (apart) or the same."""
    for seed in range(100):
        split_of = data._split_patients(patients, 0.2, 0.2, seed)
        if (split_of[a] != split_of[b]) == apart and "train" in (split_of[a], split_of[b]):
            return seed
    raise AssertionError("no such seed")


@pytest.mark.parametrize("copy", [False, True], ids=["same file", "byte-identical copy"])
def test_one_image_under_two_patients_is_refused_across_splits(tmp_path, copy):
    root = tmp_path / "own"
    two_patient_table(root, "Z", copy)
    patients = ["A", "Z", *(f"O{k}" for k in range(8))]
    args = ["prepare", "csv", str(root), *CSV_OPTIONS, "--valid-frac", "0.2", "--test-frac", "0.2"]
    seed = seed_splitting("A", "Z", patients, apart=True)
    with pytest.raises(SystemExit) as e:
        data.main(args + ["--seed", str(seed), "--out", str(tmp_path / "m.csv")])
    message = str(e.value)
    assert "1 image(s) outside 'train' with the same bytes as an image in 'train'" in message
    name = "b.png" if copy else "a.png"
    assert re.search(r"metadata\.csv row 1 \(.*a\.png, patient A, \w+\) and metadata\.csv row 2 "
                     rf"\(.*{name}, patient Z, \w+\)|metadata\.csv row 2 \(.*{name}, patient Z, \w+\) "
                     r"and metadata\.csv row 1 \(.*a\.png, patient A, \w+\)", message), message
    assert not (tmp_path / "m.csv").exists()
    # drawn into the same split, nothing leaks: written
    seed = seed_splitting("A", "Z", patients, apart=False)
    data.main(args + ["--seed", str(seed), "--out", str(tmp_path / "m.csv")])
    assert len(read_rows(tmp_path / "m.csv")) == 10


def test_prepare_names_its_own_way_out_and_allow_split_overlap_writes_with_a_warning(tmp_path, capsys):
    root = tmp_path / "own"
    two_patient_table(root, "Z")
    patients = ["A", "Z", *(f"O{k}" for k in range(8))]
    seed = seed_splitting("A", "Z", patients, apart=True)
    args = ["prepare", "csv", str(root), *CSV_OPTIONS, "--valid-frac", "0.2", "--test-frac", "0.2",
            "--seed", str(seed), "--out", str(tmp_path / "m.csv")]
    with pytest.raises(SystemExit) as e:
        data.main(args)
    assert "or allow it: data.py prepare --allow-split-overlap" in str(e.value)
    data.main(args + ["--allow-split-overlap"])
    assert len(read_rows(tmp_path / "m.csv")) == 10
    assert "(allowed by allow_split_overlap)" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--allow-split-overlap applies to prepare csv only"):
        data.main(["prepare", "image-folder", str(root), "--out", str(tmp_path / "f.csv"),
                   "--allow-split-overlap"])


def test_files_prepare_writes_beside_the_manifest_never_replace_a_users(tmp_path):
    """<out>_skipped.csv of a user beside a new --out is refused, not replaced; an earlier
    prepare's own list is replaced with --force, and removed when no row is skipped any more."""
    root = tmp_path / "own"
    table = clean_table(root)
    with open(table, "a", newline="", encoding="utf-8") as f:  # an X-ray row whose file is missing
        csv.writer(f).writerow(["P1", "Edema", "PA", "X-ray", "img/gone.png", "not downloaded"])
    mine = tmp_path / "m_skipped.csv"
    mine.write_text("my notes\n")
    args = ["prepare", "csv", str(root), *CSV_OPTIONS, "--out", str(tmp_path / "m.csv")]
    with pytest.raises(SystemExit, match="m_skipped.csv exists beside --out .* never replaced"):
        data.main(args + ["--skip-bad"])
    assert mine.read_text() == "my notes\n" and not (tmp_path / "m.csv").exists()
    mine.unlink()
    data.main(args + ["--skip-bad"])                       # the missing file's row is skipped
    assert "img/gone.png" in mine.read_text()
    table.write_text("".join(table.read_text().splitlines(keepends=True)[:-1]))  # that row removed
    data.main(args + ["--force"])                           # nothing skipped now: its list goes
    assert not mine.exists()


def test_a_file_where_a_cache_would_go_is_left_alone(tmp_path, capsys):
    path = tmp_path / "m.image_sha256.json"
    path.write_text('{"mine": 1}')
    data._write_cache(path, "sha256", {"a.png": [1, 2, "ab"]})
    assert path.read_text() == '{"mine": 1}' and "is not a cache this project wrote" in capsys.readouterr().err
    path.write_text('{"sha256": {"b.png": [1, 2, "cd"]}}')    # our own cache: updated
    data._write_cache(path, "sha256", {"a.png": [1, 2, "ab"]})
    assert data._read_cache(path, "sha256") == {"a.png": [1, 2, "ab"]}


# ------------------------------------------------ the one-pass summary of read_manifest, PairDataset


def write_manifest_csv(path, rows):
    return write_table(path, rows, header=["image", "text", "split", "study_id", "patient_id", "view", "Edema"])


def test_read_manifest_reports_every_bad_row_at_once(tmp_path, capsys):
    write_image(tmp_path / "a.png", (8, 8), seed=1)
    good = ["a.png", "ok", "train", "s1", "p1", "PA", "1"]
    rows = [good,
            ["gone1.png", "ok", "train", "s2", "p2", "PA", ""],       # 2 missing
            ["a.png", "", "train", "s3", "p3", "PA", ""],              # 3 empty text
            good,                                                       # 4 duplicate of 1
            ["a.png", "ok", "train", "s5", "p5", "PA", "yes"],         # 5 bad label
            *[[f"gone{k}.png", "ok", "valid", f"s{k}", f"p{k}", "PA", ""] for k in range(6, 10)]]
    path = write_manifest_csv(tmp_path / "m.csv", rows)
    with pytest.raises(data.ManifestError) as e:
        data.read_manifest(path)
    message = str(e.value)
    assert isinstance(e.value, data.BadRowsError) and "\n" not in message
    assert "8 bad row(s) of 9 (5 missing image(s), 1 empty text(s), 1 duplicate row(s), " \
           "1 bad label value(s))" in message
    for row in (2, 3, 4, 5, 6, 7):
        assert f"m.csv, row {row}" in message, row
    assert "row 8," not in message and "... and 2 more missing image" in message   # 3 quoted a kind
    assert "skip_bad" in message
    skipped = []
    assert [r["_row"] for r in data.read_manifest(path, skip_bad=True, skipped=skipped)] == [1]
    assert "skipped 8 rows: bad label value (1), duplicate row (1), empty text (1), missing image (5)" \
        in capsys.readouterr().err
    data.write_skipped(tmp_path / "skipped_rows.csv", skipped)
    listed = read_rows(tmp_path / "skipped_rows.csv")
    assert [(r["row"], r["image"], r["reason"]) for r in listed[:4]] == [
        ("2", "gone1.png", "missing image"), ("3", "a.png", "empty text"),
        ("4", "a.png", "duplicate row"), ("5", "a.png", "bad label value")]


def test_pair_dataset_reports_manifest_rows_and_unreadable_images_together(tmp_path, capsys):
    write_image(tmp_path / "a.png", (8, 8), seed=1)
    (tmp_path / "cut.png").write_bytes(write_image(tmp_path / "full.png", (64, 64), seed=2).read_bytes()[:300])
    path = write_manifest_csv(tmp_path / "m.csv", [
        ["a.png", "ok", "train", "s1", "p1", "PA", ""],
        ["cut.png", "ok", "train", "s2", "p2", "PA", ""],                # unreadable image
        ["gone.png", "ok", "test", "s3", "p3", "PA", ""]])               # missing, another split
    tok = data.Tokenizer.build(["ok"], min_freq=1)
    with pytest.raises(data.BadRowsError) as e:
        data.PairDataset(path, "train", tok, data.ImageTransform(16, train=False))
    message = str(e.value)
    assert "2 bad row(s) of 3 (1 missing image(s), 1 unreadable image(s))" in message
    assert re.search(r"row 2: .*cut\.png", message) and re.search(r"row 3, column 'image'.*gone\.png", message)
    ds = data.PairDataset(path, "train", tok, data.ImageTransform(16, train=False), skip_bad=True)
    assert [r["_row"] for r in ds.rows] == [1]
    assert [(b.row, b.reason) for b in ds.skipped] == [(3, "missing image"), (2, "unreadable image")]
    err = capsys.readouterr().err
    assert "skipped 1 rows: missing image (1)" in err and "skipped 1 rows of split 'train'" in err


# ------------------------------------------------ leakage by content: check_split_overlap(contents=True)


def content_manifest(tmp_path, same=True):
    """Rows of 4 patients; test's t.png is a byte copy of train's a.png (same=True)."""
    write_image(tmp_path / "a.png", (20, 20), seed=1)
    write_image(tmp_path / "b.png", (20, 20), seed=2)     # the same size as a.png: hashed too
    write_image(tmp_path / "c.png", (21, 20), seed=3)     # a size no other split has: never read
    if same:
        (tmp_path / "t.png").write_bytes((tmp_path / "a.png").read_bytes())
    else:
        write_image(tmp_path / "t.png", (20, 20), seed=4)
    rows = [{"image": str(tmp_path / n), "text": "ok", "split": split, "study_id": f"s{k}",
             "patient_id": f"p{k}", "view": "PA"}
            for k, (n, split) in enumerate([("a.png", "train"), ("b.png", "train"), ("c.png", "train"),
                                             ("t.png", "test")])]
    data.write_manifest(tmp_path / "m.csv", rows, [])
    return tmp_path / "m.csv"


def test_split_check_compares_image_bytes_once(tmp_path, monkeypatch, capsys):
    path = content_manifest(tmp_path)
    rows = data.read_manifest(path)
    data.check_split_overlap(rows, path)                   # ids only: the patients differ
    hashed = []
    original = data.sha256_file
    monkeypatch.setattr(data, "sha256_file", lambda p: hashed.append(p.rsplit("/", 1)[-1]) or original(p))
    with pytest.raises(data.ManifestError, match=r"m\.csv: 1 image\(s\) outside 'train' with the same "
                                                 r"bytes as an image in 'train' .*row 1 \(a\.png, patient p0, "
                                                 r"train\) and row 4 \(t\.png, patient p3, test\).*allow_split_overlap"):
        data.check_split_overlap(rows, path, contents=True)
    assert sorted(hashed) == ["a.png", "b.png", "t.png"]   # c.png's size is only in train
    assert (tmp_path / "m.image_sha256.json").is_file()
    data.check_split_overlap(rows, path, allow=True, contents=True)
    assert "warning: " in capsys.readouterr().err and len(hashed) == 3   # cached: no file read again
    write_image(tmp_path / "t.png", (20, 20), seed=9)                    # t.png changed: read again
    data.check_split_overlap(data.read_manifest(path), path, contents=True)
    assert sorted(hashed) == ["a.png", "b.png", "t.png", "t.png"]


def test_distinct_images_pass_the_content_check(tmp_path):
    path = content_manifest(tmp_path, same=False)
    data.check_split_overlap(data.read_manifest(path), path, contents=True)
