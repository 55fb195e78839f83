"""The literature's evaluation protocols as options (docs/protocols.md): GLoRIA's 5xN zero-shot
(sampled prompts, highest cosine, z-scored per class), CheXzero's binary prompt pair, and the
RSNA patient splits. Hand-made cases first, then end-to-end runs on a tiny synthetic set with an
untrained model (no training: a few seconds)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import evaluate as ev    # tests/conftest.py puts the repository root on sys.path
import msd
from test_real_data import make_rsna, read_rows

REPO = Path(__file__).resolve().parents[1]


def vector_encoder(vectors):
    """A 'text encoder' that looks each string up in {string: vector}."""
    return lambda texts: torch.tensor([vectors[t] for t in texts], dtype=torch.float32)


# --------------------------------------------------------------------------- GLoRIA, by hand

def test_zscoring_per_class_changes_the_argmax():
    # two images, two classes; class 0 scores higher for both images before z-scoring
    scores = torch.tensor([[0.9, 0.5],
                           [0.7, 0.6]])
    # column 0: mean 0.8, population std 0.1 -> (+1, -1); column 1: mean 0.55, std 0.05 -> (-1, +1)
    z = ev.zscore_per_class(scores)
    assert torch.allclose(z, torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), atol=1e-5)
    y = [0, 1]
    raw = ev.multiclass_metrics(scores, y, ["a", "b"])
    assert list(raw["predictions"]) == [0, 0] and raw["accuracy"] == 0.5
    normalised = ev.multiclass_metrics(z, y, ["a", "b"])
    assert list(normalised["predictions"]) == [0, 1] and normalised["accuracy"] == 1.0
    # a class whose scores are all equal (one image) is only centred, never divided by 0
    assert torch.equal(ev.zscore_per_class(scores[:1]), torch.zeros(1, 2))


def test_class_score_is_the_highest_prompt_cosine_not_a_mean():
    encode = vector_encoder({"a1": [1.0, 0.0], "a2": [0.0, -1.0], "b1": [0.8, 0.6]})
    image = torch.tensor([[1.0, 0.0]])
    prompts = {"A": ["a1", "a2"], "B": ["b1"]}
    # cosines: A 1.0 and 0.0 (max 1.0, mean 0.5), B 0.8: only the max ranks A first
    assert torch.allclose(ev.max_prompt_similarity(encode, image, prompts), torch.tensor([[1.0, 0.8]]))
    # the grid protocol's mean class vector, normalise((0.5, -0.5)), has cosine 0.707 < 0.8
    grid = image @ ev.class_embeddings(encode, prompts).T
    assert grid.argmax(1).item() == 1 and torch.allclose(grid, torch.tensor([[0.5 ** 0.5, 0.8]]))


def test_prompt_draw_is_seeded_and_is_glorias_at_seed_6():
    grid = ev.load_prompt_set("chexpert")["positive"]
    drawn = ev.sample_prompts(grid, 5, 6)
    assert drawn == ev.sample_prompts(grid, 5, 6) and drawn != ev.sample_prompts(grid, 5, 7)
    assert all(len(p) == 5 and len(set(p)) == 5 and set(p) <= set(grid[c]) for c, p in drawn.items())
    # GLoRIA's generate_chexpert_class_prompts right after its random.seed(6), computed once
    assert drawn["Cardiomegaly"] == [
        "portable view of the chest demonstrates mild cardiomegaly",
        "cardiac silhouette size is upper limits of normal", "heart size remains at mildly enlarged",
        "mildly prominent cardiac silhouette",
        "ap erect chest radiograph demonstrates the heart size is the upper limits of normal"]
    assert drawn["Edema"] == ["pulmonary edema", "improvement in pulmonary interstitial edema",
                              "decreased pulmonary edema", "moderate pulmonary edema",
                              "mild pulmonary edema"]
    # a class with fewer prompts than asked keeps all of them
    assert sorted(ev.sample_prompts({"x": ["p", "q"]}, 5, 0)["x"]) == ["p", "q"]


# --------------------------------------------------------------------------- CheXzero, by hand

def test_chexzero_pair_and_softmax_probability():
    given = {"positive": {"Pneumonia": ["pneumonia in the lower lobe"], "No Finding": ["normal"]},
             "negative": {"Pneumonia": ["the lungs are clear"]}}
    pairs = ev.binary_prompt_pairs(given, ["Pneumonia", "Edema", "No Finding"], "chexzero")
    # the pair of every finding, whatever the set holds; no "no no finding"
    assert pairs == {"Pneumonia": (["pneumonia"], ["no pneumonia"]), "Edema": (["edema"], ["no edema"])}
    assert ev.binary_prompt_pairs(given, ["Pneumonia", "Edema", "No Finding"], "prompts") == {
        "Pneumonia": (["pneumonia in the lower lobe"], ["the lungs are clear"])}
    image = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    pos, neg = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # image 0: cosines 1 and 0 -> e / (e + 1); image 1: 0.6 and 0.8 -> 1 / (1 + e^0.2)
    p = ev.pair_probability(image, pos, neg)
    assert torch.allclose(p, torch.tensor([[np.e / (np.e + 1)], [1 / (1 + np.exp(0.2))]]).float(), atol=1e-6)
    out = ev.zeroshot_binary(image, np.array([[1.0], [0.0]]), pos, neg, ["Pneumonia"], probability=True)
    assert out["auroc"]["Pneumonia"] == 1.0


# --------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_synth):
    """configs/tiny.json on the session's SynthCXR (conftest.py); evaluated untrained."""
    root = tmp_path_factory.mktemp("protocols")
    config = json.loads((REPO / "configs" / "tiny.json").read_text())
    config.update(synth_dir=str(tiny_synth), out_dir=str(root / "run"), progress=False)
    (root / "tiny.json").write_text(json.dumps(config))
    cfg = msd.load_config(root / "tiny.json")
    return {"root": root, "config": root / "tiny.json", "cfg": cfg, "manifest": msd.prepare_data(cfg)}


