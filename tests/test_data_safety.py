"""The paths data.py writes, and the bounds and degenerate inputs it refuses (issue 27): a folder
or file that is not the project's is never written over, writes are whole or absent, settings out
of bounds are refused before anything is allocated, and every refusal is one line naming the
file or value and the way out."""
import errno
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

import data

SYNTH = ["--n", "3", "--size", "16", "--n-5x", "0"]


def one_line(e):
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def write_png(path, seed=0, size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size[::-1], dtype=np.uint8)).save(path)
    return path


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ SynthCXR's folder (issue 27)


@pytest.mark.parametrize("theirs", ["manifest.csv", "images/photo.png", "notes.txt", "images/s1.png/"])
def test_synth_refuses_a_folder_holding_files_it_did_not_write(tmp_path, theirs):
    out = tmp_path / "mine"
    if theirs.endswith("/"):                                   # a folder named like an image
        (out / theirs).mkdir(parents=True)
    elif theirs.endswith(".png"):
        write_png(out / theirs)
    else:
        out.mkdir()
        (out / theirs).write_text("image,text\nmy.png,my own manifest\n")
    before = snapshot(out)
    with pytest.raises(SystemExit) as e:
        data.main(["synth", "--out", str(out), *SYNTH])
    message = one_line(e)
    assert message.startswith(f"synth: {out} holds files SynthCXR did not write ({theirs.rstrip('/')}")
    assert "another folder" in message and snapshot(out) == before
    assert not (out / "meta.json").exists()
    # msd.py's path: ensure_synthetic (config key synth_dir) refuses it the same way
    with pytest.raises(FileExistsError, match="holds files SynthCXR did not write"):
        data.ensure_synthetic(out, n=3, size=16, n_per_class_5x=0)
    assert snapshot(out) == before


def test_synth_redoes_its_own_unfinished_folder_and_reuses_a_finished_one(tmp_path):
    out = tmp_path / "s"
    data.main(["synth", "--out", str(out), *SYNTH])
    data.preview(out)                                          # preview.png is its own too
    data.read_manifest(out / "manifest.csv")
    (out / "meta.json").unlink()                               # interrupted before the end
    (out / "images" / ".s50000000.png.123.tmp").write_bytes(b"half")  # a killed run's temp file
    data.main(["synth", "--out", str(out), *SYNTH])
    assert (out / "meta.json").is_file()


@pytest.mark.parametrize("call", ["cli", "ensure", "generate"])
def test_empty_synth_folder_is_refused_never_the_current_folder(tmp_path, monkeypatch, call):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((SystemExit, ValueError)) as e:
        if call == "cli":
            data.main(["synth", "--out", "", *SYNTH])
        elif call == "ensure":                                 # msd.py --synth_dir=
            data.ensure_synthetic("", n=3, size=16, n_per_class_5x=0)
        else:
            data.generate_synthetic("  ", n=3, size=16, n_per_class_5x=0)
    assert "SynthCXR folder is empty" in one_line(e) and "synth_dir" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_synth_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("mine")
    with pytest.raises(SystemExit, match=r"synth: SynthCXR folder .*f is a file, not a folder"):
        data.main(["synth", "--out", str(tmp_path / "f"), *SYNTH])
    assert (tmp_path / "f").read_text() == "mine"


# ------------------------------------------------------------------ SynthCXR's bounds (issue 27)


@pytest.mark.parametrize("option, value, name", [("--n", "0", "n"), ("--n", "-5", "n"),
                                                 ("--size", "0", "size"), ("--size", "-3", "size"),
                                                 ("--size", "4", "size"), ("--n-5x", "-1", "n_per_class_5x")])
def test_synth_settings_out_of_bounds_are_refused(tmp_path, option, value, name):
    args = dict(zip(SYNTH[::2], SYNTH[1::2]), **{option: value})
    with pytest.raises(SystemExit) as e:
        data.main(["synth", "--out", str(tmp_path / "s"), *[x for kv in args.items() for x in kv]])
    assert re.fullmatch(rf"synth: SynthCXR {name}={value}: expected a whole number of at least \d+ "
                        rf"\({option}, config key synth_\w+\)", one_line(e))
    assert not (tmp_path / "s").exists()


