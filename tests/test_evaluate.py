"""Tests of evaluate.py: metrics against reference values computed with scikit-learn, properties
of the zero-shot / probe / retrieval code on feature tensors, and end-to-end runs of every task
on a tiny trained checkpoint, including what a bad input or a bad model must produce."""
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import evaluate as ev    # tests/conftest.py puts the repository root on sys.path
import msd

# --------------------------------------------------------------------------- (1) metrics

AUROC_REFERENCE = [
    ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),
    ([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5], 0.5),
    ([0, 1, 0, 1, 1], [0.1, 0.4, 0.4, 0.8, 0.4], 0.8333333),
    ([1, 0, 1, 0, 1, 0], [0.9, 0.8, 0.7, 0.6, 0.55, 0.54], 0.6666667),
    ([0, 1, 1, 0, 1, 0, 0, 1], [0.3, 0.3, 0.7, 0.7, 0.1, 0.2, 0.9, 0.6], 0.375),
]


@pytest.mark.parametrize("y,s,expected", AUROC_REFERENCE)
def test_auroc_reference_values(y, s, expected):
    assert ev.auroc(y, s) == pytest.approx(expected, abs=1e-6)
    assert ev.auroc(torch.tensor(y), torch.tensor(s)) == pytest.approx(expected, abs=1e-6)


def test_auroc_multilabel_reference():
    Y = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1]])
    S = np.array([[.8, .2, .6], [.3, .7, .5], [.6, .4, .2], [.2, .1, .5], [.4, .3, .1], [.5, .9, .4]])
    per_label = ev.auroc_per_label(Y, S)
    assert per_label == pytest.approx([0.888889, 1.0, 0.833333], abs=1e-6)
    assert ev.nanmean(per_label) == pytest.approx(0.907407, abs=1e-6)


def brute_force_auroc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = rng.integers(0, 6, n) / 5.0                       # few distinct values -> many ties
    assert ev.auroc(y, s) == pytest.approx(brute_force_auroc(y, s), abs=1e-12)


def test_auroc_nan_when_one_class_absent_and_nan_excluded_from_mean():
    assert math.isnan(ev.auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(ev.auroc([0, 0], [0.1, 0.2]))
    assert ev.nanmean([0.5, float("nan"), 1.0]) == pytest.approx(0.75)
    # NaN labels (uncertain, excluded) are dropped per label
    Y = np.array([[1, 0], [0, np.nan], [1, 1], [0, 1]], dtype=float)
    S = np.array([[.9, .1], [.1, .99], [.8, .7], [.2, .6]])
    assert ev.auroc_per_label(Y, S) == [1.0, 1.0]     # 0.0 if the NaN row counted as negative


@pytest.mark.parametrize("y,p,n,f1,acc", [
    ([0, 1, 2, 0, 1, 2], [0, 2, 1, 0, 0, 1], 3, 0.266667, 0.333333),
    ([0, 0, 1, 1, 2, 2, 3, 3, 4, 4], [0, 1, 1, 1, 2, 0, 3, 4, 4, 4], 5, 0.686667, 0.7),
    ([0, 0, 1, 1], [0, 1, 1, 1], 3, 0.488889, 0.75),
])
def test_macro_f1_and_accuracy_reference(y, p, n, f1, acc):
    assert ev.macro_f1(y, p, n) == pytest.approx(f1, abs=1e-6)
    assert ev.accuracy(y, p) == pytest.approx(acc, abs=1e-6)


def test_confusion_matrix():
    cm = ev.confusion_matrix([0, 1, 2, 0, 1, 2], [0, 2, 1, 0, 0, 1], 3)
    assert cm.tolist() == [[2, 0, 0], [1, 0, 1], [0, 2, 0]]


RETRIEVAL_SIM = [[.9, .1, .3, .2], [.8, .7, .1, .0], [.1, .2, .3, .9], [.4, .5, .6, .35]]


def test_retrieval_reference_values():
    ranks = ev.retrieval_ranks(RETRIEVAL_SIM, [0, 1, 2, 3])
    assert ranks.tolist() == [1, 2, 2, 4]
    r = ev.rank_metrics(ranks, ks=(1, 2))
    assert r["R@1"] == pytest.approx(0.25) and r["R@2"] == pytest.approx(0.75)
    assert r["MRR"] == pytest.approx(0.5625)
    p = ev.class_precision_at_k(RETRIEVAL_SIM, [0, 0, 1, 1], [0, 1, 0, 1], ks=(1, 2))
    assert p["P@1"] == pytest.approx(0.75) and p["P@2"] == pytest.approx(0.625)


def test_retrieval_ranks_with_shared_candidate_ids():
    # candidates 0 and 2 both belong to group 0: the best of them counts
    sim = [[0.1, 0.5, 0.7], [0.9, 0.8, 0.2]]
    ranks = ev.retrieval_ranks(sim, targets=[0, 1], cand_ids=[0, 1, 0])
    assert ranks.tolist() == [1, 2]


def test_chunked_retrieval_equals_full_matrix():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(37, 8, generator=g), dim=-1)
    c = F.normalize(torch.randn(23, 8, generator=g), dim=-1)
    q = torch.round(q * 4) / 4                                 # coarse values -> ties
    c = torch.round(c * 4) / 4
    targets = torch.randint(0, 23, (37,), generator=g)
    ql, cl = torch.randint(0, 3, (37,), generator=g), torch.randint(0, 3, (23,), generator=g)
    full_sim = q @ c.T
    full = ev.rank_metrics(ev.retrieval_ranks(full_sim, targets))
    full.update(ev.class_precision_at_k(full_sim, ql, cl))
    for chunk in (1, 5, 37, 1000):
        chunked = ev.retrieval_metrics(q, c, targets, query_labels=ql, cand_labels=cl, chunk_size=chunk)
        assert chunked == pytest.approx(full, abs=1e-12)


