"""Bad inputs as a hostile or careless user would give them: each is refused with one message
naming the file, row, key or value (and the way out), before anything large is allocated."""
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFont

import data
import evaluate
import msd

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "pretrained"
BERT_DIR, VIT_DIR = FIX / "bert", FIX / "vit"


def safetensors_parts(path):
    """-> (header dict, data section bytes) of a .safetensors file."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path, header, body):
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + body)
    return path


def bert_folder(tmp_path, weights="model.safetensors", **config):
    """A copy of the tiny BERT fixture folder with config.json keys changed."""
    folder = tmp_path / "bert"
    folder.mkdir()
    for name in ("vocab.txt", weights):
        shutil.copy(BERT_DIR / name, folder / name)
    c = json.loads((BERT_DIR / "config.json").read_text())
    c.update(config)
    (folder / "config.json").write_text(json.dumps(c))
    return folder


def vit_tower():
    return msd.VisionTransformer(32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=4,
                                 dropout=0.0, impl="sdpa", eps=msd.TIMM_VIT_LN_EPS)


# ---------------------------------------------------------------- 1. hostile .safetensors files


def test_safetensors_overlapping_tensors_are_refused(tmp_path):
    header, body = safetensors_parts(VIT_DIR / "model.safetensors")
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    first, second = names[0], names[1]
    size = header[first]["data_offsets"][1] - header[first]["data_offsets"][0]
    if header[second]["data_offsets"][1] - header[second]["data_offsets"][0] == size:
        header[second] = {**header[second], "data_offsets": header[first]["data_offsets"]}
    else:  # give the second one the first one's bytes and shape
        header[second] = dict(header[first])
    with pytest.raises(msd.WeightsError, match=rf"overlap\.safetensors: tensor .* overlaps tensor"):
        msd.read_safetensors(write_safetensors(tmp_path / "overlap.safetensors", header, body))


def test_safetensors_bytes_no_tensor_names_are_refused_unread(tmp_path, monkeypatch):
    header, body = safetensors_parts(VIT_DIR / "model.safetensors")
    path = write_safetensors(tmp_path / "trailing.safetensors", header, body)
    with open(path, "r+b") as f:  # 256 MB of trailing zeros, sparse: nothing is written to disk
        f.truncate(path.stat().st_size + 256 * 2**20)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read the whole file"))
    with pytest.raises(msd.WeightsError, match=rf"trailing\.safetensors: the header names {len(body)} "
                                               rf"bytes of tensor data, but {len(body) + 256 * 2**20} "
                                               rf"bytes follow it"):
        msd.read_safetensors(path)
    # a gap between two tensors: the later tensor's bytes start after the end of the earlier
    monkeypatch.undo()
    header, body = safetensors_parts(VIT_DIR / "model.safetensors")
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    begin, end = header[last]["data_offsets"]
    header[last] = {**header[last], "data_offsets": [begin + 4, end + 4]}
    gap = write_safetensors(tmp_path / "gap.safetensors", header, body[:begin] + b"\0" * 4 + body[begin:])
    with pytest.raises(msd.WeightsError, match=rf"gap\.safetensors: tensor '{last}' .* leaves bytes "
                                               rf"\[{begin}, {begin + 4}\) that no tensor names"):
        msd.read_safetensors(gap)


# ---------------------------------------------------------------- 2. sizes checked before allocation


def test_bert_config_far_larger_than_its_weights_is_refused_before_building(tmp_path):
    folder = bert_folder(tmp_path, hidden_size=16384, intermediate_size=65536, num_attention_heads=16)
    with pytest.raises(msd.WeightsError, match=r"(?s)model\.safetensors does not fit the model.*"
                                               r"wrong shape.*config\.json implies [\d,]+ parameters "
                                               r"\(hidden_size 16384.*the file holds [\d,]+"):
        msd.read_bert_config(folder)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_bert_config_with_more_layers_than_its_weights_is_refused(tmp_path, weights):
    folder = bert_folder(tmp_path, weights, num_hidden_layers=24)
    with pytest.raises(msd.WeightsError, match=rf"config\.json asks for num_hidden_layers 24, but "
                                               rf".*{weights} holds 2 layers"):
        msd.read_bert_config(folder)
    cfg = msd.Config(text_arch="bert", text_weights=str(folder), max_len=24)
    with pytest.raises(msd.WeightsError, match="num_hidden_layers 24"):  # no tower is built
        msd.build_model(cfg, 202)


def tiny_checkpoint(tmp_path):
    """A real checkpoint of a tiny model -> its path."""
    cfg = msd.Config(image_size=16, patch_size=8, vision_width=16, vision_layers=2, vision_heads=2,
                     text_width=16, text_layers=2, text_heads=2, embed_dim=8, max_len=8,
                     queue_size=8, out_dir=str(tmp_path))
    tokenizer = data.Tokenizer(data.SPECIAL_TOKENS + ["lungs", "clear"], max_len=8)
    model = msd.build_model(cfg, tokenizer.vocab_size)
    msd.save_checkpoint(tmp_path / "ckpt.pt", model, msd.configure_optimizer(model, cfg), 1, cfg, tokenizer)
    return tmp_path / "ckpt.pt"


def edit_checkpoint(path, **config):
    """Change config keys in a checkpoint and recompute its checksum, as anyone can."""
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"].update(config)
    del ckpt["sha256"]
    ckpt["sha256"] = msd.checkpoint_sha256(ckpt)
    torch.save(ckpt, path)


@pytest.mark.parametrize("change, message", [
    ({"vision_layers": 3000}, r"asks for 3000 layers in the visual tower, its weights hold 2"),
    ({"text_layers": 5}, r"asks for 5 layers in the text tower, its weights hold 2"),
    ({"vision_width": 64}, r"its config does not describe its weights: \d+ tensors differ \(.*config "
                           r"\(\d+, 64\), file \(\d+, 16\).*the config implies [\d,]+ values, the file holds"),
    ({"queue_size": 10**7}, r"image_queue.feats: config \(10000000, 8\), file \(8, 8\)"),
])
def test_checkpoint_whose_config_does_not_describe_its_weights(tmp_path, change, message):
    path = tiny_checkpoint(tmp_path)
    msd.load_checkpoint(path)  # the real one loads
    edit_checkpoint(path, **change)
    with pytest.raises(msd.CheckpointError, match=message):
        msd.load_checkpoint(path)


# ---------------------------------------------------------------- 3. NaN / inf, integer weights, eps


@pytest.mark.parametrize("value, message", [
    (float("nan"), r"unusable values \(1\): norm\.weight \(32 NaN / inf values\)"),
    (float("inf"), r"unusable values \(1\): norm\.weight \(32 NaN / inf values\)"),
    ("int32", r"unusable values \(1\): norm\.weight \(torch\.int32: weights must be floating point\)"),
])
def test_vit_weights_that_are_not_finite_floats_are_refused(tmp_path, value, message):
    weights = msd.read_weights(VIT_DIR / "model.safetensors")
    weights["norm.weight"] = (weights["norm.weight"].to(torch.int32) if value == "int32"
                              else torch.full_like(weights["norm.weight"], value))
    torch.save(weights, tmp_path / "bad.pth")
    with pytest.raises(msd.WeightsError, match=r"bad\.pth does not fit the model:\n  " + message):
        msd.load_vit_weights(vit_tower(), tmp_path / "bad.pth")


def test_bert_weights_with_nan_or_integer_tensors_are_refused(tmp_path):
    header, body = safetensors_parts(BERT_DIR / "model.safetensors")
    name = "bert.encoder.layer.0.output.dense.bias" if "bert.encoder.layer.0.output.dense.bias" in header \
        else "encoder.layer.0.output.dense.bias"
    header[name] = {**header[name], "dtype": "I32"}  # same byte count as F32
    folder = bert_folder(tmp_path)
    write_safetensors(folder / "model.safetensors", header, body)
    with pytest.raises(msd.WeightsError, match=r"model\.safetensors does not fit the model:\n  unusable "
                                               r"values \(1\): encoder\.layer\.0\.output\.dense\.bias "
                                               r"\(torch\.int32"):
        msd.read_bert_config(folder)  # from the header alone, before a tower is built
    weights = msd.read_weights(BERT_DIR / "model.safetensors")
    weights[name][3] = float("nan")
    torch.save(weights, tmp_path / "nan.bin")
    text = msd.BertTextTransformer(msd.read_bert_config(BERT_DIR), 202, 24, 0.0, "sdpa")
    with pytest.raises(msd.WeightsError, match=r"nan\.bin does not fit the model:\n  unusable values "
                                               r"\(1\): encoder\.layer\.0\.output\.dense\.bias \(1 NaN"):
        msd.load_bert_weights(text, tmp_path / "nan.bin")


@pytest.mark.parametrize("eps", [0, -1e-12, "1e-12", None, True])
def test_bert_layer_norm_eps_must_be_a_positive_number(tmp_path, eps):
    folder = bert_folder(tmp_path, layer_norm_eps=eps)
    with pytest.raises(msd.WeightsError, match=rf"config\.json: layer_norm_eps {eps!r} must be a "
                                               rf"positive number"):
        msd.read_bert_config(folder)


def test_msd_cli_names_a_bad_weights_file_in_one_line(tmp_path, capsys):
    folder = bert_folder(tmp_path, layer_norm_eps=-1)
    with pytest.raises(SystemExit) as stop:
        msd.main([f"--out_dir={tmp_path / 'run'}", "--text_arch=bert", f"--text_weights={folder}",
                  f"--data={leaky_manifest(tmp_path, leak=False)}", "--max_len=24", "--progress=false"])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "error: " in err and "layer_norm_eps -1 must be a positive number" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- 4. CRLF vocab.txt


def test_wordpiece_vocab_with_windows_line_ends_reads_as_hf_does(tmp_path):
    folder = bert_folder(tmp_path)
    lines = (BERT_DIR / "vocab.txt").read_text(encoding="utf-8").split("\n")
    (folder / "vocab.txt").write_bytes("\r\n".join(lines).encode("utf-8"))
    crlf = data.WordPieceTokenizer.from_pretrained(folder)
    assert crlf.vocab == data.WordPieceTokenizer.from_pretrained(BERT_DIR).vocab
    assert crlf.pad_id == 0 and not any(t.endswith("\r") for t in crlf.vocab)


# ---------------------------------------------------------------- 5. manifest CSV errors


HEADER = "image,text,split,study_id,patient_id,view\n"


def manifest_text(tmp_path, text):
    Image.new("L", (8, 8), 100).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text(text, encoding="utf-8")
    return tmp_path / "m.csv"


@pytest.mark.parametrize("row, fields", [("a.png,lungs clear,train,s1,p1\n", 5),
                                         ("a.png,lungs, clear,train,s1,p1,PA\n", 7)])
def test_ragged_row_reports_the_real_counts_and_row(tmp_path, row, fields):
    path = manifest_text(tmp_path, HEADER + "a.png,ok,train,s0,p0,PA\n" + row)
    with pytest.raises(data.ManifestError, match=rf"m\.csv, row 2 \(line 3\): has {fields} fields, "
                                                 rf"the header has 6"):
        data.read_manifest(path)
    assert len(data.read_manifest(path, skip_bad=True)) == 1  # skipped, and counted


def test_repeated_column_name_is_refused(tmp_path):
    path = manifest_text(tmp_path, "image,text,split,study_id,patient_id,view,text\n"
                                   "a.png,lungs clear,train,s1,p1,PA,\n")
    with pytest.raises(data.ManifestError, match=r"m\.csv: column\(s\) \['text'\] appear more than once"):
        data.read_manifest(path)


def test_field_over_the_csv_limit_names_row_and_way_out(tmp_path):
    path = manifest_text(tmp_path, HEADER + "a.png,ok,train,s0,p0,PA\n"
                                            "a.png,\"" + "x" * 140_000 + "\",train,s1,p1,PA\n")
    with pytest.raises(data.ManifestError, match=r"m\.csv, row 2 \(line 3\): field larger than field "
                                                 r"limit \(131072\).*csv\.field_size_limit"):
        data.read_manifest(path)


# ---------------------------------------------------------------- 6. patients in train and test


def leaky_manifest(tmp_path, leak=True):
    rows = [{"image": str(tmp_path / f"x{i}.png"), "text": "lungs clear", "split": split,
             "study_id": f"s{i}", "patient_id": patient, "view": "PA"}
            for i, (split, patient) in enumerate([("train", "p1"), ("train", "p2"), ("valid", "p3"),
                                                  ("test", "p1" if leak else "p4")])]
    for i in range(4):  # four different pictures: only the ids may leak here, not the contents
        Image.new("L", (8, 8), 100 + i).save(tmp_path / f"x{i}.png")
    path = tmp_path / ("leaky.csv" if leak else "clean.csv")
    data.write_manifest(path, rows, [])
    return path


def test_split_overlap_is_refused_unless_allowed(tmp_path, capsys):
    path = leaky_manifest(tmp_path)
    rows = data.read_manifest(path)
    with pytest.raises(data.ManifestError, match=r"leaky\.csv: 1 patient_id\(s\) in 'train' and in "
                                                 r"\['test'\] \(e\.g\. p1\).*allow_split_overlap"):
        data.check_split_overlap(rows, path)
    data.check_split_overlap(rows, path, allow=True)
    assert "warning: " in capsys.readouterr().err
    data.check_split_overlap(data.read_manifest(leaky_manifest(tmp_path, leak=False)), path)
    cfg = msd.Config(data=str(path))
    with pytest.raises(data.ManifestError, match="1 patient_id"):
        msd.prepare_data(cfg)
    assert msd.prepare_data(msd.Config(data=str(path), allow_split_overlap=True)) == path
    with pytest.raises(data.ManifestError, match="1 patient_id"):
        evaluate.main(["--task", "pixel-probe", "--data", str(path), "--out", str(tmp_path / "r.json")])
    with pytest.raises(data.ManifestError, match="1 patient_id"):
        evaluate.main(["--task", "retrieval", "--checkpoint", str(tiny_checkpoint(tmp_path)),
                       "--data", str(path), "--out", str(tmp_path / "r.json")])
    assert evaluate.build_parser().parse_args(["--allow-split-overlap"]).allow_split_overlap


def test_synthetic_data_has_no_split_overlap(tmp_path):
    manifest = data.generate_synthetic(tmp_path, n=60, size=16, seed=2, n_per_class_5x=2)
    rows = data.read_manifest(manifest)
    data.check_split_overlap(rows, manifest)
    assert {r["split"] for r in rows} == {"train", "valid", "test", "test_5x"}


# ---------------------------------------------------------------- 7. images too large to decode


def test_images_over_the_pixel_limit_are_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 30 * 30)
    Image.new("I;16", (40, 30), 1000).save(tmp_path / "big16.png")
    Image.new("L", (30, 30), 100).save(tmp_path / "ok.png")
    with pytest.raises(ValueError, match=r"big16\.png: 40 x 30 pixels .* is more than "
                                         r"data\.MAX_IMAGE_PIXELS"):
        data.load_image(tmp_path / "big16.png")
    assert "40 x 30 pixels" in data.check_image(tmp_path / "big16.png")
    assert data.load_image(tmp_path / "ok.png").size == (30, 30) and data.check_image(tmp_path / "ok.png") is None
    # a JPEG is measured at the scale it is decoded at (1/2 here, draft), not at its full size
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 1100 * 1100)
    Image.new("L", (2048, 2048), 100).save(tmp_path / "big.jpg")
    assert data.check_image(tmp_path / "big.jpg") is None
    assert data.load_image(tmp_path / "big.jpg").size == (1024, 1024)
    # reported with every other bad image when a dataset is built, and never marked as checked
    rows = [{"image": str(tmp_path / n), "text": "lungs clear", "split": "train", "study_id": n,
             "patient_id": n, "view": "PA"} for n in ("big16.png", "ok.png")]
    data.write_manifest(tmp_path / "m.csv", rows, [])
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 30 * 30)
    bad = data.find_bad_images(tmp_path / "m.csv", data.read_manifest(tmp_path / "m.csv"))
    assert [(r["image"], "40 x 30" in why) for r, why in bad] == [("big16.png", True)]


# ---------------------------------------------------------------- 8. split fractions


@pytest.mark.parametrize("fracs", [["--valid-frac", "1.5"], ["--valid-frac", "-0.5"],
                                   ["--valid-frac", "0.6", "--test-frac", "0.5"]])
def test_prepare_refuses_fractions_that_leave_no_train_rows(tmp_path, fracs):
    for name in ("cat", "dog"):
        (tmp_path / "root" / name).mkdir(parents=True)
        Image.new("L", (8, 8), 100).save(tmp_path / "root" / name / "a.png")
    with pytest.raises(SystemExit, match=r"prepare image-folder: --valid-frac .* and --test-frac .*: "
                                         r"each at least 0 and together below 1"):
        data.main(["prepare", "image-folder", "--root", str(tmp_path / "root"),
                   "--out", str(tmp_path / "m.csv"), *fracs])
    assert not (tmp_path / "m.csv").exists()


# ---------------------------------------------------------------- 9, 10. SynthCXR folders, progress


def test_synth_folder_made_with_other_settings_is_not_regenerated(tmp_path, capsys):
    args = ["synth", "--out", str(tmp_path / "s"), "--n", "4", "--size", "16", "--n-5x", "0"]
    data.main(args)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*")}
    with pytest.raises(SystemExit, match=r"synth: .*s holds a SynthCXR set made with seed=0; this run "
                                         r"asks for seed=1.*delete"):
        data.main(args + ["--seed", "1"])
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*")} == before
    cfg = msd.Config(synth_dir=str(tmp_path / "s"), synth_n=4, synth_size=16, synth_per_class_5x=0,
                     synth_seed=7, progress=False)
    with pytest.raises(FileExistsError, match="made with seed=0; this run asks for seed=7"):
        msd.prepare_data(cfg)


def test_synth_generation_shows_progress(tmp_path, capsys):
    data.generate_synthetic(tmp_path / "a", n=3, size=16, n_per_class_5x=0, progress=True)
    err = capsys.readouterr().err
    assert "generating SynthCXR in" in err and "3 studies of 16 px" in err
    assert "SynthCXR:" in err and "/3" in err  # the tqdm bar
    data.generate_synthetic(tmp_path / "b", n=3, size=16, n_per_class_5x=0, progress=False)
    assert "SynthCXR:" not in capsys.readouterr().err


# ---------------------------------------------------------------- 11. preview captions


def test_preview_captions_keep_every_word(tmp_path):
    font = ImageFont.load_default()
    caption = ("[train] devices ett ngt cvc pacemaker; cardiomegaly moderate; edema mild; effusion "
               "small bilateral; atelectasis minimal bilateral; consolidation right upper left lower")
    lines = data.wrap_caption(caption, font, 154)
    assert " ".join(lines).split() == caption.split() and len(lines) > 3
    assert all(font.getlength(line) <= 154 for line in lines)
    manifest = data.generate_synthetic(tmp_path / "s", n=4, size=16, n_per_class_5x=0)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["findings"] = caption[len("[train] "):]
    data.write_manifest(manifest, rows)
    sheet = Image.open(data.preview(tmp_path / "s", tmp_path / "sheet.png"))
    assert sheet.height > 160 + 40  # the caption area grew past the old fixed 40 px
    text = sheet.crop((0, 160 + 40, 160, sheet.height))  # below where the old captions were cut
    assert text.getextrema()[0] < 128  # ink: the caption's later lines are drawn