def test_synth_too_large_is_refused_before_anything_is_drawn(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "render_study", lambda *a, **k: pytest.fail("drawn"))
    with pytest.raises(SystemExit) as e:
        data.main(["synth", "--out", str(tmp_path / "s"), "--size", "100000"])
    message = one_line(e)
    need = data.synth_bytes(4000, 100000, 100)
    assert f"would take about {need / 2**30:,.1f} GiB ({need:,} bytes" in message
    assert "more than the limit of 16.0 GiB (data.MAX_SYNTH_BYTES)" in message and "--max-bytes" in message
    assert not (tmp_path / "s").exists()
    # the limit is an option: a lower one refuses a small set, a higher one lets it through
    monkeypatch.undo()
    small = ["synth", "--out", str(tmp_path / "s"), *SYNTH]
    with pytest.raises(SystemExit, match=r"limit of 0\.0 GiB"):
        data.main(small + ["--max-bytes", "1000"])
    monkeypatch.setattr(data, "MAX_SYNTH_BYTES", 1000)
    data.main(small + ["--max-bytes", str(data.synth_bytes(3, 16, 0))])
    assert (tmp_path / "s" / "meta.json").is_file()
    with pytest.raises(ValueError, match="data.MAX_SYNTH_BYTES"):       # msd.py's path
        data.ensure_synthetic(tmp_path / "t", n=3, size=16, n_per_class_5x=0)


# ------------------------------------------------------------------ where prepare writes (issue 27)


def small_table(root):
    for k in range(4):
        write_png(root / f"img/{k}.png", seed=k)
    (root / "metadata.csv").write_text("image,text,patient_id\n" + "".join(
        f"img/{k}.png,note {k},P{k}\n" for k in range(4)))
    return ["prepare", "csv", str(root)]


@pytest.mark.parametrize("target, expected", [
    ("own/metadata.csv", r"is the metadata CSV, an input: it is never written over"),
    ("own/img/0.png", r"exists and was not written by data\.py prepare \(no 0\.prepare\.json"),
    ("mine.csv", r"exists and was not written by data\.py prepare"),
    ("own/img", r"is a folder, not a file: give the path of the manifest CSV"),
    ("", r"--out is empty")])
def test_prepare_out_never_writes_over_what_it_did_not_write(tmp_path, target, expected):
    args = small_table(tmp_path / "own")
    (tmp_path / "mine.csv").write_text("a user's own file\n")
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        data.main(args + ["--out", str(tmp_path / target) if target else ""])
    assert re.search(expected, one_line(e)), str(e.value)
    assert snapshot(tmp_path) == before


def test_prepare_replaces_its_own_manifest_only_with_force(tmp_path, capsys):
    args = small_table(tmp_path / "own") + ["--out", str(tmp_path / "m.csv")]
    data.main(args)
    record = json.loads((tmp_path / "m.prepare.json").read_text())
    assert record["dataset"] == "csv" and record["manifest_sha256"] == data.sha256_file(tmp_path / "m.csv")
    with pytest.raises(SystemExit, match=r"m\.csv is a manifest an earlier prepare wrote: pass --force"):
        data.main(args)
    data.main(args + ["--force", "--seed", "3"])
    assert "4 rows written" in capsys.readouterr().out
    with open(tmp_path / "m.csv", "a") as f:                  # edited by hand since: the user's now
        f.write("img/0.png,hand-made row,train,x,P9,\n")
    with pytest.raises(SystemExit, match=r"exists and was not written by data\.py prepare"):
        data.main(args + ["--force"])
    assert "hand-made row" in (tmp_path / "m.csv").read_text()


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   OSError(errno.EFBIG, "File too large"),
                                   RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")])