def test_constant_embedding_gets_no_better_than_chance():
    n = 50
    emb = torch.ones(n, 4) / 2.0
    m = ev.retrieval_metrics(emb, emb, torch.arange(n), query_labels=torch.arange(n) % 5,
                             cand_labels=torch.arange(n) % 5)
    for k in (1, 5, 10):
        assert m[f"R@{k}"] <= k / n            # chance is K / n; pessimistic ties give 0
        assert m[f"P@{k}"] <= 0.2              # chance is 1/5
    assert m["R@1"] < 1.0 and m["median_rank"] == n
    assert m["MRR"] <= sum(1 / r for r in range(1, n + 1)) / n


# --------------------------------------------------------------------------- (3) zero-shot

def fake_encoder(dim=16):
    """A deterministic 'text encoder': each string -> a fixed random unit vector."""
    import zlib

    def encode(texts):
        rows = [torch.randn(dim, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
                for t in texts]
        return F.normalize(torch.stack(rows), dim=-1)
    return encode


REPO = Path(__file__).resolve().parents[1]


def test_chexpert_grid_has_glorias_prompt_counts():
    prompts = ev.load_prompt_set("chexpert")["positive"]
    assert ev.load_prompt_set(str(REPO / "configs" / "prompts" / "chexpert.json"))["positive"] == prompts
    assert {c: len(p) for c, p in prompts.items()} == {
        "Atelectasis": 210, "Cardiomegaly": 15, "Consolidation": 192, "Edema": 18,
        "Pleural Effusion": 54}
    assert "mild subsegmental atelectasis at the mid lung zone" in prompts["Atelectasis"]
    assert "small left subpulmonic pleural effusion" in prompts["Pleural Effusion"]
    assert all(p == p.strip() and "  " not in p for ps in prompts.values() for p in ps)
    assert ev.load_prompt_set("chexpert") == ev.load_prompt_set("chexpert")   # fixed, not sampled


def test_zeroshot_classifier_is_invariant_to_prompt_order():
    encode = fake_encoder()
    prompts = ev.load_prompt_set("chexpert")["positive"]
    rng = np.random.default_rng(0)
    shuffled = {c: list(rng.permutation(p)) for c, p in reversed(list(prompts.items()))}
    shuffled = {c: shuffled[c] for c in prompts}                     # same class order
    a, b = ev.class_embeddings(encode, prompts), ev.class_embeddings(encode, shuffled)
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(a.norm(dim=-1), torch.ones(5), atol=1e-6)
    # normalise(mean(normalise(t))): prompt embeddings of any norm give the same class vector
    scaled = ev.class_embeddings(lambda t: 3.0 * encode(t), prompts)
    assert torch.allclose(a, scaled, atol=1e-6)


def test_zeroshot_uses_no_test_set_statistics():
    g = torch.Generator().manual_seed(0)
    class_emb = F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    y = torch.arange(100) % 5
    images = F.normalize(class_emb[y] + 0.8 * torch.randn(100, 16, generator=g), dim=-1)
    names = [f"c{i}" for i in range(5)]
    prompts = {c: [f"a {c} image"] for c in names}                   # one prompt per class

    def zeroshot(images, y):  # what zeroshot_nway does with the grid protocol
        encode = lambda texts: class_emb[[int(t[3]) for t in texts]]   # noqa: E731
        return ev.multiclass_metrics(images @ ev.class_embeddings(encode, prompts).T, y, names)
    full = zeroshot(images, y)
    # each image's prediction is the same whatever else is in the test set
    part = zeroshot(images[:7], y[:7])
    assert (part["predictions"] == full["predictions"][:7]).all()
    shifted = zeroshot(torch.cat([images, images[:1].repeat(50, 1)]),   # 50 extra copies
                       torch.cat([y, y[:1].repeat(50)]))
    assert (shifted["predictions"][:100] == full["predictions"]).all()
    assert 0.2 < full["accuracy"] <= 1.0
    cm = np.array(full["confusion_matrix"])
    assert cm.shape == (5, 5) and cm.sum() == 100
    assert full["per_class_recall"]["c0"] == pytest.approx(cm[0, 0] / cm[0].sum())
    assert full["macro_f1"] == pytest.approx(ev.macro_f1(y, full["predictions"], 5))


def test_zeroshot_binary_auroc_and_single_class_finding():
    g = torch.Generator().manual_seed(1)
    pos = F.normalize(torch.randn(2, 16, generator=g), dim=-1)
    neg = F.normalize(torch.randn(2, 16, generator=g), dim=-1)
    images = F.normalize(torch.randn(60, 16, generator=g), dim=-1)
    labels = np.zeros((60, 2))
    labels[:, 0] = (images @ (pos[0] - neg[0]) > 0).numpy()      # perfectly separable finding
    labels[5, 0] = np.nan                                         # uncertain: excluded
    out = ev.zeroshot_binary(images, labels, pos, neg, ["A", "B"])  # B: only negatives
    assert out["auroc"]["A"] == pytest.approx(1.0)
    assert math.isnan(out["auroc"]["B"]) and out["mean_auroc"] == pytest.approx(1.0)
    assert len(out["notes"]) == 1 and "B" in out["notes"][0]


def test_score_labels_blank_negative_uncertain_excluded():
    y = ev.score_labels(np.array([[1, 0, -1, np.nan]]))
    assert y[0, :2].tolist() == [1, 0] and math.isnan(y[0, 2]) and y[0, 3] == 0


def test_prompt_sets_negatives_and_json(tmp_path):
    s = ev.load_prompt_set("pneumonia")
    assert ev.negative_prompts(s, "Pneumonia")[0] == "no pneumonia"
    assert ev.negative_prompts({"negative": {}}, "Edema") == ["no edema"]
    assert ev.negative_prompts({"negative": {}}, "No Finding") is None   # no "no no finding"
    plain = tmp_path / "p.json"
    plain.write_text(json.dumps({"Edema": ["edema"], "Cardiomegaly": ["big heart"]}))
    assert ev.load_prompt_set(str(plain))["positive"]["Cardiomegaly"] == ["big heart"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"positive": {"Edema": []}}))
    with pytest.raises(ValueError, match="bad.json.*Edema"):
        ev.load_prompt_set(str(bad))
    with pytest.raises(FileNotFoundError, match="nope"):
        ev.load_prompt_set("nope")