def zeroshot(tiny, *options):
    return ev.main(["--task", "zeroshot", "--checkpoint", "random", "--config", str(tiny["config"]),
                    "--out", str(tiny["root"] / "z.json"), "--force", *options])


def test_gloria_and_chexzero_protocols_end_to_end(tiny, capsys):
    default = zeroshot(tiny)["zeroshot"]
    assert default["multiclass"]["protocol"]["name"] == "grid"
    assert default["binary"]["protocol"]["name"] == "prompts"
    res = zeroshot(tiny, "--zeroshot-protocol", "gloria", "--prompts-per-class", "2",
                   "--prompt-seed", "3", "--binary-protocol", "chexzero")
    out = capsys.readouterr().out
    mc, b = res["zeroshot"]["multiclass"], res["zeroshot"]["binary"]
    proto = mc["protocol"]
    assert (proto["name"], proto["prompts_per_class"], proto["prompt_seed"]) == ("gloria", 2, 3)
    synth = ev.load_prompt_set("synth")["positive"]
    assert proto["prompts"] == {c: ev.sample_prompts(synth, 2, 3)[c] for c in mc["classes"]}
    assert mc["n_prompts"] == {c: 2 for c in mc["classes"]}
    assert "protocol gloria: 2 prompts per class, seed 3, z-scored per class" in out
    # the accuracy, recomputed here by hand: highest cosine over the drawn prompts, z-scored
    model, tokenizer = ev.untrained_model(tiny["cfg"], tiny["manifest"])
    evaluation = ev.Evaluation(model, tokenizer, tiny["cfg"], tiny["manifest"], 0)
    feats = evaluation.images("test_5x")
    classes, y = ev.five_way_labels(feats["labels"], evaluation.label_names, feats["rows"])
    s = torch.stack([(feats["embed"] @ evaluation.text_embeddings(proto["prompts"][c]).T).max(1).values
                     for c in classes], 1)
    s = (s - s.mean(0)) / s.std(0, unbiased=False)
    assert mc["accuracy"] == pytest.approx(float((s.argmax(1).numpy() == y).mean()))
    # chexzero: every labelled finding but No Finding, with its pair
    assert b["protocol"]["name"] == "chexzero" and "No Finding" not in b["auroc"]
    assert any("no no finding" in n for n in b["notes"])
    assert "zero-shot binary on test (protocol chexzero)" in out
    labelled = [f for f in evaluation.label_names if f != "No Finding"
                and any(r[f] for r in evaluation.rows)]
    assert list(b["auroc"]) == labelled


def test_protocol_options_that_would_be_ignored_are_errors(tiny):
    for bad in (["--prompt-seed", "3"],                                 # grid draws nothing
                ["--zeroshot-protocol", "gloria", "--prompts-per-class", "0"],
                ["--task", "fewshot", "--binary-protocol", "chexzero"],
                ["--label-column", "view", "--binary-protocol", "chexzero"]):
        with pytest.raises(SystemExit) as e:
            ev.main(["--task", "zeroshot", "--checkpoint", "random", "--config",
                     str(tiny["config"]), "--out", str(tiny["root"] / "x.json"), *bad])
        assert e.value.code == 2


# --------------------------------------------------------------------------- RSNA splits

def split_sizes(rows):
    return {s: sum(r["split"] == s for r in rows) for s in ("train", "valid", "test")}


def test_rsna_classification_split_by_default_detection_on_request(tmp_path, capsys):
    root = make_rsna(tmp_path / "rsna")
    ids = [str(i) for i in range(26684)]                       # stage 2's patients: theirs exactly
    assert split_sizes([{"split": s} for s in data._split_patients(ids, 0.15, 0.15, 0).values()]) == \
        {"train": 18678, "valid": 4003, "test": 4003}
    data.prepare("rsna", root, tmp_path / "c.csv", seed=0)
    assert "70% / 15% / 15% (train / valid / test), --split-protocol classification" in capsys.readouterr().out
    classification = read_rows(tmp_path / "c.csv")
    data.prepare("rsna", root, tmp_path / "d.csv", split_protocol="detection", seed=0)
    assert "60% / 20% / 20%" in capsys.readouterr().out
    detection = read_rows(tmp_path / "d.csv")
    # 20 listed patients: 14 / 3 / 3 and 12 / 4 / 4, less the two skipped (missing, unreadable)
    for rows, sizes in ((classification, (14, 3, 3)), (detection, (12, 4, 4))):
        assert all(0 <= n - m <= 2 for n, m in zip(sizes, split_sizes(rows).values()))
        assert sum(split_sizes(rows).values()) == 18
    with pytest.raises(ValueError, match="not both"):
        data.prepare("rsna", root, tmp_path / "x.csv", split_protocol="detection", valid_frac=0.1)
    with pytest.raises(ValueError, match="together below 1"):          # no patient left to train
        data.prepare("rsna", root, tmp_path / "x.csv", valid_frac=0.5, test_frac=0.5)
    with pytest.raises(SystemExit, match="--split-protocol does not apply"):
        data.main(["prepare", "roco", "--root", str(root), "--out", str(tmp_path / "r.csv"),
                   "--split-protocol", "detection"])
