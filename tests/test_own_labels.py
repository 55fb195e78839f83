"""Own-label evaluation (--label-column) that cannot mislead: every number is printed and recorded
beside what it must beat (the class counts, chance over the classes PRESENT in the split, the
majority-class predictor, the untrained floor), balanced accuracy and AUROC beside accuracy, a
warning for prompts the tokenizer does not know, and pictures with the majority and floor lines."""
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import data
import evaluate as ev
import msd
from test_evaluate import FAST, strict_json

NS = "{http://www.w3.org/2000/svg}"


def own_label_manifest(trained, tmp_path, name="own", classes=("common", "rare"), share=0.77,
                       extra_classes=()):
    """The tiny synthetic set with a column 'label': in each split, the first `share` of the rows
    are classes[0], the rest cycle through the other classes. extra_classes appear in train only
    (a column with more classes than the evaluated split has)."""
    rows = [r for r in data.read_manifest(msd.prepare_data(trained["cfg"])) if r["split"] != "test_5x"]
    by_split = {}
    for r in rows:
        by_split.setdefault(r["split"], []).append(r)
    out = []
    for split, part in by_split.items():
        common = round(share * len(part))
        for i, r in enumerate(part):
            label = classes[0] if i < common else classes[1 + (i - common) % (len(classes) - 1)]
            out.append({**r, "image": r["_path"], "label": label})
    for i, c in enumerate(extra_classes):                     # one training row of each
        out[i]["label"] = c
    manifest = tmp_path / name / "manifest.csv"
    data.write_manifest(manifest, out)
    return manifest


def test_a_majority_class_model_does_not_look_like_success():
    """77 % of one class: predicting it everywhere gives accuracy 0.77, but balanced accuracy
    1/K and AUROC 0.5, exactly the majority-class baseline recorded beside it."""
    y = np.array([0] * 77 + [1] * 23)
    always_common = np.tile([[2.0, 1.0]], (100, 1))             # every image scored as class 0
    m = ev.multiclass_metrics(always_common, y, ["common", "rare"])
    assert m["accuracy"] == pytest.approx(0.77) and m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["auroc"] == pytest.approx(0.5) and m["chance_accuracy"] == 0.5
    assert m["majority"] == pytest.approx({k: m[k] for k in ev.LABEL_METRICS})
    assert m["class_counts"] == {"common": 77, "rare": 23} and m["majority_class"] == "common"


def test_chance_is_over_the_classes_present_not_every_class_of_the_column():
    y = np.array([0, 0, 1, 1, 1])                               # 2 of 16 classes present
    scores = np.eye(16)[[0, 1, 1, 1, 0]]
    m = ev.multiclass_metrics(scores, y, [f"c{i}" for i in range(16)])
    assert m["chance_accuracy"] == 0.5 and m["classes_present"] == 2
    # recall 1/2 and 2/3: absent classes neither count in balanced accuracy nor in macro-F1
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["macro_f1"] == pytest.approx(ev.macro_f1(y, [0, 1, 1, 1, 0], 16, labels=[0, 1]))
    assert m["macro_f1"] > ev.macro_f1(y, [0, 1, 1, 1, 0], 16)   # the 14 absent classes: not zeros


def test_one_vs_rest_auroc_reference_values():
    y = [0, 0, 1, 1, 2, 2]
    prob = np.array([[.8, .1, .1], [.4, .5, .1], [.3, .6, .1], [.5, .4, .1], [.1, .2, .7], [.2, .2, .6]])
    per_class = [ev.auroc(np.array(y) == c, prob[:, c]) for c in range(3)]
    assert per_class == pytest.approx([0.875, 0.875, 1.0])       # sklearn roc_auc_score, ovr
    assert ev.ovr_auroc(y, prob, [0, 1, 2]) == pytest.approx(np.mean(per_class))
    assert ev.balanced_accuracy(y, prob.argmax(1), [0, 1, 2]) == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)