def test_prompt_sets_are_found_from_the_repository_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"chexpert", "pneumonia", "synth"} <= set(ev.prompt_set_names())
    synth = ev.load_prompt_set("synth")
    assert synth == ev.load_prompt_set(str(REPO / "configs" / "prompts" / "synth.json"))
    assert synth["negative"]["Cardiomegaly"] == ["heart size is normal.", "normal heart size.", "no cardiomegaly."]
    assert "No Finding" not in synth["negative"] and len(synth["positive"]["Atelectasis"]) == 24
    with pytest.raises(FileNotFoundError, match="neither a shipped set"):   # a path is not a set name
        ev.load_prompt_set("prompts/synth")


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('["Edema", "no edema"]', "expected a JSON object .* got a list"),
    ('{"positive": {"Edema": ["edema"]}, "negatives": {}}', "unknown top-level keys ['negatives']"),
    ('{"positive": ["edema"]}', "'positive' must be an object"),
    ('{"Edema": "edema"}', "positive prompts of 'Edema': expected a non-empty list"),
    ("{}", "no classes"),
])
def test_malformed_prompt_file_is_an_error_naming_it(tmp_path, content, message):
    path = tmp_path / "mine.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"prompt file {path}: ") + message.replace("[", r"\[")):
        ev.load_prompt_set(str(path))


# --------------------------------------------------------------------------- (4) probe

def test_few_shot_sampling_is_seeded_and_balanced():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 3)) < 0.3).astype(float)
    y[rng.random((200, 3)) < 0.1] = np.nan
    a, b, c = ev.sample_shots(y, 4, 0), ev.sample_shots(y, 4, 0), ev.sample_shots(y, 4, 1)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert len(a) <= 2 * 4 * 3 and a.max() < 200
    for j in range(3):
        assert (y[a, j] == 1).sum() >= 4 and (y[a, j] == 0).sum() >= 4
    f = ev.sample_fraction(200, 0.1, 3)
    assert len(f) == 20 and f.tolist() == ev.sample_fraction(200, 0.1, 3).tolist()
    assert f.tolist() != ev.sample_fraction(200, 0.1, 4).tolist()
    assert len(ev.sample_fraction(50, 0.01, 0)) == 1


def make_probe_data(seed=0, n=(120, 40, 60), dim=12):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, 2, generator=g)
    splits = []
    for m in n:
        x = torch.randn(m, dim, generator=g)
        y = ((x @ w) > 0).double().numpy()
        splits.append((x, y))
    return splits


def test_linear_probe_learns_and_never_uses_the_test_split():
    train, valid, test = make_probe_data()
    kw = dict(label_names=["a", "b"], shots=(4,), fractions=(1.0,), seeds=range(2),
              weight_decays=(1e-3, 1.0))
    out = ev.linear_probe(train, valid, test, **kw)
    assert set(out) == {"4-shot", "100%"}
    assert out["100%"]["auroc_mean"] > 0.95 and out["4-shot"]["auroc_mean"] > 0.6
    assert len(out["4-shot"]["auroc_per_seed"]) == 2
    # a different test set changes nothing about training: same rows, same chosen weight decay
    other_test = (torch.randn(60, 12), np.random.default_rng(5).integers(0, 2, (60, 2)).astype(float))
    out2 = ev.linear_probe(train, valid, other_test, **kw)
    for key in out:
        assert out2[key]["weight_decay_per_seed"] == out[key]["weight_decay_per_seed"]
        assert out2[key]["train_rows_per_seed"] == out[key]["train_rows_per_seed"]


def test_logistic_regression_ignores_unknown_labels():
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    y = (x[:, :1] > 0).double().numpy()
    y_nan = y.copy()
    y_nan[:10] = np.nan
    a = ev.train_logistic_regression(x, y_nan, 0.01)
    b = ev.train_logistic_regression(x[10:], y[10:], 0.01)
    assert torch.allclose(a.weight, b.weight, atol=2e-3)     # same optimum, up to L-BFGS tolerance


def test_few_shot_per_class_sampling_is_seeded():
    y = np.array([0] * 10 + [1] * 3 + [2] * 20)
    a = ev.sample_shots_per_class(y, 4, 0, num_classes=4)
    assert a.tolist() == ev.sample_shots_per_class(y, 4, 0, 4).tolist()
    assert a.tolist() != ev.sample_shots_per_class(y, 4, 1, 4).tolist()
    assert [int((y[a] == c).sum()) for c in range(4)] == [4, 3, 4, 0]   # all 3 of class 1
    assert (np.diff(a) > 0).all()


def test_softmax_regression_reaches_the_optimum_of_its_objective():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 5, generator=g), torch.randint(0, 3, (60,), generator=g)
    head = ev.train_softmax_regression(x, y, 3, weight_decay=0.1)
    loss = F.cross_entropy(head(x), y) + 0.05 * head.weight.pow(2).sum()
    grads = torch.autograd.grad(loss, list(head.parameters()))
    assert max(float(gr.abs().max()) for gr in grads) < 1e-4          # a stationary point: the optimum