def test_a_failed_write_leaves_no_temporary_file_and_the_old_file_whole(tmp_path, error):
    path = tmp_path / "ckpt.pt"
    path.write_text("old")
    with pytest.raises(OSError) as e:
        with data.atomic_write(path) as tmp:
            tmp.write_text("half of the new")
            raise error
    message = one_line(e)
    assert message.startswith(f"cannot write {path} (") and "MB free there): " in message
    assert " ".join(str(error).split()[-3:]) in message and message.endswith("if any, is untouched")
    assert e.value.errno == getattr(error, "errno", None)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_prepare_that_runs_out_of_space_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    args = small_table(tmp_path / "own") + ["--out", str(tmp_path / "m.csv")]
    real = data.csv.DictWriter.writerow

    def full_disk(self, row):
        if row.get("text") == "note 2":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, row)
    monkeypatch.setattr(data.csv.DictWriter, "writerow", full_disk)
    with pytest.raises(SystemExit) as e:
        data.main(args)
    assert one_line(e).startswith(f"prepare csv: cannot write {tmp_path / 'm.csv'} (")
    assert "MB free there): No space left on device" in one_line(e)
    assert not (tmp_path / "m.csv").exists() and not list(tmp_path.glob(".*"))   # no temporary file


# ------------------------------------------------------------------ degenerate input (issue 27)


def test_preview_without_a_manifest_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^preview: manifest not found: .*manifest\.csv$"):
        data.main(["preview", str(tmp_path)])
    (tmp_path / "manifest.csv").mkdir()
    with pytest.raises(SystemExit, match=r"^preview: manifest .*manifest\.csv is a folder, not a file$"):
        data.main(["preview", str(tmp_path)])


def test_preview_never_writes_over_its_manifest(tmp_path):
    data.main(["synth", "--out", str(tmp_path / "s"), *SYNTH])
    before = (tmp_path / "s" / "manifest.csv").read_bytes()
    with pytest.raises(SystemExit, match=r"preview --out .*manifest\.csv is the manifest, an input"):
        data.main(["preview", str(tmp_path / "s"), "--out", str(tmp_path / "s" / "manifest.csv")])
    assert (tmp_path / "s" / "manifest.csv").read_bytes() == before


def deep(depth=100_000):
    return "[" * depth + "]" * depth


def test_deeply_nested_json_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "deep.json").write_text(deep())
    with pytest.raises(ValueError, match=r"deep\.json: JSON nested too deeply to read"):
        data.read_json(tmp_path / "deep.json")
    # a BERT checkpoint's config, a saved tokenizer: the same one line
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n")
    (bert / "tokenizer_config.json").write_text(deep())
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: JSON nested too deeply"):
        data.WordPieceTokenizer.from_pretrained(bert)
    # SynthCXR's meta.json: refused in one line naming the folder, never regenerated over
    data.main(["synth", "--out", str(tmp_path / "s"), *SYNTH])
    (tmp_path / "s" / "meta.json").write_text(deep())
    with pytest.raises(SystemExit) as e:
        data.main(["synth", "--out", str(tmp_path / "s"), *SYNTH])
    assert re.search(r"synth: .*s holds a SynthCXR set made with meta\.json=unreadable \(.*meta\.json: "
                     r"JSON nested too deeply to read\)", one_line(e))
    # a cache or a prepare record nested that deep is only unreadable: redone, or not trusted
    (tmp_path / "s" / "manifest.image_check.json").write_text(deep())
    rows = data.read_manifest(tmp_path / "s" / "manifest.csv")
    assert data.find_bad_images(tmp_path / "s" / "manifest.csv", rows) == []


IU_HEADER = '<?xml version="1.0"?>\n'
BOMB = IU_HEADER + '<!DOCTYPE r [<!ENTITY a "aaaaaaaaaa">' + "".join(
    f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(8)) + \
    ']>\n<eCitation><AbstractText Label="FINDINGS">&i;</AbstractText></eCitation>'