def test_own_label_zeroshot_prints_the_majority_beside_the_model(trained, tmp_path, capsys):
    manifest = own_label_manifest(trained, tmp_path)
    test_rows = [r for r in data.read_manifest(manifest) if r["split"] == "test"]
    n_common = sum(r["label"] == "common" for r in test_rows)
    res = ev.main(["--task", "zeroshot", "--checkpoint", str(trained["ckpt"]), "--data", str(manifest),
                   "--label-column", "label", "--out", str(tmp_path / "z.json")])
    out = capsys.readouterr().out
    mc = res["zeroshot"]["multiclass"]
    assert mc["class_counts"] == {"common": n_common, "rare": len(test_rows) - n_common}
    assert mc["majority"]["accuracy"] == pytest.approx(n_common / len(test_rows))
    assert 0.7 < mc["majority"]["accuracy"] < 0.85 and mc["majority"]["balanced_accuracy"] == 0.5
    assert strict_json(tmp_path / "z.json")["zeroshot"]["multiclass"]["majority"]["accuracy"] == \
        pytest.approx(mc["majority"]["accuracy"])
    table = out[out.index("balanced acc."):]
    model_row = next(line for line in table.splitlines() if line.strip().startswith("zero-shot"))
    majority_row = next(line for line in table.splitlines() if "majority class (common)" in line)
    assert f"{mc['accuracy']:.3f}" in model_row and f"{mc['balanced_accuracy']:.3f}" in model_row
    assert f"{mc['majority']['accuracy']:.3f}" in majority_row and "0.500" in majority_row
    assert f"common {n_common} (" in out and "chance (1/2)" in out
    assert "no untrained floor" in out                          # and how to make one


def test_chance_printed_over_the_classes_of_the_split(trained, tmp_path, capsys):
    extra = [f"other{i}" for i in range(14)]                    # 16 classes in the column
    manifest = own_label_manifest(trained, tmp_path, extra_classes=extra)
    res = ev.main(["--task", "zeroshot", "--checkpoint", str(trained["ckpt"]), "--data", str(manifest),
                   "--label-column", "label", "--out", str(tmp_path / "z.json")])
    mc = res["zeroshot"]["multiclass"]
    assert len(mc["classes"]) == 16 and mc["chance_accuracy"] == 0.5
    out = capsys.readouterr().out
    assert "(chance 0.500 over the 2 classes present" in out and "0.062" not in out
    assert "2 of 16 classes present" in out


def test_untrained_floor_is_shown_beside_and_drawn(trained, tmp_path, capsys):
    manifest = own_label_manifest(trained, tmp_path)
    own = ["--data", str(manifest), "--label-column", "label", *FAST]
    ckpt = tmp_path / "run" / "ckpt.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(trained["ckpt"].read_bytes())
    # the floor, where --checkpoint random writes it by default (beside the config's run)
    floor = ev.main(["--task", "all", "--checkpoint", "random", "--config", str(trained["config"]), *own])
    res = ev.main(["--task", "all", "--checkpoint", str(ckpt), "--config", str(trained["config"]), *own])
    out = capsys.readouterr().out
    zs, fs = res["zeroshot"]["multiclass"], res["fewshot"]
    assert zs["floor"]["accuracy"] == floor["zeroshot"]["multiclass"]["accuracy"]
    assert zs["floor"]["auroc"] == floor["zeroshot"]["multiclass"]["auroc"]
    assert fs["floor"]["results"]["1-shot"]["balanced_accuracy"][0] == \
        floor["fewshot"]["results"]["1-shot"]["balanced_accuracy_mean"]
    floor_row = next(line for line in out.splitlines() if line.strip().startswith("untrained floor"))
    assert f"{zs['floor']['accuracy']:.3f}" in floor_row
    assert "1-shot untrained floor" in out and "majority class (common)" in out
    # the probe: balanced accuracy and AUROC beside accuracy, chance over the classes present
    r = fs["results"]["4-shot"]
    assert {"balanced_accuracy_mean", "auroc_mean", "macro_f1_std"} <= set(r)
    assert fs["chance_accuracy"] == 0.5 and fs["majority"]["balanced_accuracy"] == 0.5
    # the picture: a majority line and a floor line across the zero-shot accuracy bar
    ev.main(["--task", "plots", "--checkpoint", str(ckpt)])
    root = ET.parse(ckpt.parent / "plots" / "eval_all_own_label.svg").getroot()
    lines = [e for e in root.iter(NS + "line") if e.get("class") == "mark"]
    assert {e.get("data-mark") for e in lines} == {"majority class", "untrained floor"}
    frame = next(e for e in root.iter(NS + "rect") if e.get("fill") == "none")   # the axis: 0 to 1
    top, height = float(frame.get("y")), float(frame.get("height"))
    for name, value in (("majority class", zs["majority"]["accuracy"]),
                        ("untrained floor", zs["floor"]["accuracy"])):
        line = next(e for e in lines if e.get("data-mark") == name)    # the first: zero-shot accuracy
        assert float(line.get("y1")) == pytest.approx(top + height * (1 - value), abs=0.1)