def make_multiclass_data(seed=0, n=(120, 40, 60), dim=12, classes=4):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, classes, generator=g)
    splits = []
    for m in n:
        x = torch.randn(m, dim, generator=g)
        splits.append((x, (x @ w).argmax(1).numpy()))
    return splits


def test_multiclass_probe_learns_and_never_uses_the_test_split():
    train, valid, test = make_multiclass_data()
    kw = dict(class_names=["a", "b", "c", "d"], shots=(1, 8), fractions=(1.0,), seeds=range(2),
              weight_decays=(1e-3, 1.0))
    out = ev.linear_probe_multiclass(train, valid, test, **kw)
    assert set(out) == {"1-shot", "8-shot", "100%"}
    assert out["100%"]["accuracy_mean"] > 0.8 and out["100%"]["accuracy_std"] == 0.0
    assert out["1-shot"]["train_rows_per_seed"] == [4, 4] and out["8-shot"]["train_rows_per_seed"] == [32, 32]
    assert out["8-shot"]["accuracy_mean"] > 0.25 + 0.2
    assert 0 < out["100%"]["macro_f1_mean"] <= 1 and len(out["8-shot"]["macro_f1_per_seed"]) == 2
    other_test = (torch.randn(60, 12), np.random.default_rng(5).integers(0, 4, 60))
    out2 = ev.linear_probe_multiclass(train, valid, other_test, **kw)
    for key in out:
        assert out2[key]["weight_decay_per_seed"] == out[key]["weight_decay_per_seed"]
        assert out2[key]["train_rows_per_seed"] == out[key]["train_rows_per_seed"]


# --------------------------------------------------------------------------- (5) retrieval

def test_retrieval_pool_one_image_per_study_and_distinct_texts():
    rows = [{"study_id": "s1", "text": "normal."}, {"study_id": "s1", "text": "normal."},
            {"study_id": "s2", "text": "effusion."}, {"study_id": "s3", "text": "normal."}]
    image_rows, texts, text_of_image = ev.retrieval_pool(rows)
    assert image_rows.tolist() == [0, 2, 3]
    assert texts == ["normal.", "effusion."] and text_of_image.tolist() == [0, 1, 0]


def test_identical_texts_are_not_punished_as_negatives():
    g = torch.Generator().manual_seed(0)
    text_emb = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    text_of_image = np.array([0, 0, 1, 2, 2, 2])
    image_emb = text_emb[text_of_image]                   # each image = its own text exactly
    out = ev.evaluate_retrieval(image_emb, text_emb, text_of_image,
                                image_classes=np.array([0, 0, 1, 2, 2, 2]), ks=(1,))
    assert out["i2t"]["R@1"] == 1.0 and out["t2i"]["R@1"] == 1.0
    assert out["i2t"]["P@1"] == 1.0 and out["n_texts"] == 3 and out["n_images"] == 6


# --------------------------------------------------------------------------- end to end



FAST = ["--shots", "1,4", "--fractions", "1", "--seeds", "2", "--weight-decays", "0.01,1"]


def strict_json(path):
    def no_nan(x):
        raise AssertionError(f"{path}: non-standard JSON constant {x}")
    return json.loads(Path(path).read_text(), parse_constant=no_nan)


def test_end_to_end_all_tasks_write_expected_json(trained, tmp_path):
    out = tmp_path / "results.json"
    ev.main(["--task", "all", "--checkpoint", str(trained["ckpt"]), "--out", str(out), *FAST])
    r = strict_json(out)
    assert r["step"] == 12 and r["checkpoint"] == str(trained["ckpt"])
    assert r["config"]["image_size"] == trained["cfg"].image_size
    assert {"train", "valid", "test", "test_5x"} <= set(r["split_sizes"])
    zs = r["zeroshot"]
    assert zs["prompt_set"] == "synth"
    mc = zs["multiclass"]
    assert mc["classes"] == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    assert 0 <= mc["accuracy"] <= 1 and 0 <= mc["macro_f1"] <= 1 and mc["chance_accuracy"] == 0.2
    assert np.array(mc["confusion_matrix"]).sum() == mc["n"] == r["split_sizes"]["test_5x"]
    assert set(mc["per_class_recall"]) == set(mc["classes"]) and set(mc["n_prompts"]) == set(mc["classes"])
    b = zs["binary"]
    assert b["split"] == "test" and "No Finding" not in b["auroc"]
    assert all(a is None or 0 <= a <= 1 for a in b["auroc"].values())
    assert len(b["notes"]) == sum(a is None for a in b["auroc"].values())
    fs = r["fewshot"]
    assert fs["shots"] == [1, 4] and fs["seeds"] == [0, 1] and fs["labels"]
    assert set(fs["results"]) == {"1-shot", "4-shot", "100%"}
    for res in fs["results"].values():
        assert {"auroc_mean", "auroc_std", "auroc_per_seed", "auroc_per_label",
                "weight_decay_per_seed", "train_rows_per_seed"} <= set(res)
        assert max(res["train_rows_per_seed"]) <= r["split_sizes"]["train"]
    rt = r["retrieval"]
    assert set(rt) == {"test", "test_5x"}
    for split, res in rt.items():
        for d in ("i2t", "t2i"):
            assert {"R@1", "R@5", "R@10", "MRR", "median_rank"} <= set(res[d])
        assert res["n_images"] <= r["split_sizes"][split] and res["n_texts"] <= res["n_images"]
    assert {"P@1", "P@5", "P@10"} <= set(rt["test_5x"]["i2t"])
    # the probe features were cached next to the checkpoint
    assert len(list(trained["ckpt"].parent.glob("features_*.pt"))) >= 4   # train valid test test_5x


