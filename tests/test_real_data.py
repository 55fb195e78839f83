"""Tests of data.py appendix D (`python data.py prepare ...`) and of the image reading real data
needs. Each dataset test writes a miniature copy of the real release layout (real file and
column names, gzipped CSVs, a lateral view, a report without findings, a -1 label, a missing
image, ...) and checks the manifest that `prepare` produces: rows, texts, labels, splits and
the skip counts of its summary."""
import csv
import math
import gzip
import os
import sys
import types
import zlib

import numpy as np
import pytest
from PIL import Image
from pathlib import Path

import data

# --------------------------------------------------------------------------- helpers


def write_csv(path, header, rows, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open if gz else open)(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_image(path, size=(40, 32), value=None, fmt=None):
    """A small grey picture; by default each file name draws another one, so that no two images
    of a miniature share their bytes (the split check compares contents)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    value = 100 + zlib.crc32(path.name.encode()) % 90 if value is None else value
    arr = (np.arange(size[0] * size[1]).reshape(size[1], size[0]) % 97 + value) % 256
    Image.fromarray(arr.astype(np.uint8), "L").save(path, format=fmt)


def read_rows(manifest):
    """The manifest CSV as written (labels normalised to '1' / '0' / '-1' / '')."""
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for name in data.LABELS:
            r[name] = "" if r[name] == "" else str(int(float(r[name])))
    return rows


def by_study(rows):
    return {r["study_id"]: r for r in rows}


def norm(text):
    return " ".join(text.split())


# --------------------------------------------------------------------------- MIMIC-CXR

MIMIC_META = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
              "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
              "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
              "PatientOrientationCodeSequence_CodeMeaning"]
MIMIC_LABEL_COLUMNS = ["subject_id", "study_id"] + data.LABELS   # the CSV's own order

REPORT_FULL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows. The
 cardiomediastinal silhouette is normal.

 IMPRESSION:

 No acute cardiopulmonary process.
"""
REPORT_IMPRESSION_ONLY = """                                 FINAL REPORT
 INDICATION:  ___-year-old with chest pain.

 IMPRESSION:  Mild pulmonary edema, possibly small effusions.
"""
REPORT_FINDINGS_AND_IMPRESSION = """                                 FINAL REPORT
 HISTORY:  Shortness of breath.

 FINDINGS AND IMPRESSION:  Heart size is mildly enlarged. No pneumothorax.
"""
REPORT_NEITHER = """                                 FINAL REPORT
 EXAMINATION:  Chest radiograph.

 INDICATION:  Line placement.

 WET READ: ___ ___ 10:15 AM  Right IJ line tip in the SVC.
"""
REPORT_NUMBERED = """                                 FINAL REPORT
 COMPARISON:  ___.

 IMPRESSION:
 1.  Right lower lobe consolidation.
 2.  Small right pleural effusion.
"""
REPORT_ADDENDUM = """                                 FINAL REPORT
 FINDINGS:  Lungs are clear.

 IMPRESSION:  No pneumonia.

 ADDENDUM:  Findings discussed with Dr. ___ by phone.
"""

# (subject, study, split, [(dicom_id, ViewPosition, write image?)], report or None, labels or None)
MIMIC_STUDIES = [
    ("10000032", "50414267", "train", [("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "PA", True),
                                       ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "LATERAL", True)],
     REPORT_FULL, {"No Finding": "1.0"}),
    ("10000032", "53189527", "train", [("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "AP", True)],
     REPORT_IMPRESSION_ONLY, {"Edema": "1.0", "Pleural Effusion": "-1.0", "Cardiomegaly": "0.0"}),
    ("10000764", "57375967", "validate", [("096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4", "AP", True),
                                          ("b79e55c3-735ce5ac-64412506-cdc9ea79-f1af521f", "PA", True)],
     REPORT_FINDINGS_AND_IMPRESSION, {"Cardiomegaly": "1.0"}),
    ("10000898", "50771383", "test", [("5f1bbd8c-3e2d8f1e-2d6e5c5e-0c7a8c8e-7b1c2d3e", "PA", True)],
     REPORT_NEITHER, {"Support Devices": "1.0"}),
    ("10000898", "54205396", "test", [("6a7e9f30-1b2c3d4e-5f6a7b8c-9d0e1f2a-3b4c5d6e", "PA", True)],
     REPORT_NUMBERED, {"Consolidation": "1.0", "Pleural Effusion": "1.0", "Pneumonia": "-1.0"}),
    ("10000898", "56699142", "test", [("7b8f0a41-2c3d4e5f-6a7b8c9d-0e1f2a3b-4c5d6e7f", "PA", True)],
     REPORT_FULL, {"Edema": "2.0"}),                                     # unreadable label
    ("10000898", "58000001", "test", [("8c9a1b52-3d4e5f6a-7b8c9d0e-1f2a3b4c-5d6e7f8a", "PA", False)],
     REPORT_FULL, {"No Finding": "1.0"}),                                # image not downloaded
    ("10001217", "58913004", "train", [("9dab2c63-4e5f6a7b-8c9d0e1f-2a3b4c5d-6e7f8a9b", "PA", True),
                                       ("aebc3d74-5f6a7b8c-9d0e1f2a-3b4c5d6e-7f8a9b0c", "", True)],
     REPORT_ADDENDUM, None),                                             # absent from chexpert CSV
    ("10001217", "59000002", "train", [("bfcd4e85-6a7b8c9d-0e1f2a3b-4c5d6e7f-8a9b0c1d", "PA", True)],
     None, {"No Finding": "1.0"}),                                       # report missing
]


def make_mimic(root):
    split, meta, labels = [], [], []
    for subject, study, sp, images, report, lab in MIMIC_STUDIES:
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        for dicom, view, exists in images:
            split.append([dicom, study, subject, sp])
            meta.append([dicom, subject, study, "CHEST (PA AND LAT)", view, 3056, 2544, 21800506,
                         213014.531, "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
            if exists:
                write_image(folder / f"{dicom}.jpg", fmt="JPEG")
        if report is not None:
            folder.parent.mkdir(parents=True, exist_ok=True)
            (folder.parent / f"s{study}.txt").write_text(report)
        if lab is not None:
            labels.append([subject, study] + [lab.get(name, "") for name in data.LABELS])
    write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split, gz=True)
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", MIMIC_META, meta, gz=True)
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", MIMIC_LABEL_COLUMNS, labels, gz=True)
    return root


def test_mimic_cxr_manifest(tmp_path):
    root = make_mimic(tmp_path / "mimic")
    summary = data.prepare("mimic-cxr", root, tmp_path / "mimic.csv")
    rows = read_rows(tmp_path / "mimic.csv")
    studies = by_study(rows)
    assert sorted(studies) == ["50414267", "53189527", "54205396", "57375967", "58913004"]
    assert len(rows) == 5
    assert summary["skipped"] == {"lateral view": 1, "other view": 1, "no findings/impression": 1,
                                  "unreadable label": 1, "missing image": 1, "missing report": 1,
                                  "extra image of a study (one per study)": 1}
    assert summary["splits"] == {"train": 3, "valid": 1, "test": 1}
    assert {r["split"] for r in rows if r["patient_id"] == "10000764"} == {"valid"}   # validate -> valid
    # text = findings + impression; not the indication; '___' kept by default
    full = norm(studies["50414267"]["text"])
    assert "no focal consolidation" in full and "No acute cardiopulmonary process." in full
    assert "ascites" not in full and "Chest PA and lateral" not in full
    assert norm(studies["53189527"]["text"]) == "Mild pulmonary edema, possibly small effusions."
    assert "Heart size is mildly enlarged." in studies["57375967"]["text"]
    assert "Small right pleural effusion" in studies["54205396"]["text"]
    assert "discussed" not in studies["58913004"]["text"]
    # the one frontal image per study is the PA (valid/test); labels as released, blank when absent
    assert studies["57375967"]["image"].endswith("b79e55c3-735ce5ac-64412506-cdc9ea79-f1af521f.jpg")
    assert studies["57375967"]["view"] == "PA" and studies["53189527"]["view"] == "AP"
    assert studies["53189527"]["Edema"] == "1" and studies["53189527"]["Pleural Effusion"] == "-1"
    assert studies["53189527"]["Cardiomegaly"] == "0" and studies["53189527"]["Atelectasis"] == ""
    assert all(studies["58913004"][name] == "" for name in data.LABELS)
    # the image column points at the files, relative to the manifest
    for r in data.read_manifest(tmp_path / "mimic.csv"):
        assert os.path.isfile(r["_path"])


def test_mimic_cxr_options(tmp_path):
    root = make_mimic(tmp_path / "mimic")
    summary = data.prepare("mimic-cxr", root, tmp_path / "m.csv", all_views=True, one_per_study="",
                           deid="remove", uncertain="zeros")
    rows = read_rows(tmp_path / "m.csv")
    assert len(rows) == 8 and "lateral view" not in summary["skipped"]
    assert sum(r["study_id"] == "57375967" for r in rows) == 2         # no one-per-study
    assert all("___" not in r["text"] for r in rows)
    r = by_study(rows)["53189527"]
    assert r["Pleural Effusion"] == "0" and r["Atelectasis"] == "0"    # -1 -> 0, blank -> 0


def test_mimic_five_by_n(tmp_path):
    root = make_mimic(tmp_path / "mimic")
    data.prepare("mimic-cxr", root, tmp_path / "m.csv", five_x=1)
    rows = read_rows(tmp_path / "m.csv")
    # the only test study has two positives (Consolidation, Pleural Effusion): nothing qualifies
    assert not [r for r in rows if r["split"] == "test_5x"]


# --------------------------------------------------------------------------- report sections

@pytest.mark.parametrize("report, present, absent", [
    (REPORT_FULL, ["no focal consolidation", "No acute cardiopulmonary process."], ["ascites", "TECHNIQUE"]),
    (REPORT_IMPRESSION_ONLY, ["Mild pulmonary edema"], ["chest pain"]),
    (REPORT_FINDINGS_AND_IMPRESSION, ["Heart size is mildly enlarged. No pneumothorax."], ["Shortness"]),
    (REPORT_NUMBERED, ["Right lower lobe consolidation.", "Small right pleural effusion."], ["COMPARISON"]),
    (REPORT_ADDENDUM, ["Lungs are clear.", "No pneumonia."], ["discussed", "ADDENDUM"]),
    ("FINDINGS: Old text.\nIMPRESSION: Old impression.\n\nADDENDUM: revised.\n\nIMPRESSION: New impression.\n",
     ["New impression."], ["Old impression."]),                       # last occurrence wins
    (" IMPRESSION: Normal chest.\n\n NOTIFICATION: Discussed with Dr. ___ at 5pm.\n",
     ["Normal chest."], ["Discussed"]),
])
def test_report_sections(report, present, absent):
    text = norm(data.extract_report_text(report))
    for p in present:
        assert p in text
    for a in absent:
        assert a not in text


def test_report_without_sections_is_empty():
    assert data.extract_report_text(REPORT_NEITHER) == ""


# --------------------------------------------------------------------------- CheXpert

CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding",
                    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
                    "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]


def chexpert_row(path, labels=None, frontal=True, ap_pa="AP"):
    labels = labels or {}
    return [path, "Female", 68, "Frontal" if frontal else "Lateral", ap_pa if frontal else ""] + \
           [labels.get(c, "") for c in CHEXPERT_COLUMNS[5:]]


def make_chexpert(root, n_patients=20, prefix="CheXpert-v1.0-small"):
    train, valid = [], []
    for i in range(1, n_patients + 1):
        for study in (1, 2):
            rel = f"train/patient{i:05d}/study{study}/view1_frontal.jpg"
            write_image(root / rel, fmt="JPEG")
            train.append(chexpert_row(f"{prefix}/{rel}", {"Cardiomegaly": "1.0" if i % 3 == 0 else "0.0"}))
    # the awkward rows, all of patient00001 study1 .. : a lateral, -1 labels, unreadable, missing
    write_image(root / "train/patient00001/study1/view2_lateral.jpg", fmt="JPEG")
    train.append(chexpert_row(f"{prefix}/train/patient00001/study1/view2_lateral.jpg", frontal=False))
    write_image(root / "train/patient00002/study3/view1_frontal.jpg", fmt="JPEG")
    train.append(chexpert_row(f"{prefix}/train/patient00002/study3/view1_frontal.jpg",
                              {"Atelectasis": "-1.0", "Cardiomegaly": "-1.0", "Fracture": "-1.0",
                               "Pleural Effusion": "1.0"}, ap_pa="PA"))
    train.append(chexpert_row(f"{prefix}/train/patient00003/study3/view1_frontal.jpg", {"Edema": "yes"}))
    train.append(chexpert_row(f"{prefix}/train/patient00004/study3/view1_frontal.jpg"))   # not on disk
    for i in (64541, 64542, 64543):
        rel = f"valid/patient{i}/study1/view1_frontal.jpg"
        write_image(root / rel, fmt="JPEG")
        valid.append(chexpert_row(f"{prefix}/{rel}", {"Edema": "1.0"}))
    write_csv(root / "train.csv", CHEXPERT_COLUMNS, train)
    write_csv(root / "valid.csv", CHEXPERT_COLUMNS, valid)
    return root


@pytest.mark.parametrize("policy, expected", [
    ("ignore", {"Atelectasis": "", "Cardiomegaly": "", "Fracture": "", "Edema": "0"}),
    ("zeros", {"Atelectasis": "0", "Cardiomegaly": "0", "Fracture": "0", "Edema": "0"}),
    ("ones", {"Atelectasis": "1", "Cardiomegaly": "1", "Fracture": "1", "Edema": "0"}),
    ("chexpert", {"Atelectasis": "1", "Cardiomegaly": "0", "Fracture": "", "Edema": "0"}),
])
def test_chexpert_uncertain_policy(tmp_path, policy, expected):
    root = make_chexpert(tmp_path / "CheXpert-v1.0-small")
    data.prepare("chexpert", root, tmp_path / "c.csv", uncertain=policy)
    row = by_study(read_rows(tmp_path / "c.csv"))["patient00002/study3"]
    assert {k: row[k] for k in expected} == expected
    assert row["Pleural Effusion"] == "1" and row["view"] == "PA"


def test_chexpert_manifest_and_patient_split(tmp_path):
    root = make_chexpert(tmp_path / "CheXpert-v1.0-small")
    summary = data.prepare("chexpert", root, tmp_path / "c.csv", uncertain="zeros", valid_frac=0.25, seed=3)
    rows = read_rows(tmp_path / "c.csv")
    assert summary["skipped"] == {"lateral view": 1, "unreadable label": 1, "missing image": 1}
    assert len(rows) == 20 * 2 + 1 + 3
    assert summary["splits"] == {"train": 31, "valid": 10, "test": 3}     # 5 of 20 patients in valid
    patients = {s: {r["patient_id"] for r in rows if r["split"] == s} for s in ("train", "valid", "test")}
    assert not patients["train"] & patients["valid"] and len(patients["valid"]) == 5
    assert patients["test"] == {"patient64541", "patient64542", "patient64543"}   # official valid.csv
    # the dataset folder prefix of Path is replaced by the root
    assert all(os.path.isfile(r["_path"]) for r in data.read_manifest(tmp_path / "c.csv"))
    assert all(r["text"] == "" for r in rows)                                # no reports, no fake text
    # the split is a function of the seed
    data.prepare("chexpert", root, tmp_path / "c2.csv", uncertain="zeros", valid_frac=0.25, seed=3)
    data.prepare("chexpert", root, tmp_path / "c3.csv", uncertain="zeros", valid_frac=0.25, seed=4)
    split = lambda p: {r["image"]: r["split"] for r in read_rows(p)}    # noqa: E731
    assert split(tmp_path / "c.csv") == split(tmp_path / "c2.csv") != split(tmp_path / "c3.csv")


def test_chexpert_needs_explicit_uncertain_policy(tmp_path):
    root = make_chexpert(tmp_path / "CheXpert-v1.0-small", n_patients=2)
    with pytest.raises(ValueError, match="--uncertain"):
        data.prepare("chexpert", root, tmp_path / "c.csv")


def test_labels_only_manifest_reads_but_a_single_empty_text_does_not(tmp_path):
    root = make_chexpert(tmp_path / "CheXpert-v1.0-small", n_patients=2)
    data.prepare("chexpert", root, tmp_path / "c.csv", uncertain="zeros")
    assert len(data.read_manifest(tmp_path / "c.csv")) == 8
    ds = data.PairDataset(tmp_path / "c.csv", "test", data.Tokenizer.build(["x"], min_freq=1),
                          data.ImageTransform(16, train=False))
    assert ds[0][0].shape == (1, 16, 16) and ds[0][4][data.LABELS.index("Edema")] == 1   # evaluable
    rows = read_rows(tmp_path / "c.csv")
    rows[0]["text"] = "A real report."                 # now one text, the others empty: broken
    with open(tmp_path / "bad.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(data.ManifestError, match="text"):
        data.read_manifest(tmp_path / "bad.csv")


# --------------------------------------------------------------------------- CheXpert 5x200

def make_chexpert_5x(root, per_class=6):
    prefix, rows, i = "CheXpert-v1.0", [], 0

    def add(labels, frontal=True, on_disk=True):
        nonlocal i
        i += 1
        rel = f"train/patient{i:05d}/study1/view{1 if frontal else 2}_{'frontal' if frontal else 'lateral'}.jpg"
        if on_disk:
            write_image(root / rel, size=(16, 16), fmt="JPEG")
        rows.append(chexpert_row(f"{prefix}/{rel}", labels, frontal=frontal))

    others = [c for c in CHEXPERT_COLUMNS[5:] if c != "No Finding"]
    for c in data.FIVE_CLASSES:
        for k in range(per_class):
            # exclusive: c = 1; the 12 others 0 or blank (blank counts as 0)
            add({c: "1.0", **{o: "0.0" for o in others[: k + 1] if o != c}})
    add({"Edema": "1.0", "Cardiomegaly": "1.0"})               # two positives
    add({"Edema": "1.0", "Pneumothorax": "-1.0"})              # uncertain elsewhere
    add({"Edema": "1.0", "Support Devices": "1.0"})            # positive outside the five
    add({"Edema": "1.0"}, frontal=False)                       # lateral
    add({"Atelectasis": "1.0"}, on_disk=False)                 # image missing
    add({"No Finding": "1.0"})
    write_csv(root / "train.csv", CHEXPERT_COLUMNS, rows)
    write_csv(root / "valid.csv", CHEXPERT_COLUMNS, [])
    return root


def test_chexpert_5x200(tmp_path):
    root = make_chexpert_5x(tmp_path / "CheXpert-v1.0")
    summary = data.prepare("chexpert-5x200", root, tmp_path / "5x.csv", per_class=3, seed=0)
    rows = read_rows(tmp_path / "5x.csv")
    assert len(rows) == 15 and {r["split"] for r in rows} == {"test_5x"}
    assert summary["skipped"]["lateral view"] == 1 and summary["skipped"]["missing image"] == 1
    others = [n for n in data.LABELS if n != "No Finding"]
    for c in data.FIVE_CLASSES:
        picked = [r for r in rows if r[c] == "1"]
        assert len(picked) == 3
        assert all(r[o] == "0" for r in picked for o in others if o != c)   # blank written as 0
    # the patients to keep out of training, next to the manifest
    excluded = (tmp_path / "5x_exclude_patients.txt").read_text().split()
    assert sorted(excluded) == sorted({r["patient_id"] for r in rows})
    # seeded: same seed, same draw; another seed, another draw
    data.prepare("chexpert-5x200", root, tmp_path / "a.csv", per_class=3, seed=0)
    data.prepare("chexpert-5x200", root, tmp_path / "b.csv", per_class=3, seed=1)
    images = lambda p: sorted(r["image"] for r in read_rows(p))   # noqa: E731
    assert images(tmp_path / "5x.csv") == images(tmp_path / "a.csv") != images(tmp_path / "b.csv")
    # and chexpert --exclude leaves those patients out of training
    summary = data.prepare("chexpert", root, tmp_path / "train.csv", uncertain="zeros",
                           exclude=tmp_path / "5x_exclude_patients.txt")
    assert not {r["patient_id"] for r in read_rows(tmp_path / "train.csv")} & set(excluded)
    assert summary["skipped"]["patient in the exclude list"] == 15


# --------------------------------------------------------------------------- RSNA

RSNA_PATIENTS = [  # patientId, [(x, y, width, height, Target)], image on disk
    ("0004cfab-14fd-4e49-80ba-63a80b6bddd6", [("", "", "", "", "0")], True),
    ("00313ee0-9eaa-42f4-b0ab-c148ed3241cd", [("", "", "", "", "0")], True),
    ("00436515-870c-4b36-a041-de91049b9ab4", [("264.0", "152.0", "213.0", "379.0", "1"),
                                              ("562.0", "152.0", "256.0", "453.0", "1")], True),
    ("00569f44-917d-4c86-a842-81832af98c30", [("", "", "", "", "0")], False),       # missing
    ("00704310-78a8-4b38-8475-49f4573b2dbb", [("323.0", "577.0", "160.0", "104.0", "1")], True),
    ("00aecb01-a116-45a2-956c-08d2fa55433f", [("", "", "", "", "x")], True),        # unreadable
] + [(f"0{i:03d}0000-aaaa-bbbb-cccc-dddddddddddd", [("", "", "", "", str(i % 2))], True) for i in range(14)]


def make_rsna(root):
    rows = []
    for pid, boxes, on_disk in RSNA_PATIENTS:
        rows += [[pid, *box] for box in boxes]
        if on_disk:
            write_image(root / "stage_2_train_images" / f"{pid}.png", size=(24, 24))
    write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)
    return root


def test_rsna_manifest(tmp_path):
    root = make_rsna(tmp_path / "rsna")
    summary = data.prepare("rsna", root, tmp_path / "rsna.csv", seed=0)
    rows = read_rows(tmp_path / "rsna.csv")
    assert summary["skipped"] == {"missing image": 1, "unreadable label": 1}
    assert len(rows) == 18 and len({r["patient_id"] for r in rows}) == 18      # one image per patient
    labels = {r["patient_id"]: r["Pneumonia"] for r in rows}
    assert labels["00436515-870c-4b36-a041-de91049b9ab4"] == "1"               # two boxes, one row
    assert labels["0004cfab-14fd-4e49-80ba-63a80b6bddd6"] == "0"
    assert sum(v == "1" for v in labels.values()) == 2 + 7
    assert all(r["Edema"] == "" for r in rows) and all(r["text"] == "" for r in rows)
    # 70/15/15 (the classification split, the default) of the 20 listed patients (the split
    # ignores which files are on disk), less skipped
    assert all(0 <= n - summary["splits"][s] <= 2 for s, n in {"train": 14, "valid": 3, "test": 3}.items())


def test_rsna_dicom_needs_pydicom(tmp_path, monkeypatch):
    root = make_rsna(tmp_path / "rsna")
    (root / "stage_2_train_images" / "0004cfab-14fd-4e49-80ba-63a80b6bddd6.png").unlink()
    (root / "stage_2_train_images" / "0004cfab-14fd-4e49-80ba-63a80b6bddd6.dcm").write_bytes(
        b"\0" * 128 + b"DICM" + b"\0" * 16)
    monkeypatch.setitem(sys.modules, "pydicom", None)          # "not installed"
    data.prepare("rsna", root, tmp_path / "rsna.csv")          # listing needs no decoding ...
    with pytest.raises(ImportError, match="pydicom"):          # ... reading does
        data.prepare("rsna", root, tmp_path / "rsna2.csv", cache=tmp_path / "cache")


# --------------------------------------------------------------------------- IU X-Ray

IU_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
  <meta type="rr"/>
  <uId id="CXR{uid}"/>
  <pmcId id="{uid}"/>
  <MedlineCitation Owner="Indiana University" Status="supplied">
    <Article PubModel="Electronic">
      <ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle>
      <Abstract>
        <AbstractText Label="COMPARISON">None.</AbstractText>
        <AbstractText Label="INDICATION">Positive TB test</AbstractText>
        {findings}
        {impression}
      </Abstract>
    </Article>
  </MedlineCitation>
  <MeSH><major>normal</major></MeSH>
  {images}
</eCitation>
"""
IU_IMAGE = """<parentImage id="{id}"><figureId>F1</figureId><caption>Xray Chest PA and Lateral</caption>
  <panel type="single"><url>/hadoop/storage/radiology/extract/{id}.jpg</url></panel></parentImage>"""

# uid, findings, impression, [(Kaggle file stem, projection, on disk)]; the OpenI PNG of stem
# '1_IM-0001-3001' is 'CXR1_1_IM-0001-3001.png', of '2_IM-0652-1001' 'CXR2_IM-0652-1001.png'.
IU_REPORTS = [
    ("1", "The cardiac silhouette and mediastinum size are within normal limits. There are no XXXX of a pleural effusion.",
     "Normal chest x-XXXX.", [("1_IM-0001-4001", "Lateral", True), ("1_IM-0001-3001", "Frontal", True)]),
    ("2", "", "No active disease.", [("2_IM-0652-1001", "Frontal", True), ("2_IM-0652-2001", "Lateral", True)]),
    ("3", "", "", [("3_IM-1384-1001", "Frontal", True)]),                                  # no text
    ("4", "Borderline cardiomegaly.", "No acute disease.", [("4_IM-2050-1001", "Frontal", False)]),
    ("5", "Clear lungs.", "Negative.", [("5_IM-2117-2001", "Lateral", True)]),            # lateral only
] + [(str(i), f"Finding number {i}.", "Normal.", [(f"{i}_IM-{i:04d}-1001", "Frontal", True)])
     for i in range(6, 21)]


def xml_id(uid, stem):
    return f"CXR{uid}_{stem if uid == '1' else stem.split('_', 1)[1]}"


def make_iu_xml(root, projections=True):
    for uid, findings, impression, images in IU_REPORTS:
        tag = lambda label, text: f'<AbstractText Label="{label}">{text}</AbstractText>' if text \
            else f'<AbstractText Label="{label}"/>'   # noqa: E731
        xml = IU_XML.format(uid=uid, findings=tag("FINDINGS", findings), impression=tag("IMPRESSION", impression),
                            images="\n  ".join(IU_IMAGE.format(id=xml_id(uid, i)) for i, _, _ in images))
        (root / "ecgen-radiology").mkdir(parents=True, exist_ok=True)
        (root / "ecgen-radiology" / f"{uid}.xml").write_text(xml)
        for i, _, on_disk in images:
            if on_disk:
                write_image(root / "NLMCXR_png" / f"{xml_id(uid, i)}.png")
    if projections:
        write_csv(root / "indiana_projections.csv", ["uid", "filename", "projection"],
                  [[uid, f"{i}.dcm.png", p] for uid, _, _, images in IU_REPORTS for i, p, _ in images])
    return root


def make_iu_kaggle(root):
    reports, projections = [], []
    for uid, findings, impression, images in IU_REPORTS:
        reports.append([uid, "normal", "normal", "Xray Chest PA and Lateral", "Positive TB test, \"screening\"",
                        "None.", findings, impression])
        for i, p, on_disk in images:
            projections.append([uid, f"{i}.dcm.png", p])
            if on_disk:
                write_image(root / "images" / "images_normalized" / f"{i}.dcm.png")
    write_csv(root / "indiana_reports.csv", ["uid", "MeSH", "Problems", "image", "indication", "comparison",
                                             "findings", "impression"], reports)
    write_csv(root / "indiana_projections.csv", ["uid", "filename", "projection"], projections)
    return root


@pytest.mark.parametrize("make", [make_iu_xml, make_iu_kaggle])
def test_iu_xray_manifest(tmp_path, make):
    root = make(tmp_path / "iu")
    summary = data.prepare("iu-xray", root, tmp_path / "iu.csv", seed=0)
    rows = read_rows(tmp_path / "iu.csv")
    assert summary["skipped"] == {"no findings/impression": 1, "missing image": 1, "lateral view": 1}
    studies = by_study(rows)
    assert len(rows) == 17 and "3" not in studies and "4" not in studies and "5" not in studies
    assert "1_IM-0001-3001." in studies["1"]["image"] and studies["1"]["view"] == "FRONTAL"
    text = norm(studies["1"]["text"])
    assert "within normal limits" in text and "Normal chest x-XXXX." in text and "TB" not in text
    assert norm(studies["2"]["text"]) == "No active disease."
    # 70/10/20 of the 20 listed reports, less the 3 skipped
    assert all(0 <= n - summary["splits"][s] <= 3 for s, n in {"train": 14, "valid": 2, "test": 4}.items())
    assert all(r[n] == "" for r in rows for n in data.LABELS)


def test_iu_xray_xml_without_projections_and_deid(tmp_path):
    root = make_iu_xml(tmp_path / "iu", projections=False)
    summary = data.prepare("iu-xray", root, tmp_path / "iu.csv", deid="remove")
    studies = by_study(read_rows(tmp_path / "iu.csv"))
    # no view information: the first listed image is taken and the view left UNKNOWN
    assert studies["1"]["image"].endswith("CXR1_1_IM-0001-4001.png") and studies["1"]["view"] == "UNKNOWN"
    assert "5" in studies and "lateral view" not in summary["skipped"]
    assert "XXXX" not in studies["1"]["text"] and "no of a pleural effusion" in norm(studies["1"]["text"])


# --------------------------------------------------------------------------- ROCO

def make_roco(root):
    lines = {"train": ["ROCO_00002\t Computed tomography of the chest showing a mass.",
                       "ROCO_00003\t Axial CT, arrow: collection.", "ROCO_00004\t ",
                       "ROCO_00005\t Missing image caption."],
             "validation": ["ROCO_10001\t Chest X-ray, PA view.", ""],
             "test": ["ROCO_20001\t MRI of the brain."]}
    for folder, captions in lines.items():
        d = root / "data" / folder / "radiology"
        d.mkdir(parents=True)
        (d / "captions.txt").write_text("\n".join(captions) + "\n")
        for line in captions:
            rid = line.split("\t")[0]
            if rid and rid != "ROCO_00005":
                write_image(d / "images" / f"{rid}.jpg", fmt="JPEG")
    return root


def test_roco_manifest(tmp_path):
    root = make_roco(tmp_path / "roco")
    summary = data.prepare("roco", root, tmp_path / "roco.csv")
    rows = by_study(read_rows(tmp_path / "roco.csv"))
    assert summary["skipped"] == {"empty caption": 1, "missing image": 1}
    assert summary["splits"] == {"train": 2, "valid": 1, "test": 1}
    assert rows["ROCO_00002"]["text"] == "Computed tomography of the chest showing a mass."   # leading space gone
    assert rows["ROCO_10001"]["split"] == "valid"


# --------------------------------------------------------------------------- errors, CLI

@pytest.mark.parametrize("dataset, expected", [
    ("mimic-cxr", "mimic-cxr-2.0.0-split.csv.gz"), ("chexpert", "train.csv"),
    ("chexpert-5x200", "train.csv"), ("rsna", "stage_2_train"), ("iu-xray", "ecgen-radiology"),
    ("roco", "captions.txt"),
])
def test_wrong_root_names_the_missing_file(tmp_path, dataset, expected):
    root = make_roco(tmp_path / "roco") if dataset != "roco" else make_rsna(tmp_path / "rsna")
    with pytest.raises(FileNotFoundError, match=expected) as e:
        data.prepare(dataset, root, tmp_path / "x.csv", **({"uncertain": "zeros"} if dataset == "chexpert" else {}))
    assert str(root) in str(e.value) and not (tmp_path / "x.csv").exists()


def test_wrong_column_is_named(tmp_path):
    root = make_rsna(tmp_path / "rsna")
    write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Label"], [])
    with pytest.raises(data.ManifestError, match="Target"):
        data.prepare("rsna", root, tmp_path / "x.csv")


def test_cli_prepare_prints_summary(tmp_path, capsys, monkeypatch):
    make_roco(tmp_path / "roco")
    monkeypatch.chdir(tmp_path)                                    # relative --root / --out / --cache
    data.main(["prepare", "roco", "--root", "roco", "--out", "manifests/r.csv", "--cache", "cache"])
    out = capsys.readouterr().out
    assert "4 rows written" in out and "empty caption" in out and "missing image" in out
    rows = data.read_manifest(tmp_path / "manifests" / "r.csv")   # paths resolve from the CSV's folder
    assert len(rows) == 4 and all(os.path.isfile(r["_path"]) for r in rows)
    with pytest.raises(SystemExit, match="--uncertain"):           # an option of another dataset
        data.main(["prepare", "roco", "--root", "roco", "--out", "r.csv", "--uncertain", "ones"])


def test_summary_counts_labels_per_split(tmp_path, capsys):
    data.prepare("rsna", make_rsna(tmp_path / "rsna"), tmp_path / "rsna.csv", seed=0)
    out = capsys.readouterr().out
    rows = read_rows(tmp_path / "rsna.csv")
    for split in ("train", "valid", "test"):
        line = next(l for l in out.splitlines() if l.strip().startswith(split))
        assert f"Pneumonia {sum(r['Pneumonia'] == '1' for r in rows if r['split'] == split)}" in line


# --------------------------------------------------------------------------- images and cache

def test_load_image_16bit_png_uses_full_range(tmp_path):
    arr = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)     # 12-bit data in a 16-bit PNG
    Image.fromarray(arr).save(tmp_path / "a.png")
    img = data.load_image(tmp_path / "a.png")
    assert img.mode == "L"
    np.testing.assert_array_equal(np.asarray(img), [[0, 64], [128, 255]])


def test_load_image_8bit_png_and_jpeg(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "a.jpg", fmt="JPEG")
    Image.new("RGB", (8, 8), (200, 200, 200)).save(tmp_path / "rgb.png")
    assert np.array_equal(np.asarray(data.load_image(tmp_path / "a.png")),
                          np.asarray(Image.open(tmp_path / "a.png")))
    assert data.load_image(tmp_path / "a.jpg").size == (40, 32)
    assert data.load_image(tmp_path / "rgb.png").mode == "L"


def test_load_image_downscales_large_images_once(tmp_path, monkeypatch):
    Image.new("L", (1200, 900), 90).save(tmp_path / "big.jpg")
    assert data.load_image(tmp_path / "big.jpg", max_side=300).size == (300, 225)
    monkeypatch.setattr(data, "MAX_IMAGE_SIDE", 600)
    assert data.load_image(tmp_path / "big.jpg").size == (600, 450)
    assert data.load_image(tmp_path / "big.jpg", max_side=0).size == (1200, 900)


def fake_pydicom(pixels, photometric):
    return types.SimpleNamespace(dcmread=lambda path: types.SimpleNamespace(
        pixel_array=pixels, PhotometricInterpretation=photometric))


@pytest.mark.parametrize("photometric, expected", [("MONOCHROME2", [[0, 85], [170, 255]]),
                                                   ("MONOCHROME1", [[255, 170], [85, 0]])])
def test_load_image_dicom(tmp_path, monkeypatch, photometric, expected):
    (tmp_path / "img").write_bytes(b"\0" * 128 + b"DICM")          # no suffix: found by its magic
    monkeypatch.setitem(sys.modules, "pydicom", fake_pydicom(np.array([[0, 1], [2, 3]], np.uint16), photometric))
    img = data.load_image(tmp_path / "img")
    assert img.mode == "L"
    np.testing.assert_array_equal(np.asarray(img), expected)


def test_load_image_dicom_without_pydicom(tmp_path, monkeypatch):
    (tmp_path / "a.dcm").write_bytes(b"\0" * 132)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match="pip install pydicom") as e:
        data.load_image(tmp_path / "a.dcm")
    assert "a.dcm" in str(e.value)


def test_cache_writes_resized_pngs_once(tmp_path):
    root = make_mimic(tmp_path / "mimic")
    big = next(root.rglob("02aa804e-*.jpg"))
    Image.new("L", (400, 300), 50).save(big)
    bad = next(root.rglob("2a2277a9-*.jpg"))
    bad.write_bytes(b"not a jpeg")                                   # corrupt download
    summary = data.prepare("mimic-cxr", root, tmp_path / "m.csv", cache=tmp_path / "cache", cache_size=64)
    assert summary["skipped"]["unreadable image"] == 1 and summary["rows"] == 4
    rows = data.read_manifest(tmp_path / "m.csv")
    for r in rows:
        path = os.path.realpath(r["_path"])
        assert path.startswith(os.path.realpath(tmp_path / "cache")) and path.endswith(".png")
        assert max(Image.open(path).size) <= 64
    cached = tmp_path / "cache" / big.relative_to(root).with_suffix(".png")
    assert Image.open(cached).size == (64, 48)
    stamp = cached.stat().st_mtime_ns
    data.prepare("mimic-cxr", root, tmp_path / "m.csv", cache=tmp_path / "cache", cache_size=64, force=True)
    assert cached.stat().st_mtime_ns == stamp                       # decoded once, not per run


def test_load_image_corrupt_dicom_names_the_file(tmp_path, monkeypatch):
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 132)

    def dcmread(path):
        raise RuntimeError("File is missing DICOM File Meta Information header")
    monkeypatch.setitem(sys.modules, "pydicom", types.SimpleNamespace(dcmread=dcmread))
    with pytest.raises(ValueError, match="bad.dcm"):
        data.load_image(tmp_path / "bad.dcm")


def test_mimic_config_trains_a_few_steps_on_the_prepared_miniature(tmp_path):
    """configs/mimic.json end to end on CPU: prepare the miniature MIMIC layout, train 2 optimizer
    steps. Overridden for CI time only: image size, depth and the micro-batch (the miniature has 3
    training pairs); the paper-scale widths, heads, embed_dim, queue, momentum and alpha stay."""
    import msd
    root = make_mimic(tmp_path / "mimic")
    data.prepare("mimic-cxr", root, tmp_path / "mimic.csv")
    cfg = msd.load_config(Path(__file__).resolve().parent.parent / "configs" / "mimic.json", [
        f"--data={tmp_path / 'mimic.csv'}", f"--out_dir={tmp_path / 'run'}", "--image_size=32",
        "--vision_layers=1", "--text_layers=1", "--batch_size=1", "--accum_steps=2",
        "--max_steps=2", "--warmup_steps=1", "--num_workers=0", "--min_freq=1", "--progress=false"])
    assert (cfg.vision_width, cfg.embed_dim, cfg.queue_size) == (768, 256, 65536)
    summary = msd.pretrain(cfg)
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    model, tokenizer, loaded, ckpt = msd.load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert ckpt["step"] == 2 and int(model.image_queue.filled) == 4


# --------------------------------------------------------------------------- IU X-Ray: the real cases

def test_iu_xray_real_cases(tmp_path, capsys):
    """Miniature OpenI XML files that reproduce what the real release holds: a report that lists
    no image, HTML inside the report (escaped, twice escaped, and as an element), XXXX glued to
    other characters, and images that the projections file does not know."""
    root = make_iu_xml(tmp_path / "iu")
    xml = lambda uid, findings, impression, images: IU_XML.format(   # noqa: E731
        uid=uid, findings=f'<AbstractText Label="FINDINGS">{findings}</AbstractText>',
        impression=f'<AbstractText Label="IMPRESSION">{impression}</AbstractText>',
        images="\n  ".join(IU_IMAGE.format(id=i) for i in images))
    cases = {
        "21": ("Heart normal.", "No disease.", []),                                    # no image listed
        "22": ("Nodule &amp;gt; 5 mm [&amp;lt;XXXX].&lt;BR&gt;Lungs clear.", "Stable.<BR/>Normal.",
               ["CXR22_IM-2222-1001"]),
        "23": ("Stable on 4XXXX at XXXXPM.", "Normal chest x-XXXX. No XXXX, pneumothorax.",
               ["CXR23_IM-2323-1001"]),
        "24": ("Clear lungs.", "Normal.", ["CXR24_IM-2424-2001", "CXR24_IM-2424-1001"]),  # unlisted views
    }
    for uid, (findings, impression, images) in cases.items():
        (root / "ecgen-radiology" / f"{uid}.xml").write_text(xml(uid, findings, impression, images))
        for i in images:
            write_image(root / "NLMCXR_png" / f"{i}.png")
    with open(root / "indiana_projections.csv", "a", newline="") as f:   # 24's images: not in it
        csv.writer(f).writerows([["22", "22_IM-2222-1001.dcm.png", "Frontal"],
                                 ["23", "23_IM-2323-1001.dcm.png", "Frontal"]])
    summary = data.prepare("iu-xray", root, tmp_path / "iu.csv", deid="remove")
    studies = by_study(read_rows(tmp_path / "iu.csv"))
    assert summary["skipped"]["no image listed"] == 1 and "21" not in studies
    assert summary["skipped"]["missing image"] == 1                      # report 4: listed, not on disk
    assert studies["22"]["text"] == "Nodule > 5 mm [<]. Lungs clear. Stable. Normal."
    assert studies["23"]["text"] == "Stable on at. Normal chest. No, pneumothorax."
    # projections file present: view information exists, so only frontal images are taken
    assert "24" not in studies
    assert summary["skipped"]["no frontal view (view unknown: not in indiana_projections.csv)"] == 1
    assert summary["views"] == {"FRONTAL": len(studies)}
    # without it: the first listed image, view UNKNOWN, counted, and the projections file advised
    (root / "indiana_projections.csv").unlink()
    summary = data.prepare("iu-xray", root, tmp_path / "iu2.csv")
    out = capsys.readouterr().out
    studies = by_study(read_rows(tmp_path / "iu2.csv"))
    assert studies["24"]["image"].endswith("CXR24_IM-2424-2001.png") and studies["24"]["view"] == "UNKNOWN"
    assert summary["views"] == {"UNKNOWN": len(studies)}
    assert f"{len(studies)} of {len(studies)} rows have view UNKNOWN" in out and "indiana_projections.csv" in out
    assert any("indiana_projections.csv" in n for n in summary["notes"])


@pytest.mark.parametrize("text, expected", [
    ("Normal chest x-XXXX.", "Normal chest."),
    ("Seen on 4XXXX and 5XXXX at XXXXPM.", "Seen on and at."),
    ("There are no XXXX of a pleural effusion.", "There are no of a pleural effusion."),
    ("___-year-old man. Dr. ___ was called.", "man. Dr. was called."),
    ("EXXXX", ""),
])
def test_deid_remove_leaves_no_fragments(text, expected):
    assert data._deid(text, True) == expected
    assert data._deid(text, False) == text


def test_prepare_prints_the_share_of_truncated_texts(tmp_path, capsys):
    root = make_roco(tmp_path / "roco")
    long = " ".join(["word"] * 60)                                   # 60 tokens + [CLS] + [SEP]
    (root / "data" / "test" / "radiology" / "captions.txt").write_text(f"ROCO_20001\t {long}\n")
    summary = data.prepare("roco", root, tmp_path / "roco.csv")
    # 4 texts, one of 62 tokens: cut short at max_len 48 (and 62 > 48, not > 64)
    assert summary["truncated"] == {48: 0.25, 64: 0.0, 96: 0.0, 128: 0.0}
    assert "48: 25.0%, 64: 0.0%, 96: 0.0%, 128: 0.0%" in capsys.readouterr().out


# --------------------------------------------------------------------------- your own image folder

def write_folder(root, layout):
    """layout: {relative image path: caption or None}."""
    for rel, caption in layout.items():
        write_image(root / rel, size=(12, 10))
        if caption is not None:
            (root / rel).with_suffix(".txt").write_text(caption)
    return root


def test_image_folder_class_folders_seeded_split(tmp_path):
    layout = {f"{c}/{c}{i}.png": f"a {c} &amp; more <b>number</b> {i}" for c in ("cat", "dog") for i in range(10)}
    root = write_folder(tmp_path / "pets", layout)
    (root / "cat" / "readme.md").write_text("x")
    (root / "dog" / "orphan.txt").write_text("a caption without its image")
    (root / "dog" / "nested").mkdir()
    summary = data.prepare("image-folder", root, tmp_path / "a.csv", valid_frac=0.2, test_frac=0.2, seed=1)
    assert summary["skipped"] == {"not an image file": 1, "caption without an image": 1,
                                  "folder inside a class folder (not read)": 1}
    rows = data.read_manifest(tmp_path / "a.csv")
    assert len(rows) == 20 and not set(data.LABELS) & set(rows[0])
    assert by_study(rows)["cat/cat3"]["text"] == "a cat & more number 3"
    for c in ("cat", "dog"):                                          # per class: 6 / 2 / 2
        assert collections_count([r["split"] for r in rows if r["label"] == c]) == {"train": 6, "valid": 2, "test": 2}
    data.prepare("image-folder", root, tmp_path / "b.csv", valid_frac=0.2, test_frac=0.2, seed=1)
    data.prepare("image-folder", root, tmp_path / "c.csv", valid_frac=0.2, test_frac=0.2, seed=2)
    split = lambda p: {r["image"]: r["split"] for r in read_rows_plain(p)}   # noqa: E731
    assert split(tmp_path / "a.csv") == split(tmp_path / "b.csv") != split(tmp_path / "c.csv")


def test_image_folder_split_folders_and_captions(tmp_path):
    layout = {"train/a/1.png": "one", "train/a/2.png": None, "train/b/3.png": "three",
              "val/a/4.png": "four", "val/b/5.png": "five", "test/a/6.jpg": "six", "test/b/7.png": "seven"}
    root = write_folder(tmp_path / "own", layout)
    summary = data.prepare("image-folder", root, tmp_path / "own.csv")
    assert summary["skipped"] == {"no caption": 1} and summary["splits"] == {"train": 2, "valid": 2, "test": 2}
    rows = data.read_manifest(tmp_path / "own.csv")
    assert {(r["split"], r["label"], r["text"]) for r in rows} >= {("valid", "a", "four"), ("test", "b", "seven")}
    # no caption anywhere: a labels-only manifest, for evaluation
    for txt in root.rglob("*.txt"):
        txt.unlink()
    data.prepare("image-folder", root, tmp_path / "bare.csv")
    rows = data.read_manifest(tmp_path / "bare.csv")
    assert len(rows) == 7 and all(r["text"] == "" for r in rows)
    (root / "extra").mkdir()                                          # split and class folders mixed
    with pytest.raises(ValueError, match="mixes split folders"):
        data.prepare("image-folder", root, tmp_path / "x.csv")


def collections_count(values):
    return {v: values.count(v) for v in set(values)}


def read_rows_plain(manifest):
    with open(manifest, newline="") as f:
        return list(csv.DictReader(f))