def test_given_floor_of_another_split_is_an_error_naming_it(trained, tmp_path, monkeypatch):
    manifest = own_label_manifest(trained, tmp_path)
    own = ["--data", str(manifest), "--label-column", "label"]
    floor = tmp_path / "floor_valid.json"
    ev.main(["--task", "zeroshot", "--checkpoint", "random", "--config", str(trained["config"]),
             "--split", "valid", "--out", str(floor), *own])
    monkeypatch.setattr(ev, "load_for_eval", lambda args: pytest.fail("--floor is checked first"))
    with pytest.raises(ValueError, match=r"--floor .*floor_valid.json: its split is 'valid', this "
                                         r"evaluation's 'test'"):
        ev.main(["--task", "zeroshot", "--checkpoint", str(trained["ckpt"]), "--floor", str(floor),
                 "--out", str(tmp_path / "z.json"), *own])
    with pytest.raises(SystemExit) as e:                       # a floor needs --label-column
        ev.main(["--task", "zeroshot", "--checkpoint", str(trained["ckpt"]), "--floor", str(floor),
                 "--out", str(tmp_path / "z.json")])
    assert e.value.code == 2


def test_a_floor_evaluated_on_another_manifest_is_not_shown(trained, tmp_path):
    manifest = own_label_manifest(trained, tmp_path)
    own = ["--data", str(manifest), "--label-column", "label"]
    floor = tmp_path / "floor.json"
    ev.main(["--task", "zeroshot", "--checkpoint", "random", "--config", str(trained["config"]),
             "--out", str(floor), *own])
    args = ev.build_parser().parse_args(["--task", "zeroshot", "--checkpoint", str(trained["ckpt"]),
                                         "--floor", str(floor), *own])
    assert ev.find_floor(args, "zeroshot", manifest)[0] == floor
    path, res, notes = ev.find_floor(args, "zeroshot", tmp_path / "another.csv")
    assert path is None and res is None and notes[-1].endswith("another.csv: not shown")


def test_class_names_the_tokenizer_does_not_know_are_a_warning(trained, tmp_path, capsys):
    manifest = own_label_manifest(trained, tmp_path, classes=("qzxv wkrp", "normal"))
    res = ev.main(["--task", "zeroshot", "--checkpoint", str(trained["ckpt"]), "--data", str(manifest),
                   "--label-column", "label", "--out", str(tmp_path / "z.json")])
    warnings = res["zeroshot"]["multiclass"]["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("class 'qzxv wkrp': 100% of the tokens")
    assert "warning: class 'qzxv wkrp': 100%" in capsys.readouterr().out


class _Tokenizer:
    """unk_rate as data's tokenizers compute it, over a vocabulary of one word: 'x'."""

    def unk_rate(self, texts):
        words = [w for t in texts for w in t.split()]
        return sum(w != "x" for w in words) / len(words)


def test_unknown_word_share_over_half_is_the_threshold():
    prompts = {"half": ["x y"], "most": ["x y z"], "known": ["x x"]}
    warnings = ev.unknown_word_warnings(_Tokenizer(), prompts)
    assert [w.split(":")[0] for w in warnings] == ["class 'most'"] and "67%" in warnings[0]


def test_label_names_may_hold_commas_as_a_json_list():
    assert ev._names("Edema, Cardiomegaly") == ["Edema", "Cardiomegaly"]
    assert ev._names('["pleural effusion, left", "edema"]') == ["pleural effusion, left", "edema"]
    args = ev.build_parser().parse_args(["--task", "fewshot", "--labels", '["a, b"]'])
    assert args.labels == ["a, b"]
    for bad in ('["a", "a", {"k": 1, "k": 2}]', "[1, 2]", "[oops"):
        with pytest.raises(SystemExit):
            ev.build_parser().parse_args(["--task", "fewshot", "--labels", bad])


def test_a_column_with_no_value_in_the_split_is_an_error(trained, tmp_path):
    manifest = own_label_manifest(trained, tmp_path)
    rows = [{**r, "image": r["_path"], "label": "" if r["split"] == "test" else r["label"]}
            for r in data.read_manifest(manifest)]
    data.write_manifest(manifest, rows)
    with pytest.raises(ValueError, match=r"--label-column 'label': none of the \d+ images of split 'test'"):
        ev.main(["--task", "zeroshot", "--checkpoint", str(trained["ckpt"]), "--data", str(manifest),
                 "--label-column", "label", "--out", str(tmp_path / "z.json")])