def test_fewshot_draws_only_training_rows(trained, tmp_path, monkeypatch):
    seen = []
    original = ev.sample_shots

    def recording(labels, k, seed):
        rows = original(labels, k, seed)
        seen.append((len(labels), rows))
        return rows
    monkeypatch.setattr(ev, "sample_shots", recording)
    out = tmp_path / "f.json"
    ev.main(["--task", "fewshot", "--checkpoint", str(trained["ckpt"]), "--out", str(out), *FAST])
    n_train = strict_json(out)["split_sizes"]["train"]
    assert len(seen) == 2 * 2                                # 2 shot settings x 2 seeds
    assert all(n == n_train and rows.max() < n_train for n, rows in seen)


def test_cached_features_are_reused(trained, tmp_path, monkeypatch):
    ev.main(["--task", "retrieval", "--checkpoint", str(trained["ckpt"]), "--out", str(tmp_path / "a.json")])

    def fail(*a, **k):
        raise AssertionError("features should have come from the cache")
    monkeypatch.setattr(ev, "encode_images", fail)
    # no --checkpoint: the run of --config (its out_dir/ckpt.pt), i.e. the same file
    ev.main(["--task", "retrieval", "--config", str(trained["config"]), "--out", str(tmp_path / "b.json")])
    a, b = strict_json(tmp_path / "a.json"), strict_json(tmp_path / "b.json")
    assert b["checkpoint"] == str(trained["ckpt"]) and a["retrieval"] == b["retrieval"]


def test_random_checkpoint_gives_chance_level_table(trained, tmp_path):
    out = tmp_path / "random.json"
    cached = sorted(Path(trained["cfg"].out_dir).glob("features_*.pt"))
    ev.main(["--task", "zeroshot", "--checkpoint", "random", "--config", str(trained["config"]),
             "--out", str(out)])
    r = strict_json(out)
    assert r["checkpoint"] == "random" and r["step"] == 0
    assert sorted(Path(trained["cfg"].out_dir).glob("features_*.pt")) == cached   # nothing cached
    mc = r["zeroshot"]["multiclass"]
    # the table says what chance is (5 balanced classes present), and the untrained model sits
    # at it: within 3 binomial standard deviations of 1/5 over the n images of test_5x
    assert mc["chance_accuracy"] == 0.2 and mc["majority"]["accuracy"] == 0.2 and mc["classes_present"] == 5
    assert abs(mc["accuracy"] - 0.2) <= 3 * (0.2 * 0.8 / mc["n"]) ** 0.5
    assert abs(mc["auroc"] - 0.5) <= 0.25 and 0 < r["zeroshot"]["binary"]["mean_auroc"] < 1


def test_one_pass_embedding_equals_encode_image(trained):
    model, tokenizer, cfg, _ = msd.load_checkpoint(trained["ckpt"])
    manifest = msd.prepare_data(cfg)
    ds = data.PairDataset(manifest, "test", tokenizer, data.ImageTransform(cfg.image_size, train=False))
    feats = ev.encode_images(model, ds, batch_size=4)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        assert torch.allclose(feats["embed"], model.student.encode_image(images), atol=1e-5)
        assert torch.allclose(feats["features"], model.student.image_features(images), atol=1e-5)
    assert feats["labels"].shape == (len(ds), len(data.LABELS))