@pytest.mark.parametrize("xml, why", [
    (IU_HEADER + '<eCitation><AbstractText Label="FINDINGS">clear', "no element found"),
    (IU_HEADER + "<eCitation><a></b></eCitation>", "mismatched tag"),
    (BOMB, "limit on input amplification factor")], ids=["cut", "mismatched", "entity bomb"])
def test_iu_xray_xml_that_does_not_parse_is_one_line(tmp_path, xml, why):
    (tmp_path / "iu" / "ecgen-radiology").mkdir(parents=True)
    (tmp_path / "iu" / "ecgen-radiology" / "1.xml").write_text(xml)
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", "iu-xray", str(tmp_path / "iu"), "--out", str(tmp_path / "m.csv")])
    assert re.match(r"prepare iu-xray: .*ecgen-radiology/1\.xml: not well-formed XML \(.*"
                    + why + r".*\); fix or remove this report file$", one_line(e)), str(e.value)


def id_manifest(tmp_path, study="s{k}", patient="p{k}"):
    write_png(tmp_path / "a.png")
    rows = [{"image": "a.png", "text": f"text {k}", "split": "train" if k < 3 else "test",
             "study_id": study.format(k=k), "patient_id": patient.format(k=k), "view": "PA"}
            for k in range(4)]
    data.write_manifest(tmp_path / "m.csv", rows, [])
    return tmp_path / "m.csv"


def test_study_id_empty_everywhere_is_refused(tmp_path):
    path = id_manifest(tmp_path, study="")
    with pytest.raises(data.ManifestError) as e:
        data.check_split_overlap(data.read_manifest(path), path)  # every command checks the ids there
    assert re.fullmatch(r".*m\.csv: column 'study_id' is empty in all 4 rows, so every image would be "
                        r"one study .*; write each image's study id, or the image's own id for one "
                        r"study per image", one_line(e))


@pytest.mark.parametrize("patient, warned", [("", True), ("p{k}", False)])
def test_patient_id_empty_is_warned_with_the_count(tmp_path, capsys, patient, warned):
    path = id_manifest(tmp_path, patient=patient)
    rows = data.read_manifest(path)
    data.check_split_overlap(rows, path)
    assert len(rows) == 4
    err = capsys.readouterr().err
    assert (f"warning: {path}: column 'patient_id' is empty in 4 of 4 rows: the split check cannot "
            f"see their patients" in err) == warned


def special_file(path, kind):
    if kind == "folder":
        path.mkdir()
        return "is a folder, not a file"
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(path)
    return re.escape("is not a regular file (a FIFO, socket or device)")


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_folder_or_fifo_where_a_file_is_expected_is_named_as_such(tmp_path, kind):
    """Never 'not found' (it is there) and never opened (a FIFO would wait forever)."""
    what = special_file(tmp_path / "thing", kind)
    with pytest.raises(OSError, match=rf"^manifest .*thing {what}$"):
        data.read_manifest(tmp_path / "thing")
    with pytest.raises(OSError, match=rf"^image .*thing {what}$"):
        data.load_image(tmp_path / "thing")
    args = small_table(tmp_path / "own") + ["--out", str(tmp_path / "m.csv")]
    with pytest.raises(SystemExit, match=rf"^prepare csv: metadata CSV .*thing {what}$"):
        data.main(args + ["--metadata", str(tmp_path / "thing")])
    # a manifest row whose image is one: a bad row of its own kind
    data.write_manifest(tmp_path / "m2.csv", [
        {"image": "thing", "text": "t", "split": "train", "study_id": "s", "patient_id": "p", "view": ""}], [])
    with pytest.raises(data.BadRowsError, match=rf"1 image not a file\(s\)\): .*row 1, column 'image': .*thing {what}"):
        data.read_manifest(tmp_path / "m2.csv")
    with pytest.raises(FileNotFoundError, match=r"^manifest not found: .*nowhere\.csv$"):
        data.read_manifest(tmp_path / "nowhere.csv")