def test_prompt_file_and_labels_options(trained, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"positive": {c: [c.lower()] for c in
                                                ["Atelectasis", "Cardiomegaly", "Consolidation",
                                                 "Edema", "Pleural Effusion"]}}))
    out = tmp_path / "r.json"
    ev.main(["--task", "zeroshot", "--checkpoint", str(trained["ckpt"]), "--prompts", str(prompts),
             "--out", str(out)])
    r = strict_json(out)["zeroshot"]
    assert r["multiclass"]["n_prompts"] == {c: 1 for c in r["multiclass"]["classes"]}
    assert set(r["binary"]["auroc"]) <= {"Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                                         "Pleural Effusion"}
    with pytest.raises(ValueError, match="Nonexistent"):
        ev.main(["--task", "fewshot", "--checkpoint", str(trained["ckpt"]), "--labels",
                 "Edema,Nonexistent", "--out", str(tmp_path / "f.json"), *FAST])


def test_rsna_like_labels_only_manifest_without_5x_split(trained, tmp_path):
    """RSNA's layout: no report texts, one label ('Pneumonia'), the other labels blank."""
    rows = []
    for r in data.read_manifest(msd.prepare_data(trained["cfg"])):
        if r["split"] == "test_5x":
            continue
        positive = any(r[c] == "1" for c in ("Pneumonia", "Consolidation", "Lung Opacity"))
        rows.append({**{c: r[c] for c in data.REQUIRED_COLUMNS}, "image": r["_path"], "text": "",
                     "Pneumonia": 1 if positive else 0})
    manifest = tmp_path / "rsna" / "manifest.csv"
    data.write_manifest(manifest, rows)                          # all 14 columns, 13 blank
    out = tmp_path / "rsna.json"
    ev.main(["--task", "all", "--checkpoint", str(trained["ckpt"]), "--data", str(manifest),
             "--prompt-set", "pneumonia", "--out", str(out), *FAST])
    r = strict_json(out)
    assert r["zeroshot"]["multiclass"] is None and "test_5x" in " ".join(r["zeroshot"]["notes"])
    assert list(r["zeroshot"]["binary"]["auroc"]) == ["Pneumonia"]
    assert r["fewshot"]["labels"] == ["Pneumonia"]
    assert list(r["retrieval"]) == ["test"] and "skipped" in r["retrieval"]["test"]["note"]


# ---------------------------------------------------------------- efficiency and ablation


def test_efficiency_rows_cover_the_ablation_and_the_growth_curve():
    cfg = msd.Config(batch_size=8, accum_steps=4)
    rows = dict(ev.efficiency_configs(cfg, max_factor=8))
    clip_B = rows["CLIP end-to-end B=32"]
    assert clip_B.method == "clip" and clip_B.batch_size * clip_B.accum_steps == 32
    assert rows["CLIP naive accumulation 4x8"].accum_steps == 4
    exact = rows["CLIP exact accumulation 4x8"]
    assert exact.method == "clip" and exact.clip_accum == "exact" and exact.accum_steps == 4
    assert rows["MSD EMA per micro-batch 4x8"].ema_per_micro_batch
    assert rows["MSD no queue 4x8"].queue_size == 0 and rows["MSD alpha=0 4x8"].alpha == 0
    growth = [(c.method, c.batch_size, c.accum_steps) for n, c in rows.items() if n.startswith("growth")]
    assert growth == [(m, b, n) for k in (1, 2, 4, 8)
                      for m, b, n in (("clip", 8 * k, 1), ("clip", 8, k), ("msd", 8, k))]
    assert [rows[n].clip_accum for n in rows if n.startswith("growth: CLIP exact")] == ["exact"] * 4


def test_measure_step_counts_the_teacher_in_the_flops():
    """MSD's step runs the teacher forward on top of the student's forward and backward; the
    FLOP count (torch's FlopCounterMode, not a timing) must show it."""
    cfg = msd.load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.json")
    msd_row = ev.measure_step(replace(cfg, method="msd"), steps=1, vocab_size=50)
    clip_row = ev.measure_step(replace(cfg, method="clip"), steps=1, vocab_size=50)
    assert msd_row["effective_batch"] == clip_row["effective_batch"] == 16
    ratio = msd_row["flops_per_pair"] / clip_row["flops_per_pair"]
    assert 1.2 < ratio < 1.45          # forward ~ 1/3 of forward + backward
    assert msd_row["seconds_per_step"] > 0 and msd_row["peak_memory_mb"] > 0


def test_ablation_trains_evaluates_and_reuses_finished_runs(tmp_path, monkeypatch):
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"
    spec = {"base": str(tiny), "shared": {"progress": False, "max_steps": 3,
                                          "synth_dir": str(tmp_path / "synth")},
            "seeds": [0, 1], "eval": {"shots": [1], "fractions": [1.0], "seeds": 2},
            "runs": {"clip_b": {"method": "clip", "batch_size": 8, "accum_steps": 1}, "msd": {}}}
    (tmp_path / "abl.json").write_text(json.dumps(spec))
    args = ["--task", "ablation", "--ablation", str(tmp_path / "abl.json"),
            "--ablation-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "abl_out.json")]
    ev.main(args)
    r = strict_json(tmp_path / "abl_out.json")
    assert list(r["table"]) == ["random", "clip_b", "msd"]
    for name, row in r["table"].items():
        assert len(row["per_seed"]) == 2 and row["seeds"] == [0, 1]
        for key in ("zs_acc", "zs_f1", "zs_auroc", "probe_1-shot", "probe_100%", "i2t_R@1", "t2i_R@10"):
            mean, std = row[key]
            assert 0 <= mean <= 1 and std >= 0
    ckpt = msd.read_checkpoint(tmp_path / "runs" / "msd" / "seed1" / "ckpt.pt")
    assert ckpt["config"]["seed"] == 1 and ckpt["config"]["method"] == "msd"
    # a second call finds every run finished and trains nothing
    monkeypatch.setattr(msd, "pretrain", lambda cfg, **kw: pytest.fail(f"retrained {cfg.out_dir}"))
    ev.main(args)


def test_tuning_mode_reads_no_test_split(trained, tmp_path, monkeypatch):
    """--split valid --no-5x (the tuning protocol of configs/tuning.json) touches only valid."""
    seen = []
    original = ev.Evaluation.images

    def recording(self, split):
        seen.append(split)
        return original(self, split)
    monkeypatch.setattr(ev.Evaluation, "images", recording)
    out = tmp_path / "t.json"
    ev.main(["--task", "zeroshot", "--checkpoint", str(trained["ckpt"]), "--split", "valid",
             "--no-5x", "--out", str(out)])
    ev.main(["--task", "retrieval", "--checkpoint", str(trained["ckpt"]), "--split", "valid",
             "--no-5x", "--out", str(tmp_path / "r.json")])
    assert set(seen) == {"valid"}
    r = strict_json(tmp_path / "r.json")
    assert list(r["retrieval"]) == ["valid"]


# ------------------------------------------------------- any labelled split, bad input, bad model


def with_label_column(trained, tmp_path, name="label"):
    """The tiny synthetic manifest plus a column of class names: 'normal' / 'abnormal'."""
    rows = [{**r, "image": r["_path"], name: "normal" if r["No Finding"] == "1" else "abnormal"}
            for r in data.read_manifest(msd.prepare_data(trained["cfg"])) if r["split"] != "test_5x"]
    manifest = tmp_path / "labelled" / "manifest.csv"
    data.write_manifest(manifest, rows)
    return manifest


def test_label_column_zeroshot_prompts_default_missing_and_extra(trained, tmp_path, capsys):
    manifest = with_label_column(trained, tmp_path)
    base = ["--task", "zeroshot", "--checkpoint", str(trained["ckpt"]), "--data", str(manifest),
            "--label-column", "label", "--out", str(tmp_path / "z.json"), "--force"]
    r = ev.main(base + ["--split", "valid"])["zeroshot"]
    mc = r["multiclass"]
    assert mc["classes"] == ["abnormal", "normal"] and mc["split"] == "valid" and r["binary"] is None
    assert mc["n"] == sum(row["split"] == "valid" for row in data.read_manifest(manifest))
    assert mc["n_prompts"] == {"abnormal": 1, "normal": 1} and r["prompt_set"] == "class names"
    out = capsys.readouterr().out
    assert "zero-shot 2-way on valid" in out and "each class's one prompt is its own name" in out
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"normal": ["no acute process.", "the lungs are clear."],
                                   "abnormal": ["pleural effusion.", "consolidation."],
                                   "dog": ["a dog."]}))
    r = ev.main(base + ["--prompts", str(prompts)])["zeroshot"]
    assert r["multiclass"]["n_prompts"] == {"abnormal": 2, "normal": 2}
    assert "not used: ['dog']" in capsys.readouterr().out              # printed, not only written
    prompts.write_text(json.dumps({"normal": ["the lungs are clear."]}))
    with pytest.raises(ValueError, match=r"no prompts for the classes \['abnormal'\] of column 'label'"):
        ev.main(base + ["--prompts", str(prompts)])
    with pytest.raises(ValueError, match="no such column; its columns are .*'label'"):
        ev.main(base[:-5] + ["--label-column", "lable", "--out", str(tmp_path / "z.json"), "--force"])


def test_label_column_probe_and_retrieval_by_class(trained, tmp_path, capsys):
    manifest = with_label_column(trained, tmp_path)
    r = ev.main(["--task", "all", "--checkpoint", str(trained["ckpt"]), "--data", str(manifest),
                 "--label-column", "label", "--out", str(tmp_path / "a.json"), *FAST])
    fs = r["fewshot"]
    assert fs["kind"] == "multi-class" and fs["classes"] == ["abnormal", "normal"]
    assert fs["results"]["1-shot"]["train_rows_per_seed"] == [2, 2]
    assert fs["selection"] == "best accuracy on valid"
    assert {"P@1", "P@10"} <= set(r["retrieval"]["test"]["i2t"])
    assert "linear probe, 2 classes of column 'label'" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--labels picks CheXpert label columns"):
        ev.main(["--task", "fewshot", "--checkpoint", str(trained["ckpt"]), "--data", str(manifest),
                 "--label-column", "label", "--labels", "Edema", "--out", str(tmp_path / "b.json"), *FAST])


@pytest.mark.parametrize("task", ["zeroshot", "fewshot", "retrieval", "all", "pixel-probe"])
def test_unknown_split_is_an_error_listing_the_splits(trained, tmp_path, task):
    with pytest.raises(ValueError, match=r"no split 'tset'; its splits are \{'train'.*'test_5x'"):
        ev.main(["--task", task, "--checkpoint", str(trained["ckpt"]), "--config", str(trained["config"]),
                 "--split", "tset", "--out", str(tmp_path / "x.json"), *FAST])


def rsna_like(trained, tmp_path, name="rsna", positive=("Pneumonia", "Consolidation", "Lung Opacity")):
    rows = [{**{c: r[c] for c in data.REQUIRED_COLUMNS}, "image": r["_path"], "text": "",
             "Pneumonia": 1 if any(r[c] == "1" for c in positive) else 0}
            for r in data.read_manifest(msd.prepare_data(trained["cfg"])) if r["split"] != "test_5x"]
    manifest = tmp_path / name / "manifest.csv"
    data.write_manifest(manifest, rows)
    return manifest


def test_what_was_asked_but_cannot_be_computed_exits_non_zero(trained, tmp_path, capsys):
    manifest = rsna_like(trained, tmp_path)
    common = ["--checkpoint", str(trained["ckpt"]), "--data", str(manifest), "--out", str(tmp_path / "r.json"),
              "--force"]
    with pytest.raises(SystemExit, match="--task retrieval: test: split 'test' has no report texts"):
        ev.main(["--task", "retrieval", *common])
    assert strict_json(tmp_path / "r.json")["retrieval"]["test"]["note"]   # the JSON is still written
    # default prompts (GLoRIA's grid) have no Pneumonia and there is no test_5x: nothing to compute
    with pytest.raises(SystemExit, match="--task zeroshot: 5-way zero-shot skipped: no test_5x split"):
        ev.main(["--task", "zeroshot", *common])
    assert "zero-shot skipped: 5-way zero-shot skipped" in capsys.readouterr().out
    # prompts given but matching nothing: an error, never a silent no-op (also under --task all)
    prompts = tmp_path / "own.json"
    prompts.write_text(json.dumps({"cat": ["a cat"], "dog": ["a dog"]}))
    with pytest.raises(ValueError, match=r"none of their classes \['cat', 'dog'\] was used"):
        ev.main(["--task", "all", "--prompts", str(prompts), *common, *FAST])
    # --task all: a task that does not apply is skipped with its reason, the others run
    r = ev.main(["--task", "all", "--prompt-set", "pneumonia", *common, *FAST])
    assert r["zeroshot"]["binary"]["auroc"].keys() == {"Pneumonia"} and "note" in r["retrieval"]["test"]
    assert r["fewshot"]["labels"] == ["Pneumonia"]
    with pytest.raises(SystemExit, match="--task fewshot: no CheXpert label column has both classes"):
        ev.main(["--task", "fewshot", "--checkpoint", str(trained["ckpt"]), "--out", str(tmp_path / "f.json"),
                 "--data", str(rsna_like(trained, tmp_path, "negatives", positive=())), *FAST])
    assert "linear probe skipped: no CheXpert label column" in capsys.readouterr().out
    # options the task would ignore are refused by the parser
    for bad in (["--task", "retrieval", "--prompts", str(prompts)], ["--task", "fewshot", "--prompt-set", "synth"],
                ["--task", "zeroshot", "--prompts", str(prompts), "--prompt-set", "synth"],
                ["--task", "pixel-probe", "--label-column", "label"]):
        with pytest.raises(SystemExit) as e:
            ev.main(bad + common)
        assert e.value.code == 2


def test_nonfinite_model_is_an_error_not_chance(trained):
    args = ev.build_parser().parse_args(["--task", "zeroshot"])
    for part in ("vision_proj", "text_proj"):
        model, tokenizer, cfg, ckpt = msd.load_checkpoint(trained["ckpt"])
        with torch.no_grad():
            for p in getattr(model.student, part).parameters():
                p.fill_(float("nan"))
        evaluation = ev.Evaluation(model, tokenizer, cfg, msd.prepare_data(cfg), ckpt["step"])
        with pytest.raises(ValueError, match="not finite.*non-finite weights"):
            ev.run_zeroshot(evaluation, args)


def test_feature_cache_truncated_or_planted_is_recomputed(trained, tmp_path, monkeypatch):
    run = ["--task", "retrieval", "--no-5x", "--checkpoint", str(trained["ckpt"]), "--out", str(tmp_path / "r.json")]
    first = ev.main(run)["retrieval"]
    path = cache_path(trained["ckpt"], "test")
    good = path.read_bytes()
    loads, encodes = [], []
    real_load, real_encode = torch.load, ev.encode_images
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: (loads.append(k) if "features_" in str(f) else None)
                        or real_load(f, *a, **k))
    monkeypatch.setattr(ev, "encode_images", lambda *a, **k: encodes.append(1) or real_encode(*a, **k))
    marker = tmp_path / "payload_ran"
    for damaged in (good[: len(good) // 2], planted_payload(tmp_path, marker)):
        path.write_bytes(damaged)
        assert ev.main(run)["retrieval"] == first                    # recomputed, same numbers
        assert path.read_bytes() != damaged and real_load(path, weights_only=True).keys() == {
            "key", "features", "embed", "labels"}
    assert len(encodes) == 2 and not marker.exists()
    assert loads and all(k.get("weights_only") is True for k in loads)
    assert not list(path.parent.glob("*.tmp"))
    ev.main(run)
    assert len(encodes) == 2                                         # the rewritten cache is used
    # written atomically: a run killed while writing leaves the old file or none, never half of one
    path.unlink()
    real_save = torch.save

    def killed_while_writing(obj, f, *a, **k):
        Path(f).write_bytes(b"half a file")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        ev.main(run)
    assert not path.exists()
    monkeypatch.setattr(torch, "save", real_save)
    for leftover in path.parent.glob(f"{path.name}.*.tmp"):         # what the killed run left
        leftover.unlink()


def cache_path(ckpt_path, split, manifest=None):
    """Where Evaluation caches the features of a split of the checkpoint's (or that) manifest."""
    model, tokenizer, cfg, ckpt = msd.load_checkpoint(ckpt_path)
    manifest = manifest or msd.prepare_data(cfg)
    evaluation = ev.Evaluation(model, tokenizer, cfg, manifest, ckpt["step"], ckpt_path)
    return evaluation.cache.file(split, [r for r in evaluation.rows if r["split"] == split])[0]


class Planted:
    """Unpickling this would create a file: what a malicious 'feature cache' could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def planted_payload(tmp_path, marker):
    torch.save({"features": Planted(marker)}, tmp_path / "planted.pt")
    return (tmp_path / "planted.pt").read_bytes()


def test_pixel_probe_task(trained, tmp_path, capsys):
    r = ev.main(["--task", "pixel-probe", "--config", str(trained["config"]), "--epochs", "1",
                 "--out", str(tmp_path / "p.json")])
    assert r["split"] == "test" and r["auroc"] and set(r["auroc"]) <= set(data.LABELS)
    assert all(0 <= a <= 1 for a in r["auroc"].values())
    assert r["mean_auroc"] == pytest.approx(np.mean(list(r["auroc"].values())))
    assert "AUROC" in capsys.readouterr().out and strict_json(tmp_path / "p.json")["n_train"] == r["n_train"]


def test_retrieval_reports_the_report_level_and_the_exact_pair_recall():
    """Images 0 and 1 carry the same report: at report level either image's match is a hit;
    as exact pairs the other image's identical report ties with the own one and counts against."""
    image_emb = torch.eye(3)
    text_emb = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])   # two distinct reports
    text_of_image = np.array([0, 0, 1])
    r = ev.evaluate_retrieval(image_emb, text_emb, text_of_image, ks=(1,))
    assert r["i2t"]["R@1"] == 1.0 and r["t2i"]["R@1"] == 1.0      # identical reports: one candidate
    assert r["exact_pair"]["i2t"]["R@1"] == pytest.approx(1 / 3)  # images 0 and 1: a tie, pessimistic
    assert r["exact_pair"]["t2i"]["R@1"] == pytest.approx(1 / 3)


def test_tasks_run_from_python_with_plain_options(trained, tmp_path):
    """The core without the command line: options() holds the CLI's defaults, overridden by
    Python names, and a task run that way gives the numbers the CLI gives."""
    cli = ev.main(["--task", "retrieval", "--no-5x", "--checkpoint", str(trained["ckpt"]),
                   "--out", str(tmp_path / "r.json")])["retrieval"]
    model, tokenizer, cfg, ckpt = msd.load_checkpoint(trained["ckpt"])
    evaluation = ev.Evaluation(model.eval(), tokenizer, cfg, msd.prepare_data(cfg), ckpt["step"])
    plain = ev.run_retrieval(evaluation, ev.options(with_5x=False))
    assert plain["test"]["i2t"] == cli["test"]["i2t"] and plain["test"]["t2i"] == cli["test"]["t2i"]
    assert ev.options(split="valid").split == "valid" and ev.options().ks == (1, 5, 10)
    with pytest.raises(TypeError, match="unknown evaluate options \\['splitt'\\]"):
        ev.options(splitt="valid")
