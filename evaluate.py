"""
Evaluation of an MSD (or CLIP) checkpoint: zero-shot classification, linear probes, image-text
retrieval; and, needing no checkpoint, a supervised pixel probe and the efficiency and ablation
benchmarks. Every metric is hand-written below (no scikit-learn) and checked against
scikit-learn's values in tests/test_evaluate.py.

    python evaluate.py --task all                          # the run of configs/small.json
    python evaluate.py --task zeroshot --checkpoint random # same config, untrained: chance level
    python evaluate.py --task fewshot --checkpoint runs/x/ckpt.pt --data manifest.csv --out r.json
    python evaluate.py --task all --data my.csv --label-column label --prompts my_prompts.json

Reads top to bottom. Part I, evaluating a checkpoint:
    1. metrics       auroc, macro_f1, confusion_matrix, retrieval_ranks, rank_metrics, ...
    2. features      one batched no-grad pass per split, eval mode
    3. zero-shot     prompt files (configs/prompts/), class vector = normalise(mean(normalise(
                     prompt embeddings))); N-way argmax, and binary positive-vs-negative AUROC;
                     GLoRIA's and CheXzero's variants as options (docs/protocols.md)
    4. probes        frozen features + a linear head: multi-label (logistic, AUROC) or multi-class
                     (softmax, accuracy / macro-F1); k shots / label fractions; seeds; and the
                     pixel probe, a small CNN trained on the raw pixels (no checkpoint)
    5. retrieval     one image per study, de-duplicated texts, pessimistic ranks, chunked
    6. evaluation    Evaluation (model, manifest, each split's features) and the labels of the
                     two kinds below
    7. tasks         one run_* function per task, dispatched by TASKS; from Python:
                     run_zeroshot(Evaluation(...), options(split="valid"))
Part II, appendices, each read when it is needed:
    A. efficiency    time, memory and FLOPs of one optimizer step, MSD against CLIP
    B. ablation      train and evaluate every run of an ablation file over seeds
    C. command line  each task's printed table (print_*, PRINTERS); check options and the
                     results path, load a checkpoint, run the tasks, print, write the JSON once;
                     a user error is one line (cli)
    D. pictures      hand-written SVG: a run's training curves and evaluation bars, and the
                     README's pictures (memory growth, ablation bars) from results/
    E. feature cache a split's image features on disk beside the checkpoint, keyed by content

Two kinds of labels:
- CheXpert-style label columns (the 14 of data.LABELS a manifest carries): 1, 0, -1 (uncertain)
  or blank. For scoring, blank counts as negative and -1 is excluded; a finding whose test labels
  hold one class only gets AUROC NaN and is left out of the mean (with a note). Zero-shot is
  5-way on the split `test_5x` (exactly one positive of the five classes per image) and binary
  per finding on --split; the probe is multi-label.
- --label-column NAME: one column holding a class name per row (any strings; blank = unlabelled,
  left out with a note). Zero-shot is N-way over the column's classes on --split, with prompts
  from --prompts FILE.json keyed by the class names (or each class's own name); the probe is
  multi-class.

Prompt files: {class: [prompts]} or {"positive": {class: [prompts]}, "negative": {...}}. The
shipped sets are configs/prompts/{synth,chexpert,pneumonia}.json (--prompt-set NAME).
Anything asked for that cannot be computed is an error (exit status 1), never a silent no-op; a
task that `--task all` cannot apply to the data is skipped with its reason printed. The JSON (NaN
as null) holds the checkpoint's step and SHA-256, the config, the split sizes, the protocol (every
option that defines it) and each task's numbers and notes. It goes beside the checkpoint,
<run>/eval/<task>.json (default_out), or to --out FILE, and replaces only evaluate.py's results of
the same task and protocol (--force: of another), never any other file (replace_problem).
"""
import argparse
import collections
import fnmatch
import functools
import hashlib
import json
import math
import multiprocessing
import os
import platform
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import data
import msd

# =============================================================================
# Part I: evaluating a checkpoint
# =============================================================================

# -----------------------------------------------------------------------------
# 1. Metrics
# Plain numpy; inputs may be lists, numpy arrays or torch tensors.
# -----------------------------------------------------------------------------


def _np(x):
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def _midranks(x):
    """1-based ranks of x where tied values all get the mean of the ranks they span."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)                     # rank of the last member of each tie group
    return (last - (counts - 1) / 2.0)[inverse]


def auroc(labels, scores):
    """Area under the ROC curve = P(score of a positive > score of a negative), ties count 1/2.
    Mann-Whitney form: (R+ - n+(n+ + 1)/2) / (n+ n-), R+ = sum of the positives' midranks.
    NaN when one class is absent."""
    y, s = _np(labels).astype(float).ravel(), _np(scores).astype(float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"auroc: {y.shape[0]} labels but {s.shape[0]} scores")
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r_pos = _midranks(s)[pos].sum()
    return float((r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auroc_per_label(labels, scores):
    """(N, L) binary labels (NaN = excluded) and scores -> list of L AUROCs (NaN where undefined)."""
    y, s = _np(labels).astype(float), _np(scores).astype(float)
    keep = ~np.isnan(y)                                                        # (N, L)
    return [auroc(y[keep[:, j], j], s[keep[:, j], j]) for j in range(y.shape[1])]


def nanmean(values):
    v = [x for x in values if not math.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


def confusion_matrix(y_true, y_pred, num_classes):
    """C[i, j] = number of samples of true class i predicted as class j."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (_np(y_true).astype(int), _np(y_pred).astype(int)), 1)
    return cm


def macro_f1(y_true, y_pred, num_classes, labels=None):
    """Mean over ALL num_classes classes (or over the class indices `labels`) of F1 = 2TP / (2TP +
    FP + FN); 0 when the denominator is 0 (a class never present and never predicted still counts,
    as in sklearn with labels=...)."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(float)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1.mean() if labels is None else f1[np.asarray(labels, dtype=int)].mean())


def accuracy(y_true, y_pred):
    return float((_np(y_true) == _np(y_pred)).mean())


def balanced_accuracy(y_true, y_pred, labels):
    """Mean over the class indices `labels` (those present in y_true) of each class's recall: 1/K
    for a model that predicts one class whatever the image, however common that class is."""
    y, p = _np(y_true).astype(int), _np(y_pred).astype(int)
    return float(np.mean([(p[y == c] == c).mean() for c in labels]))


def ovr_auroc(y_true, prob, labels):
    """One-vs-rest AUROC averaged over the class indices `labels`: class c's positives are the
    images of class c, its score the column prob[:, c]. With two classes whose probabilities sum
    to 1 both columns give the binary AUROC."""
    y, s = _np(y_true).astype(int), _np(prob).astype(float)
    return nanmean([auroc(y == c, s[:, c]) for c in labels])


def _as_ids(targets, n_cand, cand_ids):
    targets = _np(targets).astype(np.int64)
    cand_ids = np.arange(n_cand) if cand_ids is None else _np(cand_ids).astype(np.int64)
    return targets, cand_ids


def retrieval_ranks(sim, targets, cand_ids=None):
    """Pessimistic 1-based rank of the first correct candidate of every query (row of sim).
    A candidate j is correct for query i when cand_ids[j] == targets[i] (default cand_ids =
    column index, i.e. targets[i] is the column of the positive). Ties count against the model:
    rank = 1 + #(wrong candidates scoring >= the best correct one), so a constant similarity
    gets the worst rank, never rank 1."""
    sim = torch.as_tensor(_np(sim), dtype=torch.float32)
    targets, cand_ids = _as_ids(targets, sim.shape[1], cand_ids)
    correct = torch.as_tensor(cand_ids[None, :] == targets[:, None])            # (Q, C)
    if not bool(correct.any(1).all()):
        raise ValueError("retrieval_ranks: a query has no correct candidate in the pool")
    best = sim.masked_fill(~correct, float("-inf")).amax(1, keepdim=True)       # (Q, 1)
    beaten_or_tied = (sim >= best) & ~correct
    return (1 + beaten_or_tied.sum(1)).numpy()


def rank_metrics(ranks, ks=(1, 5, 10)):
    """Recall@K (fraction of queries whose first correct candidate has rank <= K), MRR, median rank."""
    ranks = np.asarray(ranks)
    out = {f"R@{k}": float((ranks <= k).mean()) for k in ks}
    out["MRR"] = float((1.0 / ranks).mean())
    out["median_rank"] = float(np.median(ranks))
    return out


def class_precision_at_k(sim, query_labels, cand_labels, ks=(1, 5, 10)):
    """Class-level Precision@K: the fraction of the top K candidates whose class equals the
    query's class, averaged over queries. Among tied scores the wrong-class candidates are
    ranked first (pessimistic, as for the ranks)."""
    sim = _np(sim).astype(np.float64)
    q, c = _np(query_labels), _np(cand_labels)
    match = (c[None, :] == q[:, None])                                          # (Q, C)
    order = np.lexsort((match, -sim), axis=1)      # sort by score desc, then wrong class first
    top_match = np.take_along_axis(match, order[:, :max(ks)], axis=1)
    return {f"P@{k}": float(top_match[:, :k].mean()) for k in ks}


def retrieval_metrics(query_emb, cand_emb, targets, cand_ids=None, ks=(1, 5, 10),
                      query_labels=None, cand_labels=None, chunk_size=256):
    """All retrieval metrics of queries against the FULL candidate pool, computed chunk by chunk
    (chunk_size queries at a time) so memory grows with chunk_size x pool, not pool squared."""
    targets, cand_ids = _as_ids(targets, len(cand_emb), cand_ids)
    ranks, precisions = [], []
    for start in range(0, len(query_emb), chunk_size):
        sl = slice(start, start + chunk_size)
        sim = query_emb[sl] @ cand_emb.T                                        # (chunk, C)
        ranks.append(retrieval_ranks(sim, targets[sl], cand_ids))
        if query_labels is not None:
            p = class_precision_at_k(sim, _np(query_labels)[sl], cand_labels, ks)
            precisions.append((len(ranks[-1]), p))
    out = rank_metrics(np.concatenate(ranks), ks)
    if query_labels is not None:                   # chunk means -> mean over all queries
        n = sum(m for m, _ in precisions)
        out.update({key: sum(m * p[key] for m, p in precisions) / n for key in precisions[0][1]})
    return out


def score_labels(raw):
    """Manifest labels (1, 0, -1, NaN = blank) -> scoring labels: blank counts as negative (0),
    uncertain (-1) is excluded (NaN). Used for every test-set metric and for probe training."""
    y = _np(raw).astype(np.float64).copy()
    y[np.isnan(y)] = 0.0
    y[y == -1] = np.nan
    return y


# -----------------------------------------------------------------------------
# 2. Features
# The student encoders in eval mode (no dropout), no gradients, one pass per split.
# -----------------------------------------------------------------------------


@torch.no_grad()
def encode_texts(model, tokenizer, texts, batch_size=256):
    """list of N strings -> (N, embed_dim) L2-normalised student text embeddings."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask = tokenizer(list(texts[start:start + batch_size]))
        out.append(model.student.encode_text(ids.to(device), mask.to(device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_images(model, dataset, batch_size=64, num_workers=0):
    """Every image of `dataset` (a data.PairDataset with an eval transform) in ONE pass ->
    {"features": (N, vision_width) class tokens for the probe,
     "embed": (N, embed_dim) normalised g_v(features), identical to student.encode_image,
     "labels": (N, L) manifest labels (1, 0, -1, NaN = blank)}."""
    model.eval()
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers)
    feats, embeds, labels = [], [], []
    for images, _, _, _, y in loader:
        f = model.student.image_features(images.to(device))                    # (B, width)
        feats.append(f.float().cpu())
        # g_v on the same class token: encode_image without a second ViT pass
        embeds.append(F.normalize(model.student.vision_proj(f), dim=-1).float().cpu())  # (B, d)
        labels.append(y)
    return {"features": torch.cat(feats), "embed": torch.cat(embeds), "labels": torch.cat(labels)}


# -----------------------------------------------------------------------------
# 3. Zero-shot classification
# Prompts are fixed lists read from JSON; a prompt set is {"positive": {class: [prompts]},
# "negative": {class: [prompts]}} ("negative" optional).
# -----------------------------------------------------------------------------

# By default every prompt is used and nothing is sampled; --zeroshot-protocol gloria and
# --binary-protocol chexzero are the literature's variants (docs/protocols.md).

PROMPTS_DIR = Path(__file__).resolve().parent / "configs" / "prompts"   # not the working directory
# --zeroshot-protocol: how N-way zero-shot turns prompts into class scores (docs/protocols.md)
ZEROSHOT_PROTOCOLS = {
    "grid": "every prompt; class vector normalise(mean(normalised prompt embeddings)); argmax of "
            "the cosine, each image on its own",
    "gloria": "GLoRIA: --prompts-per-class prompts drawn per class with --prompt-seed; class score "
              "= the highest cosine over them; each class's scores z-scored over the images; argmax"}
# --binary-protocol: the prompts of binary zero-shot and its score
BINARY_PROTOCOLS = {
    "prompts": "the prompt set's positives against its negatives (else 'no <finding>'), mean class "
               "vectors; score = difference of the two cosines",
    "chexzero": "CheXzero: the pair ('<finding>', 'no <finding>'); softmax over the two cosines "
                "(no temperature); AUROC of the positive probability"}


def prompt_set_names():
    """The shipped prompt sets: configs/prompts/<name>.json."""
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.json"))


def load_prompt_set(name_or_path):
    """A shipped set by name (configs/prompts/NAME.json) or a JSON file of your own, either
        {class: [prompt, ...], ...}                                  (positive prompts only) or
        {"positive": {class: [...]}, "negative": {class: [...]}, "about": "a description"}
    -> {"positive": {...}, "negative": {...}}. Every list must hold non-empty strings; anything
    else is an error naming the file."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = PROMPTS_DIR / f"{name_or_path}.json"
        if path.name != str(name_or_path) or not shipped.is_file():
            raise FileNotFoundError(f"prompt set {str(name_or_path)!r}: neither a shipped set "
                                    f"({', '.join(prompt_set_names())}) nor a JSON file")
        path = shipped
    raw = data.read_json(path, f"prompt file {path}")      # a class given twice is an error, too
    if not isinstance(raw, dict):
        raise data.InputError(f"prompt file {path}: expected a JSON object {{class: [prompts]}} or "
                              f"{{\"positive\": ..., \"negative\": ...}}, got a {type(raw).__name__}")
    if "positive" in raw:
        unknown = sorted(set(raw) - {"positive", "negative", "about"})
        if unknown:
            raise data.InputError(f"prompt file {path}: unknown top-level keys {unknown}; expected "
                                  f"'positive', 'negative' (optional), 'about' (optional)")
        prompts = {"positive": raw["positive"], "negative": raw.get("negative", {})}
    else:
        prompts = {"positive": raw, "negative": {}}
    for part, by_class in prompts.items():
        if not isinstance(by_class, dict):
            raise data.InputError(f"prompt file {path}: {part!r} must be an object {{class: [prompts]}}, "
                                  f"got a {type(by_class).__name__}")
        for cls, lst in by_class.items():
            if not (isinstance(lst, list) and lst and all(isinstance(p, str) and p for p in lst)):
                raise data.InputError(f"prompt file {path}: {part} prompts of {cls!r}: expected a "
                                      f"non-empty list of non-empty strings, got {lst!r}")
    if not prompts["positive"]:
        raise data.InputError(f"prompt file {path}: no classes")
    return prompts


def negative_prompts(prompt_set, finding):
    """The negative prompts of a finding: given ones, else "no <finding>" (CheXzero). None for
    "No Finding" without given negatives ("no no finding" is a double negation)."""
    if finding in prompt_set.get("negative", {}):
        return prompt_set["negative"][finding]
    return None if finding == "No Finding" else [f"no {finding.lower()}"]


def binary_prompt_pairs(prompt_set, findings, protocol):
    """{finding: (positive prompts, negative prompts)} of binary zero-shot, by --binary-protocol:
    "prompts" takes the set's prompts (findings without them are left out); "chexzero" the
    pair ("<finding>", "no <finding>") whatever the set holds. "No Finding" is left out of
    chexzero, and of "prompts" unless the set gives its negatives ("no no finding")."""
    if protocol == "chexzero":
        return {f: ([f.lower()], [f"no {f.lower()}"]) for f in findings if f != "No Finding"}
    return {f: (prompt_set["positive"][f], negative_prompts(prompt_set, f)) for f in findings
            if f in prompt_set["positive"] and negative_prompts(prompt_set, f) is not None}


def sample_prompts(prompts_by_class, n, seed):
    """GLoRIA's draw: n prompts of each class without replacement (all of a class that has
    fewer), by one random.Random(seed) taken through the classes in the given order. This is
    Python's random.sample as GLoRIA's prompt generator calls it, so on the shipped chexpert
    grid (GLoRIA's order) seed 6, the seed GLoRIA's module sets, draws GLoRIA's prompts."""
    rng = random.Random(seed)
    return {c: rng.sample(prompts, min(n, len(prompts))) for c, prompts in prompts_by_class.items()}


def max_prompt_similarity(encode, image_emb, prompts_by_class):
    """(N, C): the score of class k for an image v is max_p cos(v, t_p) over the class's prompts,
    as GLoRIA's code computes it (its comment says "average", the code takes the max)."""
    columns = []
    for prompts in prompts_by_class.values():
        t = F.normalize(encode(list(prompts)), dim=-1)                          # (n_prompts, d)
        columns.append((image_emb @ t.T).max(1).values)                         # (N,)
    return torch.stack(columns, 1)                                              # (N, C)


def zscore_per_class(scores):
    """(N, C) -> each class's column standardised over the N images, (s - mean) / std with the
    population std (numpy's default, which GLoRIA uses). A prediction then depends on the other
    images evaluated. A column of equal scores (one image, say) is only centred."""
    std = scores.std(0, correction=0)                                          # (C,)
    return (scores - scores.mean(0)) / torch.where(std > 0, std, torch.ones_like(std))


def class_embeddings(encode, prompts_by_class):
    """One row per class (dict order): c_k = normalise(mean_p normalise(t_p)) over ALL its prompts.
    `encode` maps a list of strings to (n, d) text embeddings. A mean: prompt order is irrelevant."""
    rows = []
    for name, prompts in prompts_by_class.items():
        t = F.normalize(encode(list(prompts)), dim=-1)                          # (n_prompts, d)
        rows.append(F.normalize(t.mean(0), dim=-1))
    return torch.stack(rows)                                                    # (C, d)


def multiclass_metrics(scores, y_true, class_names):
    """(N, C) class scores -> prediction argmax_k per image; label_metrics, what a model must
    beat on these images (class_baselines), per-class recall, confusion matrix."""
    pred = torch.as_tensor(scores).argmax(1).numpy()                           # (N,)
    y_true = _np(y_true).astype(int)
    cm = confusion_matrix(y_true, pred, len(class_names))
    recall = {c: float(cm[i, i] / cm[i].sum()) if cm[i].sum() else float("nan")
              for i, c in enumerate(class_names)}
    return {"n": int(len(y_true)), "classes": list(class_names),
            **label_metrics(y_true, scores, len(class_names)), **class_baselines(y_true, class_names),
            "per_class_recall": recall, "confusion_matrix": cm.tolist(), "predictions": pred}


LABEL_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")   # of label_metrics


def label_metrics(y_true, scores, num_classes):
    """(N, C) class scores of N images of classes y_true -> accuracy, balanced accuracy, macro-F1
    and one-vs-rest AUROC (of softmax(scores): a probe's probabilities; for zero-shot cosines the
    softmax at temperature 1, as CheXzero's pair_probability), each over the classes PRESENT in
    y_true (a class absent from the images has no recall, F1 or AUROC). The prediction is the
    argmax."""
    scores = torch.as_tensor(scores).double()           # exact: the argmax of the scores as given
    y, pred = _np(y_true).astype(int), scores.argmax(1).numpy()
    present = np.unique(y)
    return {"accuracy": accuracy(y, pred), "balanced_accuracy": balanced_accuracy(y, pred, present),
            "macro_f1": macro_f1(y, pred, num_classes, present),
            "auroc": ovr_auroc(y, scores.softmax(1).numpy(), present)}


def class_baselines(y_true, class_names):
    """What a model must beat on these images: the class counts; chance, 1/K over the K classes
    PRESENT (not over every class the column has); and the label_metrics of the majority-class
    predictor (accuracy = the majority's share, balanced accuracy 1/K, AUROC 0.5)."""
    y = _np(y_true).astype(int)
    counts = np.bincount(y, minlength=len(class_names))
    majority = int(counts.argmax())
    always_majority = np.eye(len(class_names))[np.full(len(y), majority)]    # (N, C) one-hot
    return {"class_counts": dict(zip(class_names, counts.tolist())),
            "classes_present": int((counts > 0).sum()), "chance_accuracy": 1.0 / int((counts > 0).sum()),
            "majority_class": class_names[majority],
            "majority": label_metrics(y, always_majority, len(class_names))}


def pair_probability(image_emb, pos_emb, neg_emb):
    """(N, F) CheXzero's score: p = exp(v.c+) / (exp(v.c+) + exp(v.c-)), the softmax over the
    pair's two cosines at temperature 1, as its code computes it."""
    return torch.stack([image_emb @ pos_emb.T, image_emb @ neg_emb.T]).softmax(0)[0]


def zeroshot_binary(image_emb, labels, pos_emb, neg_emb, findings, probability=False):
    """CheXzero style: p = softmax(v.c+ / tau, v.c- / tau)[0] per finding. p is monotone in
    v.c+ - v.c-, so by default that difference is the score (AUROC does not depend on tau);
    probability=True scores with pair_probability itself (the same AUROC up to float ties).
    labels: (N, F) scoring labels (score_labels: NaN excluded)."""
    score = (pair_probability(image_emb, pos_emb, neg_emb) if probability
             else image_emb @ pos_emb.T - image_emb @ neg_emb.T).numpy()          # (N, F)
    per = dict(zip(findings, auroc_per_label(labels, score)))
    notes = [f"{f}: only one class present in the labels, AUROC NaN, left out of the mean"
             for f, a in per.items() if math.isnan(a)]
    return {"auroc": per, "mean_auroc": nanmean(per.values()), "notes": notes,
            "n_positive": {f: int((_np(labels)[:, j] == 1).sum()) for j, f in enumerate(findings)}}


# -----------------------------------------------------------------------------
# 4. Probes
# Frozen features and one linear layer trained with L-BFGS; then the pixel probe, a small CNN
# trained on the raw pixels, which asks whether the labels are in the images at all.
# -----------------------------------------------------------------------------

# The linear probe (few-shot) is multi-label (one sigmoid per CheXpert label, AUROC) or
# multi-class (one softmax over the classes of a label column, accuracy and macro-F1).

WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def sample_shots(labels, k, seed):
    """k-shot multi-label sampling: for each label in turn, add random rows until k positives
    and k negatives of it are in the set (rows drawn for earlier labels count; all of them when
    fewer exist). labels: (N, L) of the TRAIN split only, NaN = unknown. Seeded: the same seed
    always gives the same rows. Returns sorted row indices (at most 2 k L of them)."""
    y = _np(labels)
    rng = np.random.default_rng([seed, k])
    chosen = np.zeros(len(y), dtype=bool)
    for j in range(y.shape[1]):
        for value in (1.0, 0.0):
            missing = k - int((y[chosen, j] == value).sum())
            pool = np.flatnonzero((y[:, j] == value) & ~chosen)
            chosen[rng.permutation(pool)[:max(missing, 0)]] = True
    return np.flatnonzero(chosen)


def sample_shots_per_class(classes, k, seed, num_classes):
    """k-shot multi-class sampling: k random rows of each class (all of them when fewer exist).
    classes: (N,) class indices of the TRAIN split only. Seeded as sample_shots. Sorted indices."""
    y = _np(classes)
    rng = np.random.default_rng([seed, k])
    chosen = [rng.permutation(np.flatnonzero(y == c))[:k] for c in range(num_classes)]
    return np.sort(np.concatenate(chosen))


def sample_fraction(n, fraction, seed):
    """A seeded random `fraction` of n training rows (at least one), sorted."""
    m = max(1, int(round(fraction * n)))
    rng = np.random.default_rng([seed, int(fraction * 1e6)])
    return np.sort(rng.permutation(n)[:m])


def _fit_linear(x, out_dim, data_loss, weight_decay, max_iter):
    """Minimise data_loss(head(x)) + weight_decay / 2 * |W|^2 (bias not decayed) over a linear
    head started at zero. Convex, so L-BFGS from zero is deterministic."""
    head = torch.nn.Linear(x.shape[1], out_dim)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = data_loss(head(x)) + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def train_logistic_regression(x, y, weight_decay, max_iter=100):
    """One sigmoid per label: minimise mean over known (i, j) of BCE(w_j . x_i + b_j, y_ij)
    + weight_decay / 2 * |W|^2. y: (N, L) with NaN = unknown (no target)."""
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    known = ~torch.isnan(y)
    target = torch.nan_to_num(y)

    def bce(logits):
        per_entry = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return per_entry[known].sum() / known.sum().clamp(min=1)

    return _fit_linear(x, y.shape[1], bce, weight_decay, max_iter)


def train_softmax_regression(x, y, num_classes, weight_decay, max_iter=100):
    """One softmax over num_classes: minimise mean cross-entropy(W x_i + b, y_i)
    + weight_decay / 2 * |W|^2. y: (N,) class indices."""
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(_np(y), dtype=torch.long)
    return _fit_linear(x, num_classes, lambda logits: F.cross_entropy(logits, y), weight_decay,
                       max_iter)


@torch.no_grad()
def probe_scores(head, x):
    return head(torch.as_tensor(x, dtype=torch.float32)).numpy()


def _standardised(train, valid, test):
    """Features of the three splits, standardised with the mean / std of all training-split
    features (no labels involved)."""
    xs = {name: torch.as_tensor(s[0], dtype=torch.float32) for name, s in
          (("train", train), ("valid", valid), ("test", test))}
    mu, sd = xs["train"].mean(0), xs["train"].std(0) + 1e-6
    return {name: (x - mu) / sd for name, x in xs.items()}


def _mean_std(values):
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def probe_runs(shots, fractions, draw_shots, n_train, seeds, weight_decays, fit, on_valid,
               on_test):
    """The loop both probes share. For every setting (k shots: draw_shots(k, seed), or a fraction
    of the n_train training rows) and seed: fit(rows, decay) one head per weight decay, keep the
    best by on_valid(head) (NaN counts as worst; ties: the first, smaller decay), score it with
    on_test(head) -> {name: (test scores, chosen decays, training rows), per seed}."""
    settings = [(f"{k}-shot", lambda seed, k=k: draw_shots(k, seed)) for k in shots]
    settings += [(f"{f:.0%}", lambda seed, f=f: sample_fraction(n_train, f, seed))
                 for f in fractions]
    runs = {}
    for name, draw in settings:
        scores, chosen, n_rows = [], [], []
        for seed in seeds:
            rows, best = draw(seed), None
            for wd in weight_decays:
                head = fit(rows, wd)
                score = on_valid(head)
                score = -math.inf if math.isnan(score) else score
                if best is None or score > best[0]:
                    best = (score, wd, head)
            scores.append(on_test(best[2]))
            chosen.append(best[1])
            n_rows.append(int(len(rows)))
        runs[name] = (scores, chosen, n_rows)
    return runs


def linear_probe(train, valid, test, label_names, shots=(1, 2, 4, 8, 16),
                 fractions=(0.01, 0.1, 1.0), seeds=range(5), weight_decays=WEIGHT_DECAYS):
    """Multi-label. train / valid / test: (features (N, D), scoring labels (N, L)). For every
    setting (k shots, or a fraction of the training labels) and seed: draw training rows from
    `train` only, fit one head per weight decay, keep the one with the best mean AUROC on
    `valid`, score it on `test`. 100 % uses every training row, so its seeds agree (std 0)."""
    xs = _standardised(train, valid, test)
    runs = probe_runs(shots, fractions, lambda k, seed: sample_shots(train[1], k, seed),
                      len(train[1]), seeds, weight_decays,
                      lambda rows, wd: train_logistic_regression(xs["train"][rows], train[1][rows], wd),
                      lambda head: nanmean(auroc_per_label(valid[1], probe_scores(head, xs["valid"]))),
                      lambda head: auroc_per_label(test[1], probe_scores(head, xs["test"])))
    results = {}
    for name, (per_label, chosen_wd, n_rows) in runs.items():
        per_seed = [nanmean(a) for a in per_label]
        mean, std = _mean_std(per_seed)
        results[name] = {
            "auroc_mean": mean, "auroc_std": std, "auroc_per_seed": per_seed,
            "auroc_per_label": {l: nanmean([a[j] for a in per_label]) for j, l in enumerate(label_names)},
            "weight_decay_per_seed": chosen_wd, "train_rows_per_seed": n_rows}
    return results


def linear_probe_multiclass(train, valid, test, class_names, shots=(1, 2, 4, 8, 16),
                            fractions=(0.01, 0.1, 1.0), seeds=range(5), weight_decays=WEIGHT_DECAYS):
    """Multi-class. train / valid / test: (features (N, D), class indices (N,)). The protocol of
    linear_probe with a softmax head: k shots PER CLASS or a fraction of the training rows, one
    head per weight decay, the one with the best accuracy on `valid` (ties: the smaller decay)
    scored on `test` -> label_metrics (over the classes present in `test`), mean and std over seeds."""
    C = len(class_names)
    xs = _standardised(train, valid, test)
    y = {name: _np(s[1]).astype(np.int64) for name, s in (("train", train), ("valid", valid), ("test", test))}
    runs = probe_runs(shots, fractions,
                      lambda k, seed: sample_shots_per_class(y["train"], k, seed, C),
                      len(y["train"]), seeds, weight_decays,
                      lambda rows, wd: train_softmax_regression(xs["train"][rows], y["train"][rows], C, wd),
                      lambda head: accuracy(y["valid"], probe_scores(head, xs["valid"]).argmax(1)),
                      lambda head: label_metrics(y["test"], probe_scores(head, xs["test"]), C))
    results = {}
    for name, (per_seed, chosen_wd, n_rows) in runs.items():
        results[name] = {"weight_decay_per_seed": chosen_wd, "train_rows_per_seed": n_rows}
        for metric in LABEL_METRICS:    # accuracy_mean, accuracy_std, accuracy_per_seed, ...
            values = [m[metric] for m in per_seed]
            mean, std = _mean_std(values)
            results[name].update({f"{metric}_mean": mean, f"{metric}_std": std,
                                  f"{metric}_per_seed": values})
    return results


def pixel_probe(manifest, split="test", epochs=8, image_size=64, seed=0):
    """Are the labels learnable from the pixels? A small CNN, trained from scratch on the train
    split (labels 1 against 0 / blank; uncertain -1 masked out) -> per-label AUROC on `split`,
    for every CheXpert label with both classes there. Needs no checkpoint: it is the ceiling an
    image encoder could reach on this data, not a measure of one."""
    torch.manual_seed(seed)
    rows = data.read_manifest(manifest)

    def tensors(split):
        part = [r for r in rows if r["split"] == split]
        x = np.stack([np.asarray(data.load_image(r["_path"]).resize((image_size, image_size), Image.BILINEAR))
                      for r in part]).astype(np.float32) / 255.0
        y = np.array([[{"1": 1.0, "-1": math.nan}.get(r.get(n, ""), 0.0) for n in data.LABELS] for r in part])
        return torch.from_numpy((x[:, None] - 0.5) / 0.5), torch.tensor(y, dtype=torch.float32)

    (xtr, ytr), (xte, yte) = tensors("train"), tensors(split)
    net = torch.nn.Sequential(  # (B,1,64,64) -> (B,8,32,32) -> (B,16,16,16) -> (B,32,8,8) -> (B,14)
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(image_size // 32),
        torch.nn.Flatten(), torch.nn.Linear(32 * 64, len(data.LABELS)))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    for epoch in range(epochs):
        for idx in torch.randperm(len(xtr)).split(64):
            logits, y = net(xtr[idx]), ytr[idx]
            known = ~torch.isnan(y)  # uncertain labels carry no target
            loss = F.binary_cross_entropy_with_logits(logits[known], y[known])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        scores = net(xte).numpy()
    per_label, n_positive = {}, {}
    for j, name in enumerate(data.LABELS):
        known = ~np.isnan(yte[:, j].numpy())
        if 0 < yte[known, j].sum() < known.sum():
            per_label[name] = float(auroc(yte[known, j].numpy(), scores[known, j]))
            n_positive[name] = int((yte[:, j] == 1).sum())
    return {"split": split, "epochs": epochs, "image_size": image_size, "seed": seed,
            "n_train": len(xtr), "n_test": len(xte), "auroc": per_label, "n_positive": n_positive,
            "mean_auroc": float(np.mean(list(per_label.values()))) if per_label else float("nan")}


# -----------------------------------------------------------------------------
# 5. Retrieval
# Over the full pool: one image per study, identical texts collapsed.
# -----------------------------------------------------------------------------


def retrieval_pool(rows):
    """rows (one split, dataset order) -> (image_rows: the first row of each study,
    texts: the distinct report texts, text_of_image: for each kept image its text's index)."""
    seen, image_rows = set(), []
    for i, r in enumerate(rows):
        if r["study_id"] not in seen:
            seen.add(r["study_id"])
            image_rows.append(i)
    index, texts, text_of_image = {}, [], []
    for i in image_rows:
        t = rows[i]["text"]
        if t not in index:
            index[t] = len(texts)
            texts.append(t)
        text_of_image.append(index[t])
    return np.array(image_rows), texts, np.array(text_of_image)


def check_pool(manifest, split, rows, image_rows, texts):
    """A pool of one image or of one text makes every recall 1 by construction: an error naming
    the manifest column that collapsed it (study_id: one image per study; text: identical
    reports are one candidate) and the count."""
    for column, kept, unit, fix in (
            ("study_id", image_rows, "image per study", "give each study its own study_id"),
            ("text", texts, "candidate per distinct report text", "retrieval needs distinct reports")):
        if len(kept) < 2:
            values = sorted({r[column] for r in rows})
            raise data.InputError(f"retrieval on split {split!r}: the {len(rows)} rows of {manifest} in "
                                  f"that split have {len(values)} distinct value(s) of column {column!r} "
                                  f"({values[0][:40]!r}), and retrieval keeps one {unit}, so its pool is "
                                  f"one and every recall would be 1; {fix}")


def evaluate_retrieval(image_emb, text_emb, text_of_image, image_classes=None,
                       ks=(1, 5, 10), chunk_size=256):
    """Report level (i2t, t2i): the candidates are the split's DISTINCT report texts, so an
    identical report is the same candidate. image->text: each image's one correct candidate is
    its text's index; text->image: the queries are the distinct texts, correct = every image
    carrying that text. With image_classes, class-level Precision@K too (a text's class = the
    class of its first image). Exact pair (exact_pair): every image's own report is a candidate
    of its own and the only hit; an identical report of another image ties with it and counts
    against it (ranks are pessimistic), as does that image for the report's query."""
    text_classes = None
    if image_classes is not None:
        image_classes = _np(image_classes)
        text_classes = np.full(len(text_emb), -1, dtype=np.int64)
        for t, c in zip(text_of_image, image_classes):
            if text_classes[t] == -1:                          # the first image's class
                text_classes[t] = c
    i2t = retrieval_metrics(image_emb, text_emb, text_of_image, None, ks,
                            image_classes, text_classes, chunk_size)
    t2i = retrieval_metrics(text_emb, image_emb, np.arange(len(text_emb)), text_of_image, ks,
                            text_classes, image_classes, chunk_size)
    own = text_emb[text_of_image]                              # (n_images, d): each image's report
    pairs = np.arange(len(image_emb))
    exact_pair = {"i2t": retrieval_metrics(image_emb, own, pairs, None, ks, chunk_size=chunk_size),
                  "t2i": retrieval_metrics(own, image_emb, pairs, None, ks, chunk_size=chunk_size)}
    return {"n_images": int(len(image_emb)), "n_texts": int(len(text_emb)), "i2t": i2t, "t2i": t2i,
            "exact_pair": exact_pair}


# -----------------------------------------------------------------------------
# 6. What every task needs: Evaluation, the labels
# Evaluation holds what every task needs (its image features are kept on disk by FeatureCache,
# appendix E); then the labels: the 5-way CheXpert classes of test_5x, and the classes of a
# --label-column.
# -----------------------------------------------------------------------------


class Evaluation:
    """What every task needs: model, tokenizer, config, the manifest (rows, columns, CheXpert label
    columns, split sizes), and each split's image features, kept in memory and on disk."""

    def __init__(self, model, tokenizer, cfg, manifest, step, checkpoint=None, batch_size=64,
                 checkpoint_sha256=None, skip_bad=False):
        self.model, self.tokenizer, self.cfg, self.step = model, tokenizer, cfg, step
        self.manifest, self.checkpoint, self.batch_size = Path(manifest), checkpoint, batch_size
        self.skip_bad, self.skipped = skip_bad, []     # --skip-bad: bad rows counted, listed, left out
        self.rows = data.read_manifest(self.manifest, skip_bad=skip_bad, skipped=self.skipped)
        if not self.rows:
            raise data.InputError(f"{self.manifest}: the manifest has no rows")
        self.columns = [c for c in self.rows[0] if not c.startswith("_")]
        self.label_names = [c for c in data.LABELS if c in self.columns]  # those the CSV has
        self.split_sizes = dict(collections.Counter(r["split"] for r in self.rows))
        self.cache = FeatureCache(checkpoint, self.manifest, cfg.image_size, len(self.label_names),
                                  checkpoint_sha256)
        self._images = {}

    def check_split(self, split, purpose="--split"):
        """An unknown split is an error that lists the manifest's splits."""
        if not self.split_sizes.get(split):
            raise data.InputError(f"{purpose}: {self.manifest} has no split {split!r}; its splits are "
                                  f"{self.split_sizes}")

    def dataset(self, split):
        self.check_split(split)
        return data.PairDataset(self.manifest, split, self.tokenizer,
                                data.ImageTransform(self.cfg.image_size, train=False),
                                label_names=self.label_names, skip_bad=self.skip_bad)

    def images(self, split):
        """{"features", "embed", "labels" (manifest values), "rows"} of one split."""
        if split not in self._images:
            dataset = self.dataset(split)
            path, key = self.cache.file(split, dataset.rows)
            feats = self.cache.load(path, len(dataset), key)
            if feats is None:
                feats = encode_images(self.model, dataset, self.batch_size, self.cfg.num_workers)
                self._check_finite(feats["embed"], f"image embeddings of split {split!r}")
                self._check_finite(feats["features"], f"image features of split {split!r}")
                self.cache.save(path, key, feats)
            self._images[split] = {**feats, "rows": dataset.rows}
        return self._images[split]

    def text_embeddings(self, texts):
        """(N, embed_dim) normalised student text embeddings of N strings."""
        emb = encode_texts(self.model, self.tokenizer, texts)
        self._check_finite(emb, "text embeddings")
        return emb

    def _check_finite(self, x, what):
        bad = int((~torch.isfinite(x)).any(-1).sum())
        if bad:
            raise data.InputError(f"{bad} of {len(x)} {what} are not finite (NaN or inf): the model "
                                  f"{self.checkpoint or '(untrained)'} holds non-finite weights (a "
                             f"diverged run or a corrupt checkpoint); nothing was evaluated")


def five_way_labels(labels, label_names, rows):
    """The 5xN set: the label columns positive somewhere (No Finding aside), and for each image
    the index of its one positive column among them."""
    y = _np(labels) == 1
    cols = [j for j in range(y.shape[1]) if y[:, j].any() and label_names[j] != "No Finding"]
    if not cols:
        raise data.InputError(f"split {rows[0]['split']!r}: no image has a positive CheXpert label, so "
                              f"the 5-way protocol (one positive label column per image) cannot run; "
                              f"for a column of class names use --label-column NAME")
    y = y[:, cols]
    bad = np.flatnonzero(y.sum(1) != 1)
    if len(bad):
        raise data.InputError(f"manifest row {rows[bad[0]]['_row']} (split {rows[bad[0]]['split']!r}): "
                              f"expected exactly one positive among {[label_names[j] for j in cols]}")
    return [label_names[j] for j in cols], y.argmax(1)


def class_targets(ev, split, column):
    """-> (the classes of a label column: its distinct non-blank values over the whole manifest,
    sorted, the same in every split and task; (N,) class index of each image of the split, -1 =
    blank; notes)."""
    if column not in ev.columns:
        raise data.InputError(f"--label-column {column!r}: {ev.manifest} has no such column; "
                              f"its columns are {ev.columns}")
    if column in data.LABELS:
        raise data.InputError(f"--label-column {column!r} is a CheXpert label column (1 / 0 / -1); "
                              f"those are evaluated without --label-column")
    names = sorted({r[column].strip() for r in ev.rows if r[column].strip()})
    if len(names) < 2:
        raise data.InputError(f"--label-column {column!r}: {len(names)} distinct class value(s) "
                              f"{names} in {ev.manifest}; at least two are needed")
    index = {c: i for i, c in enumerate(names)}
    y = np.array([index.get(r[column].strip(), -1) for r in ev.images(split)["rows"]])
    notes = []
    if (y < 0).all():
        raise data.InputError(f"--label-column {column!r}: none of the {len(y)} images of split "
                              f"{split!r} in {ev.manifest} has a value in that column")
    if (y < 0).any():
        notes.append(f"{int((y < 0).sum())} of {len(y)} images of split {split!r} have no "
                     f"value in column {column!r}: left out")
    absent = [c for i, c in enumerate(names) if not (y == i).any()]
    if absent:
        notes.append(f"classes absent from split {split!r}: {absent}")
    return names, y, notes


# -----------------------------------------------------------------------------
# 7. Tasks
# Each task is a run_* function (an Evaluation and its options -> a JSON-able dict with its
# numbers and its "notes"); its print_* function, which shows every note, is in appendix C. From Python,
# without a command line: run_retrieval(Evaluation(model, tokenizer, cfg, manifest, step),
# options(split="valid")).
# -----------------------------------------------------------------------------


def options(**overrides):
    """The tasks' options: the command line's defaults (build_parser) with `overrides` on top, by
    their Python names (label_column=...)."""
    opts = vars(build_parser().parse_args([]))
    unknown = sorted(set(overrides) - set(opts))
    if unknown:
        raise TypeError(f"unknown evaluate options {unknown}; known: {', '.join(sorted(opts))}")
    return argparse.Namespace(**{**opts, **overrides})


def choose_prompts(ev, args):
    """-> (prompt set or None, its name, whether the user chose it). Default: the class names for
    --label-column, "synth" beside a SynthCXR meta.json, else GLoRIA's "chexpert" grid."""
    if args.prompts or args.prompt_set:
        name = args.prompts or args.prompt_set
        return load_prompt_set(name), name, True
    if args.label_column:
        return None, "class names", False
    name = "synth" if (ev.manifest.parent / "meta.json").is_file() else "chexpert"
    return load_prompt_set(name), name, False


def zeroshot_nway(ev, args, image_emb, y, all_prompts, classes, split):
    """N-way zero-shot of the images over `classes` by --zeroshot-protocol -> the metrics and the
    protocol. gloria draws over all_prompts (every class of the file), so that a class's prompts
    do not depend on which other classes the data has."""
    protocol = {"name": args.zeroshot_protocol, "about": ZEROSHOT_PROTOCOLS[args.zeroshot_protocol]}
    warnings = []
    if args.zeroshot_protocol == "gloria":
        drawn = sample_prompts(all_prompts, args.prompts_per_class, args.prompt_seed)
        prompts = {c: drawn[c] for c in classes}
        scores = zscore_per_class(max_prompt_similarity(ev.text_embeddings, image_emb, prompts))
        used = [len(p) for p in prompts.values()]
        protocol.update(prompts_per_class=args.prompts_per_class, prompt_seed=args.prompt_seed,
                        prompts_used={"min": min(used), "max": max(used)}, prompts=prompts)
        short = {c: len(p) for c, p in prompts.items() if len(p) < args.prompts_per_class}
        if short:
            warnings.append(f"--prompts-per-class {args.prompts_per_class}: fewer prompts exist for "
                            f"{len(short)} of {len(prompts)} classes, all of theirs used ("
                            + ", ".join(f"{c} {n}" for c, n in short.items()) + ")")
    else:
        prompts = {c: all_prompts[c] for c in classes}
        scores = image_emb @ class_embeddings(ev.text_embeddings, prompts).T      # (N, C)
    mc = multiclass_metrics(scores, y, classes)
    mc.pop("predictions")
    mc.update(split=split, n_prompts={c: len(p) for c, p in prompts.items()}, protocol=protocol,
              warnings=warnings + unknown_word_warnings(ev.tokenizer, prompts))
    return mc


def unknown_word_warnings(tokenizer, prompts_by_class, most=0.5):
    """A warning for each class whose prompts' tokens are more than `most` [UNK]: its score says
    little about its words."""
    shares = {c: tokenizer.unk_rate(prompts) for c, prompts in prompts_by_class.items()}
    return [f"class {c!r}: {share:.0%} of the tokens of its prompts are unknown to the tokenizer "
            f"([UNK]), so its score says little about its words; give prompts in the words of "
            f"the training reports (--prompts FILE.json)" for c, share in shares.items() if share > most]


def run_zeroshot(ev, args):
    ev.check_split(args.split)
    prompt_set, name, chosen = choose_prompts(ev, args)
    if args.label_column:
        return _zeroshot_label_column(ev, args, prompt_set, name)
    out = {"prompt_set": name, "multiclass": None, "binary": None, "notes": []}
    used = set()
    if args.with_5x and ev.split_sizes.get("test_5x"):
        feats = ev.images("test_5x")
        classes, y = five_way_labels(feats["labels"], ev.label_names, feats["rows"])
        missing = [c for c in classes if c not in prompt_set["positive"]]
        if missing:
            raise data.InputError(f"prompt set {name!r} has no prompts for {missing}, classes of "
                                  f"the 5-way split test_5x")
        out["multiclass"] = zeroshot_nway(ev, args, feats["embed"], y, prompt_set["positive"],
                                          classes, "test_5x")
        used.update(classes)
    else:
        out["notes"].append("5-way zero-shot skipped: " + (
            "--no-5x" if ev.split_sizes.get("test_5x") else
            "no test_5x split (the CheXpert-style 5xN set); for a column of class names use "
            "--label-column NAME"))
    labelled = [f for f in ev.label_names if any(r[f] for r in ev.rows)]   # not blank throughout
    chexzero = args.binary_protocol == "chexzero"
    pairs = binary_prompt_pairs(prompt_set, labelled, args.binary_protocol)
    findings = list(pairs)
    if findings:
        feats = ev.images(args.split)
        cols = [ev.label_names.index(f) for f in findings]
        pos = class_embeddings(ev.text_embeddings, {f: pairs[f][0] for f in findings})
        neg = class_embeddings(ev.text_embeddings, {f: pairs[f][1] for f in findings})
        out["binary"] = zeroshot_binary(feats["embed"], score_labels(feats["labels"])[:, cols],
                                        pos, neg, findings, probability=chexzero)
        out["binary"].update(split=args.split, protocol={
            "name": args.binary_protocol, "about": BINARY_PROTOCOLS[args.binary_protocol]})
        if not chexzero:                                # chexzero's pairs are not the set's prompts
            used.update(findings)
        elif chosen:
            out["notes"].append(f"binary zero-shot (--binary-protocol chexzero) uses the pair "
                                f"('<finding>', 'no <finding>'), not the prompts of {name!r}")
        if chexzero and "No Finding" in labelled:
            out["binary"]["notes"].append("No Finding left out: its pair would be 'no no finding'")
        if math.isnan(out["binary"]["mean_auroc"]):
            out["notes"].append(f"binary zero-shot: no finding has both classes in split "
                                f"{args.split!r}, so there is no AUROC")
    else:
        out["notes"].append(f"binary zero-shot skipped: no labelled CheXpert column of the manifest "
                            f"({', '.join(labelled) or 'it has none'}) " + (
                                "other than No Finding" if chexzero else f"has prompts in {name!r}"))
    unused = [c for c in prompt_set["positive"] if c not in used]
    if chosen and len(unused) == len(prompt_set["positive"]):
        raise data.InputError(f"prompts {name!r}: none of their classes {unused} was used: "
                              + "; ".join(out["notes"]))
    if chosen and unused:
        out["notes"].append(f"prompts of {name!r} not used (no such class here): {unused}")
    if out["multiclass"] is None and (out["binary"] is None or math.isnan(out["binary"]["mean_auroc"])):
        out["skipped"] = "; ".join(out["notes"])
    return out


def _zeroshot_label_column(ev, args, prompt_set, name):
    """N-way zero-shot over the classes of --label-column, on --split."""
    classes, y, notes = class_targets(ev, args.split, args.label_column)
    if prompt_set is None:
        all_prompts = {c: [c] for c in classes}
        notes.append("no --prompts given: each class's one prompt is its own name")
    else:
        missing = [c for c in classes if c not in prompt_set["positive"]]
        if missing:
            raise data.InputError(f"prompts {name!r} have no prompts for the classes {missing} of column "
                                  f"{args.label_column!r} (the prompts' classes: {list(prompt_set['positive'])})")
        extra = [c for c in prompt_set["positive"] if c not in classes]
        if extra:
            notes.append(f"prompts of {name!r} for classes not in column {args.label_column!r}, "
                         f"not used: {extra}")
        if prompt_set["negative"]:
            notes.append(f"the negative prompts of {name!r} are not used by N-way zero-shot")
        all_prompts = prompt_set["positive"]
    keep = y >= 0
    mc = zeroshot_nway(ev, args, ev.images(args.split)["embed"][torch.as_tensor(keep)], y[keep],
                       all_prompts, classes, args.split)
    return {"prompt_set": name, "label_column": args.label_column, "multiclass": mc,
            "binary": None, "notes": notes}


def run_fewshot(ev, args):
    ev.check_split(args.split)
    for split in ("train", "valid"):
        ev.check_split(split, "the probe trains on 'train' and chooses its weight decay on 'valid'")
    if args.label_column:
        return _fewshot_label_column(ev, args)
    splits = {s: ev.images(s) for s in ("train", "valid", args.split)}
    y = {s: score_labels(f["labels"]) for s, f in splits.items()}

    def both_classes(s, j):
        return (y[s][:, j] == 1).any() and (y[s][:, j] == 0).any()

    notes = []
    if args.labels:
        names = list(args.labels)
        unknown = [n for n in names if n not in ev.label_names]
        if unknown:
            raise data.InputError(f"--labels: {unknown} not among the manifest's labels {ev.label_names}")
    else:
        names = [n for j, n in enumerate(ev.label_names)
                 if both_classes("train", j) and both_classes(args.split, j)]
        left_out = [n for j, n in enumerate(ev.label_names) if n not in names
                    and any((y[s][:, j] == 1).any() for s in y)]
        if left_out:
            notes.append(f"labels without both classes in train and {args.split}, left out: {left_out}")
    if not names:
        why = (f"no CheXpert label column has both classes in train and {args.split} (columns: "
               f"{', '.join(ev.label_names) or 'none'}); for a column of class names use --label-column NAME")
        return {"kind": "multi-label", "labels": [], "split": args.split, "results": {},
                "notes": notes + [why], "skipped": why}
    cols = [ev.label_names.index(n) for n in names]
    notes += check_shots(args.shots, {n: int(min((y["train"][:, j] == 1).sum(), (y["train"][:, j] == 0).sum()))
                                      for n, j in zip(names, cols)}, "positives and as many negatives")
    part = {s: (splits[s]["features"], y[s][:, cols]) for s in splits}
    results = linear_probe(part["train"], part["valid"], part[args.split], names, args.shots,
                           args.fractions, range(args.seeds), args.weight_decays)
    return {"kind": "multi-label", "labels": names, "split": args.split, "shots": list(args.shots),
            "fractions": list(args.fractions), "seeds": list(range(args.seeds)),
            "weight_decays": list(args.weight_decays), "selection": "best mean AUROC on valid",
            "uncertain": "excluded (-1); blank = negative", "results": results, "notes": notes}


def _fewshot_label_column(ev, args):
    """Multi-class probe over the classes of --label-column; rows without a class left out."""
    if args.labels:
        raise data.InputError("--labels picks CheXpert label columns; with --label-column the probe "
                              "is multi-class over that column's classes")
    part, notes = {}, []
    for split in dict.fromkeys(("train", "valid", args.split)):
        classes, y, split_notes = class_targets(ev, split, args.label_column)
        keep = y >= 0
        part[split] = (ev.images(split)["features"][torch.as_tensor(keep)], y[keep])
        notes += split_notes
    train_y = part["train"][1]
    notes += check_shots(args.shots, {c: int((train_y == i).sum()) for i, c in enumerate(classes)},
                         "images")
    results = linear_probe_multiclass(part["train"], part["valid"], part[args.split], classes,
                                      args.shots, args.fractions, range(args.seeds), args.weight_decays)
    return {"kind": "multi-class", "label_column": args.label_column, "classes": classes,
            **class_baselines(part[args.split][1], classes),        # of the evaluated split
            "split": args.split, "shots": list(args.shots), "fractions": list(args.fractions),
            "seeds": list(range(args.seeds)), "weight_decays": list(args.weight_decays),
            "selection": "best accuracy on valid", "results": results, "notes": notes}


def check_shots(shots, supply, unit):
    """supply: {label or class: how many of `unit` train has}. A k that no label can supply is an
    error (a draw of whole classes is no "k-shot"). -> notes on the labels short of a k."""
    most = max(supply.values())
    if max(shots) > most:
        raise data.InputError(f"--shots {max(shots)}: the train split has at most {most} {unit} of any "
                              f"label or class; choose shots of at most {most}")
    notes = []
    for k in shots:
        short = [name for name, n in supply.items() if n < k]
        if short:
            notes.append(f"{k}-shot: fewer than {k} {unit} in train for {', '.join(short)}: all "
                         f"of them are used")
    return notes


def run_retrieval(ev, args):
    ev.check_split(args.split)
    out = {}
    with_5x = args.with_5x and ev.split_sizes.get("test_5x")
    for split in dict.fromkeys([args.split] + (["test_5x"] if with_5x else [])):
        if not any(r["text"].strip() for r in ev.rows if r["split"] == split):
            out[split] = {"note": f"split {split!r} has no report texts (labels only): retrieval skipped"}
            continue
        feats = ev.images(split)
        image_rows, texts, text_of_image = retrieval_pool(feats["rows"])
        check_pool(ev.manifest, split, feats["rows"], image_rows, texts)
        classes, notes = None, []
        trivial = [k for k in args.ks if k >= min(len(texts), len(image_rows))]
        if trivial:
            notes.append(f"R@{', R@'.join(map(str, trivial))}: k is not below the pool of "
                         f"{len(texts)} texts (image-to-text) or {len(image_rows)} images "
                         f"(text-to-image), so that recall is 1 by construction")
        if args.label_column:                       # class-level P@K over the column's classes
            _, y, _ = class_targets(ev, split, args.label_column)
            classes = y[image_rows]
            if (classes < 0).any():
                classes = None
                notes.append(f"some images have no value in column {args.label_column!r}: "
                             f"class-level P@K skipped")
        elif split == "test_5x":
            _, classes = five_way_labels(feats["labels"][image_rows], ev.label_names,
                                         [feats["rows"][i] for i in image_rows])
        out[split] = evaluate_retrieval(feats["embed"][image_rows], ev.text_embeddings(texts),
                                        text_of_image, classes, args.ks, args.chunk_size)
        if notes:
            out[split]["notes"] = notes
    return out


def run_pixel_probe(args):
    """The pixel probe needs only a manifest (--data, or the dataset of --config)."""
    manifest = Path(args.data) if args.data else msd.prepare_data(msd.load_config(args.config),
                                                                  check_splits=False)
    rows = data.read_manifest(manifest)
    data.check_split_overlap(rows, manifest, args.allow_split_overlap, contents=True)
    splits = dict(collections.Counter(r["split"] for r in rows))
    for split in ("train", args.split):
        if split not in splits:
            raise data.InputError(f"pixel-probe: {manifest} has no split {split!r}; its splits are "
                                  f"{splits}")
    start = time.perf_counter()
    res = pixel_probe(manifest, args.split, args.epochs)
    res["manifest"], res["seconds"] = str(manifest), time.perf_counter() - start
    if not res["auroc"]:
        res["skipped"] = (f"no CheXpert label column of {manifest} has both classes in "
                          f"{args.split}")
    return res


TASKS = {"zeroshot": run_zeroshot, "fewshot": run_fewshot, "retrieval": run_retrieval}


def skipped_reason(task, res):
    """Why a task computed nothing (None when it computed something)."""
    if task == "retrieval":
        notes = [f"{split}: {r['note']}" for split, r in res.items() if "note" in r]
        return "; ".join(notes) if len(notes) == len(res) else None
    return res.get("skipped")


# =============================================================================
# Part II: appendices: benchmarks, the command line, pictures
# =============================================================================

# -----------------------------------------------------------------------------
# A. Efficiency benchmark
# Read this when you compare the cost of one training step; it needs no checkpoint and no data.
# Time, peak memory and FLOPs of one optimizer step, MSD against end-to-end CLIP.
# -----------------------------------------------------------------------------


def efficiency_configs(cfg, max_factor=8):
    """(name, config) rows: the methods at b = cfg.batch_size, N = cfg.accum_steps, then memory
    growth: CLIP end to end at B = k*b against exact CLIP and MSD with k micro-batches of b."""
    b, N = cfg.batch_size, cfg.accum_steps
    rows = [(f"CLIP end-to-end B={b}", replace(cfg, method="clip", accum_steps=1)),
            (f"CLIP end-to-end B={N * b}", replace(cfg, method="clip", batch_size=N * b, accum_steps=1)),
            (f"CLIP naive accumulation {N}x{b}", replace(cfg, method="clip")),
            (f"CLIP exact accumulation {N}x{b}", replace(cfg, method="clip", clip_accum="exact")),
            (f"MSD alpha=0 {N}x{b}", replace(cfg, method="msd", alpha=0.0)),
            (f"MSD {N}x{b}", replace(cfg, method="msd")),
            (f"MSD no queue {N}x{b}", replace(cfg, method="msd", queue_size=0)),
            (f"MSD EMA per micro-batch {N}x{b}", replace(cfg, method="msd", ema_per_micro_batch=True))]
    k = 1
    while k <= max_factor:
        rows.append((f"growth: CLIP end-to-end B={k * b}",
                     replace(cfg, method="clip", batch_size=k * b, accum_steps=1)))
        rows.append((f"growth: CLIP exact {k}x{b} (B={k * b})",
                     replace(cfg, method="clip", clip_accum="exact", accum_steps=k)))
        rows.append((f"growth: MSD {k}x{b} (B={k * b})", replace(cfg, method="msd", accum_steps=k)))
        k *= 2
    return rows


def sweep_configs(cfg, micro_batches=(32, 64, 128, 256)):
    """The micro-batch sweep at B = N * b, eager and compiled: end-to-end CLIP at B, exact CLIP
    and MSD with B / b micro-batches of b. What does a small micro-batch cost per pair?"""
    B = cfg.batch_size * cfg.accum_steps
    rows = []
    for mode, tag in (("off", "eager"), ("on", "compiled")):
        rows.append((f"sweep {tag}: CLIP end-to-end B={B}",
                     replace(cfg, method="clip", batch_size=B, accum_steps=1, compile=mode)))
        for method, accum, name in (("clip", "exact", "CLIP exact"), ("msd", "naive", "MSD")):
            rows += [(f"sweep {tag}: {name} {B // b}x{b}",
                      replace(cfg, method=method, clip_accum=accum, batch_size=b, accum_steps=B // b,
                              compile=mode))
                     for b in micro_batches if b <= B and B % b == 0]
    return rows


def _timed(device, fn, n):
    """Seconds that n calls of fn take, the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def matmul_tflops(device, n=2048, repeats=10):
    """Measured matmul throughput in TFLOP/s (float32 on CPU, bf16 on CUDA): MFU's denominator."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    return 2 * n ** 3 * repeats / _timed(device, lambda: a @ a, repeats) / 1e12


def measure_step(cfg, steps, vocab_size=1000, warmup=2, repeats=1):
    """Seconds per optimizer step, training FLOPs per pair (on an eager step) and peak memory of
    one config, reports of max_len tokens (the worst case). `steps` steps are timed `repeats`
    times: the median, and "cv" their spread (std / mean; None for one)."""
    device = msd.pick_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    B = cfg.batch_size * cfg.accum_steps
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, vocab_size, (B, cfg.max_len), generator=g)
    input_ids[:, 0] = 1                                           # [CLS]
    batch = [torch.randn(B, 1, cfg.image_size, cfg.image_size, generator=g), input_ids,
             torch.ones(B, cfg.max_len, dtype=torch.long), torch.arange(B)]
    batch = msd.Batch(*(x.to(device) for x in batch), text_lengths=[cfg.max_len] * B)
    model = msd.build_model(cfg, vocab_size).to(device).train()
    optimizer = msd.configure_optimizer(model, cfg)
    baseline = msd.peak_memory_mb(device)             # model, teacher, queue, inputs: no step yet
    autocast = msd.autocast_for(cfg, device)

    def step():
        msd.train_step(model, optimizer, batch, cfg, cfg.lr, cfg.alpha, autocast)

    flops = None
    if msd.compile_towers(model, cfg, device) == "off":
        with FlopCounterMode(display=False) as counter:   # also the first warm-up step
            step()
        flops, warmup = counter.get_total_flops() / B, warmup - 1
    for _ in range(warmup):                               # compilation happens here
        step()
    times = [_timed(device, step, steps) / steps for _ in range(repeats)]
    seconds = float(np.median(times))
    peak = msd.peak_memory_mb(device)
    return {"effective_batch": B, "micro_batch": cfg.batch_size, "accum_steps": cfg.accum_steps,
            "seconds_per_step": seconds, "seconds_per_step_repeats": times,
            "cv": float(np.std(times, ddof=1) / np.mean(times)) if repeats > 1 else None,
            "pairs_per_s": B / seconds, "flops_per_pair": flops,
            "peak_memory_mb": peak, "step_memory_mb": peak - baseline}


def _measure_child(cfg_dict, steps, repeats, queue):
    queue.put(measure_step(msd.Config(**cfg_dict), steps, repeats=repeats))


NOISY_CV = 0.10   # a row whose repeats spread more than this (std / mean) was not timed reliably


def load_average():
    """The 1-minute load average (os.getloadavg), None where the system has none."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def noise_warnings(rows, load_before, load_after, cores, max_cv=NOISY_CV):
    """Why the timings of an efficiency run cannot be trusted: rows whose repeats spread by more
    than max_cv (std / mean), or a load average above the number of cores (other processes)."""
    warnings = []
    noisy = [f"{r['name']} ({r['cv']:.0%})" for r in rows if r.get("cv") is not None and r["cv"] > max_cv]
    if noisy:
        warnings.append(f"{len(noisy)} of {len(rows)} rows vary by more than {max_cv:.0%} between "
                        f"repeats ({'; '.join(noisy)}): their times and ratios cannot be trusted")
    busy = [f"{when} {load:.1f}" for when, load in (("before", load_before), ("after", load_after))
            if load is not None and load > cores]
    if busy:
        warnings.append(f"load average {' and '.join(busy)} above the {cores} cores: other "
                        f"processes ran during the timing, so its times and ratios cannot be trusted")
    if warnings:
        warnings.append("rerun on an idle machine (python evaluate.py --task efficiency)")
    return warnings


GPU_MEMORY_GB = (11, 24, 80)  # an RTX 2080 Ti, an RTX 4090 (the paper's GPUs), an H100


def run_efficiency(args):
    """Each configuration on random tensors (the training step, not the loader); on the CPU each
    in a fresh process (its peak RSS its own). On CUDA (or with --sweep) the micro-batch sweep
    first. --time-budget: later rows are skipped (listed). The JSON is rewritten after each row."""
    cfg = msd.load_config(args.config, args.overrides + ([f"--data={args.data}"] if args.data else []))
    device = msd.pick_device(cfg.device)
    try:
        train_pairs = sum(r["split"] == "train" for r in data.read_manifest(msd.prepare_data(cfg)))
    except FileNotFoundError as e:   # random tensors need no data; only "min / epoch" does
        print(f"note: {e}; minutes per epoch are left out")
        train_pairs = None
    peak_tflops = matmul_tflops(device)
    configs = (sweep_configs(cfg) if device.type == "cuda" or args.sweep else []) + efficiency_configs(cfg)
    ctx = multiprocessing.get_context("spawn")
    res = {"device": str(device), "machine": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                              else platform.processor() or platform.machine()),
           "torch": torch.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None,
           "threads": torch.get_num_threads(), "config": args.config, "overrides": args.overrides,
           "steps_timed": args.steps, "train_pairs": train_pairs, "matmul_tflops": peak_tflops,
           "memory": ("CUDA max_memory_allocated" if device.type == "cuda" else
                      "process peak RSS (ru_maxrss); step memory = peak minus the RSS before the "
                      "first step (model, teacher, queue and inputs already allocated)"),
           "repeats": args.repeats, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "load_average": {"before": load_average(), "after": None},
           "rows": [], "skipped": []}
    start = time.perf_counter()
    for name, row_cfg in configs:
        if args.time_budget and time.perf_counter() - start > args.time_budget:
            res["skipped"].append(name)
            continue
        if device.type == "cuda":
            r = measure_step(row_cfg, args.steps, repeats=args.repeats)
        else:                                         # a fresh process: its peak memory is its own
            queue = ctx.Queue()
            proc = ctx.Process(target=_measure_child,
                               args=(asdict(row_cfg), args.steps, args.repeats, queue))
            proc.start()
            r = queue.get()
            proc.join()
        r["name"] = name
        r["epoch_minutes"] = train_pairs / r["pairs_per_s"] / 60 if train_pairs else None
        r["fits_gb"] = {gb: r["peak_memory_mb"] / 1024 + 1.0 <= gb for gb in GPU_MEMORY_GB} \
            if device.type == "cuda" else None    # + 1 GB: CUDA context and fragmentation
        res["rows"].append(r)
        print(f"  measured {name}: {r['seconds_per_step']:.3f} s/step", flush=True)
        write_json_atomic(args.out, {**results_mark(args), **res})
    res["load_average"]["after"] = load_average()
    res["warnings"] = noise_warnings(res["rows"], res["load_average"]["before"],
                                     res["load_average"]["after"], res["cores"])
    rows = res["rows"]
    by_name = {r["name"]: r for r in rows}
    base = next((r for r in rows if not r["name"].startswith("sweep")), None)
    for r in rows:  # FLOPs per pair do not depend on compilation: take the eager twin's count
        if r["flops_per_pair"] is None:
            twin = by_name.get(r["name"].replace("compiled", "eager"))
            r["flops_per_pair"] = twin["flops_per_pair"] if twin else None
        r["mfu"] = (r["flops_per_pair"] * r["pairs_per_s"] / (peak_tflops * 1e12)
                    if r["flops_per_pair"] else None)
        if r["name"].startswith("sweep"):  # per pair, relative to CLIP end to end at the same B
            clip = by_name.get(r["name"].split(":")[0] + f": CLIP end-to-end B={r['effective_batch']}")
            r["time_ratio"] = clip and r["seconds_per_step"] / clip["seconds_per_step"]
            r["memory_ratio"] = clip and r["peak_memory_mb"] / clip["peak_memory_mb"]
        elif base:                         # per pair, relative to CLIP-b
            r["time_ratio"] = r["seconds_per_step"] / base["seconds_per_step"] * (
                base["effective_batch"] / r["effective_batch"])
            r["memory_ratio"] = r["step_memory_mb"] / base["step_memory_mb"]
    return res


def print_efficiency(res):
    """Two tables: the micro-batch sweep (CUDA, or --sweep), then the methods and memory growth."""
    def num(v, fmt):
        return format(v, fmt) if v is not None else "-"

    print(f"efficiency on {res['device']} ({res['machine']}, torch {res['torch']}"
          + (f", CUDA {res['cuda']}" if res.get("cuda") else f", {res['threads']} threads")
          + f"), {res['config']} {' '.join(res['overrides'])}; measured matmul peak "
          f"{res['matmul_tflops']:.3f} TFLOP/s; memory = {res['memory']}")
    sweep = [r for r in res["rows"] if r["name"].startswith("sweep")]
    if sweep:
        fits = list(sweep[0]["fits_gb"] or {})
        print(f"  {'micro-batch sweep':<36} {'B':>4} {'s/step':>7} {'pairs/s':>8} "
              f"{'x time/pair vs CLIP-B':>21} {'peak GiB':>8}" + "".join(f" {f'{gb} GB':>6}" for gb in fits))
        for r in sweep:
            print(f"  {r['name']:<36} {r['effective_batch']:>4} {r['seconds_per_step']:>7.3f} "
                  f"{r['pairs_per_s']:>8.0f} {num(r['time_ratio'], '>21.2f')} "
                  f"{r['peak_memory_mb'] / 1024:>8.1f}"
                  + "".join(f" {'fits' if r['fits_gb'][gb] else 'no':>6}" for gb in fits))
    print(f"  {'configuration':<40} {'B':>4} {'s/step':>7} {'cv':>5} {'pairs/s':>8} {'epoch min':>9} "
          f"{'x time/pair':>11} {'peak MB':>8} {'step MB':>8} {'x step mem':>10} "
          f"{'GFLOP/pair':>10} {'MFU':>6}")
    for r in res["rows"]:
        if r["name"].startswith("sweep"):
            continue
        print(f"  {r['name']:<40} {r['effective_batch']:>4} {r['seconds_per_step']:>7.3f} "
              f"{num(r.get('cv'), '>5.0%')} "
              f"{r['pairs_per_s']:>8.0f} {num(r['epoch_minutes'], '>9.2f')} {r['time_ratio']:>11.2f} "
              f"{r['peak_memory_mb']:>8.0f} {r['step_memory_mb']:>8.0f} {r['memory_ratio']:>10.2f} "
              f"{num(r['flops_per_pair'] and r['flops_per_pair'] / 1e9, '>10.3f')} "
              f"{num(r['mfu'], '>6.1%')}")
    if res.get("skipped"):
        print(f"  skipped (past --time-budget): {', '.join(res['skipped'])}")
    load = res["load_average"]
    print(f"  cv: spread of the {res['repeats']} repeats of each row (std / mean); load average "
          f"before {num(load['before'], '.2f')}, after {num(load['after'], '.2f')}, on {res['cores']} cores")
    for warning in res["warnings"]:
        print(f"warning: {warning}")


# -----------------------------------------------------------------------------
# B. Ablation runner
# Read this when you reproduce a quality table: it trains and evaluates many runs over seeds.
# Every run of an ablation file, evaluated with the tasks of section 7; mean +- sample std.
# -----------------------------------------------------------------------------


def ablation_metrics(ev, args):
    """The few numbers of the quality table, from the three tasks of section 7 (for tuning on
    valid: "eval": {"split": "valid", "with_5x": false, "probe": false}, no test split read)."""
    zs, rt = run_zeroshot(ev, args), run_retrieval(ev, args)
    m = {}
    if zs["multiclass"]:
        m.update(zs_acc=zs["multiclass"]["accuracy"], zs_f1=zs["multiclass"]["macro_f1"])
    m["zs_auroc"] = zs["binary"]["mean_auroc"]
    if args.probe:
        fs = run_fewshot(ev, args)
        m.update({f"probe_{name}": r["auroc_mean"] for name, r in fs["results"].items()})
    for d in ("i2t", "t2i"):
        m.update({f"{d}_{k}": v for k, v in rt[args.split][d].items() if k.startswith("R@")})
    return m


ABLATION_KEYS = ("base", "shared", "seeds", "runs", "eval", "pretrain", "reference", "contrasts",
                 "about")


def run_is_done(ckpt_path, cfg):
    """A finished run of exactly this config (and, with init_from, of exactly that checkpoint)."""
    if not ckpt_path.is_file():
        return False
    ckpt = msd.read_checkpoint(ckpt_path)
    if not msd.same_run(ckpt["config"], cfg):
        return False
    return not cfg.init_from or (ckpt.get("init_from") or {}).get("sha256") == \
        msd.read_checkpoint(cfg.init_from)["sha256"]


def ablation_job(job):
    """Train (unless finished) and evaluate one (run, seed) of an ablation table -> its metrics."""
    name, cfg, floor, protocol = job["name"], job["cfg"], job["floor"], job["protocol"]
    manifest, ckpt_path, seconds = msd.prepare_data(cfg), Path(cfg.out_dir) / "ckpt.pt", None
    if floor == "warm_start":                              # the warm checkpoint, as it is
        model, tokenizer, _, ckpt = msd.load_checkpoint(cfg.init_from)
        step, ckpt_path = ckpt["step"], Path(cfg.init_from)
    elif floor == "random":                                # the untrained floor
        (model, tokenizer), step, ckpt_path = untrained_model(cfg, manifest), 0, None
    else:
        if not run_is_done(ckpt_path, cfg):
            print(f"== training {name} seed {cfg.seed} -> {cfg.out_dir}"
                  + (" (replacing a run of another config)" if ckpt_path.is_file() else ""), flush=True)
            seconds = msd.pretrain(cfg, overwrite=True)["seconds"]
        model, tokenizer, cfg, ckpt = msd.load_checkpoint(ckpt_path)
        step = ckpt["step"]
    ev = Evaluation(model, tokenizer, cfg, manifest, step, ckpt_path, protocol.batch_size)
    metrics = ablation_metrics(ev, protocol)
    metrics["train_seconds"] = seconds
    if getattr(protocol, "sealed_test", False):  # recorded now, read once when the study ends
        test = argparse.Namespace(**{**vars(protocol), "split": "test"})
        metrics["sealed_test"] = {"metrics": ablation_metrics(ev, test),
                                  "ranks": retrieval_ranks_of(ev, "test")}
    return metrics


def retrieval_ranks_of(ev, split):
    """{"i2t": [rank of each image's report], "t2i": [rank of each distinct report's images]} on
    one split's retrieval pool: the per-item numbers a bootstrap resamples."""
    feats = ev.images(split)
    image_rows, texts, text_of_image = retrieval_pool(feats["rows"])
    image_emb, text_emb = feats["embed"][image_rows], ev.text_embeddings(texts)
    i2t = retrieval_ranks(image_emb @ text_emb.T, text_of_image)
    t2i = retrieval_ranks(text_emb @ image_emb.T, np.arange(len(texts)), text_of_image)
    return {"i2t": i2t.tolist(), "t2i": t2i.tolist()}


def _one_thread_worker():
    torch.set_num_threads(1)  # J processes of one thread each share the machine's cores


def seed_stats(values):
    """(mean, sample std with ddof = 1) over seeds; the std is None for a single seed."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return (None, None)
    return (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None)


def welch_t(a, b):
    """Welch's t of mean(a) - mean(b); None with fewer than 2 values a side or both spreads 0."""
    contrast = welch_contrast([a], [b])
    return None if contrast is None or contrast["t"] is None else float(contrast["t"])


# Statistics of a study, written once and used by every table: Welch's t for a contrast of row
# means, its two-sided p from Student's t, Holm's adjustment over a family of contrasts, the
# smallest difference a design detects, and a bootstrap interval over test items.


def _betacf(a, b, x, eps=1e-14, max_iter=500):
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),          # even step
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd step
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a, b, x):
    """The regularised incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t, df):
    """P(|T| >= |t|) for Student's t with df (> 0, not necessarily whole) degrees of freedom."""
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q, df):
    """The q-quantile of Student's t (0.5 < q < 1), by bisection on the two-sided p."""
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > 2 * (1 - q):
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > 2 * (1 - q) else (lo, mid)
    return (lo + hi) / 2


def welch_contrast(plus, minus, alpha=0.05, power=0.8):
    """A contrast of row means: mean of the plus rows' means - mean of the minus rows' means (one
    row a side = Welch's test); a row is its per-seed values. SE from each row's sample variance,
    Welch-Satterthwaite df, two-sided p, the smallest detectable difference (t(1 - alpha/2, df)
    + t(power, df)) * SE. None when a row has fewer than 2 values."""
    rows = [(np.asarray(r, float), 1 / len(plus)) for r in plus] + \
           [(np.asarray(r, float), -1 / len(minus)) for r in minus]
    if any(len(r) < 2 for r, _ in rows):
        return None
    parts = [w * w * r.var(ddof=1) / len(r) for r, w in rows]           # w^2 s^2 / n per row
    estimate = sum(w * r.mean() for r, w in rows)
    se = math.sqrt(sum(parts))
    out = {"estimate": float(estimate), "se": se, "n": [len(r) for r, _ in rows]}
    if se == 0:
        return {**out, "t": None, "df": None, "p": None, "smallest_detectable": 0.0}
    df = sum(parts) ** 2 / sum(v * v / (len(r) - 1) for v, (r, _) in zip(parts, rows))
    t = estimate / se
    return {**out, "t": t, "df": df, "p": t_two_sided_p(t, df),
            "smallest_detectable": (t_quantile(1 - alpha / 2, df) + t_quantile(power, df)) * se}


def holm(pvalues):
    """Holm's step-down adjustment of a family's p-values. A contrast not computed yet (None)
    stays None but still counts in the family's size, so the correction never shrinks."""
    known = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    adjusted, running = list(pvalues), 0.0
    for rank, (p, i) in enumerate(known):
        running = max(running, min(1.0, (len(pvalues) - rank) * p))
        adjusted[i] = running
    return adjusted


def verdict(contrast, adjusted_p, alpha=0.05):
    """The registered decision rule: the sign is decided only when the adjusted p < alpha."""
    if contrast is None or adjusted_p is None:
        return "not decided (too few seeds)"
    if adjusted_p < alpha:
        return "positive" if contrast["estimate"] > 0 else "negative"
    return f"not decided at this power (smallest detectable {contrast['smallest_detectable']:.3f})"


def bootstrap_mean_recall(ranks_per_seed, k=10, resamples=1000, seed=0):
    """(2.5 %, 97.5 %) bootstrap interval of a row's mean R@k over the test items (images and
    reports resampled, one draw for all seeds): mean over seeds of (i->t R@k + t->i R@k) / 2.
    ranks_per_seed: one {"i2t": [...], "t2i": [...]} per seed (retrieval_ranks_of)."""
    rng = np.random.default_rng(seed)
    means = 0.0
    for d in ("i2t", "t2i"):
        hits = np.array([np.asarray(r[d]) <= k for r in ranks_per_seed], float)  # (seeds, items)
        draw = rng.integers(0, hits.shape[1], size=(resamples, hits.shape[1]))   # (resamples, items)
        means = means + hits[:, draw].mean(axis=(0, 2)) / 2                      # (resamples,)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def with_mean_recall(metrics):
    """The one number the batch-size study compares: mean R@10 = (i->t R@10 + t->i R@10) / 2."""
    if "i2t_R@10" in metrics and "t2i_R@10" in metrics:
        return {**metrics, "mean_R@10": (metrics["i2t_R@10"] + metrics["t2i_R@10"]) / 2}
    return metrics


def ablation_table(recorded, spec, floor):
    """Rows in the spec's order from the recorded per-seed metrics: mean and sample std of every
    metric, and, with a "reference" run, each row's difference from it and Welch's t."""
    table = {}
    for name in [floor, *spec["runs"]]:
        per = recorded.get(name, {})
        seeds = [s for s in spec["seeds"] if str(s) in per]
        if not seeds:
            continue
        per_seed = [with_mean_recall(per[str(s)]["metrics"]) for s in seeds]
        keys = [k for k in per_seed[0] if k != "train_seconds"]
        table[name] = {"overrides": spec["runs"].get(name), "seeds": seeds, "per_seed": per_seed,
                       **{k: seed_stats([r.get(k) for r in per_seed]) for k in keys}}
    ref = table.get(spec.get("reference"))
    for name, row in table.items():
        if ref is not None and name != spec["reference"]:
            row["vs_reference"] = {
                k: {"difference": row[k][0] - ref[k][0] if row[k][0] is not None else None,
                    "welch_t": welch_t([r[k] for r in row["per_seed"]], [r[k] for r in ref["per_seed"]])}
                for k in row if k in ref and isinstance(row[k], tuple) and ref[k][0] is not None}
    return table


def best_of(pattern, table, metric):
    """The row whose name matches the pattern (fnmatch) with the highest mean metric."""
    rows = [n for n in table if fnmatch.fnmatch(n, pattern) and table[n].get(metric, (None,))[0] is not None]
    return max(rows, key=lambda n: table[n][metric][0]) if rows else None


def contrast_family(entries, values, resolve):
    """Every contrast of one family: Welch's t, df, p, Holm's p over the family, the verdict."""
    out = {}
    for name, e in entries.items():
        plus, minus = [resolve(r) for r in e["plus"]], [resolve(r) for r in e["minus"]]
        c = None if None in plus + minus else welch_contrast([values(r) for r in plus],
                                                            [values(r) for r in minus])
        out[name] = {"plus": plus, "minus": minus, **(c or {"estimate": None, "p": None})}
    for (name, c), p in zip(out.items(), holm([c["p"] for c in out.values()])):
        c["holm_p"] = p
        c["verdict"] = verdict(c if c["estimate"] is not None and c.get("t") is not None else None, p)
    return out


def study_contrasts(spec, recorded, table):
    """The contrasts of an ablation file: the family "table" on the table's own numbers; the
    family "sealed_test" on the sealed test numbers once every run has all its seeds, with a
    bootstrap interval per row it names. "best of PATTERN" rows are chosen on the table."""
    spec_c = spec.get("contrasts")
    if not spec_c:
        return None
    metric = spec_c["metric"]
    resolve = lambda r: best_of(r[len("best of "):], table, metric) if r.startswith("best of ") else r  # noqa: E731
    own = lambda r: [s[metric] for s in table[r]["per_seed"]] if r in table else []  # noqa: E731
    out = {"metric": metric, "table": contrast_family(spec_c.get("table", {}), own, resolve)}
    missing = [(n, s) for n in spec["runs"] for s in spec["seeds"] if str(s) not in recorded.get(n, {})]
    if not spec_c.get("sealed_test"):
        return out
    absent = sorted({r for c in spec_c["sealed_test"].values() for r in c["plus"] + c["minus"]
                     if not r.startswith("best of ") and r not in spec["runs"]})
    if missing or absent:  # the seal stays shut until every row it names has every seed
        out["sealed_test"] = {"sealed": f"{len(missing)} (run, seed) pairs still to record"
                                        + (f"; rows not yet in the file: {', '.join(absent)}" if absent else "")}
        return out

    def sealed(r):
        return [with_mean_recall(recorded[r][str(s)]["sealed_test"]["metrics"])[metric]
                for s in spec["seeds"]]
    out["sealed_test"] = contrast_family(spec_c["sealed_test"], sealed, resolve)
    named = {r for c in out["sealed_test"].values() for r in c["plus"] + c["minus"]}
    out["test_rows"] = {r: {"mean": float(np.mean(sealed(r))), "std": float(np.std(sealed(r), ddof=1)),
                            "bootstrap_95": bootstrap_mean_recall(
                                [recorded[r][str(s)]["sealed_test"]["ranks"] for s in spec["seeds"]])}
                        for r in sorted(named)}
    return out


def read_recorded(path, spec_path, protocol_eval):
    """The runs an earlier call recorded in the results file: {run: {seed: {"config", "metrics"}}},
    and the superseded records; a file of another evaluation protocol is refused."""
    if not path.exists():
        return {}, []
    old = data.read_json(path, f"{path} (the ablation's results file; move it away or choose another --out)")
    if "recorded" not in old:
        raise data.InputError(f"{path} holds no per-run record (an older results file or another "
                         f"task's); move it away or choose another --out")
    if old.get("eval", {}) != protocol_eval:
        raise data.InputError(f"{path} was evaluated with eval {old.get('eval')}, {spec_path} asks for "
                              f"{protocol_eval}; choose another --out for another protocol")
    return old["recorded"], old.get("superseded", [])


def run_ablation(args):
    """Train every run of an ablation file for every seed, evaluate each with the file's "eval"
    protocol, tabulate mean and sample std over seeds. Each finished (run, seed) is recorded in
    --out at once, with its config; a later call skips those, so a long table can be continued.
    The first row is the floor: the untrained model ("random"), or the checkpoint the runs start
    from ("warm_start"; "pretrain" trains it if missing). "reference": a run every other row is
    compared with (difference, Welch's t)."""
    spec_path = Path(args.ablation)
    spec = data.read_json(spec_path, what="ablation file")
    unknown = set(spec) - set(ABLATION_KEYS)
    if unknown:
        raise data.InputKeyError(f"{spec_path}: unknown keys {sorted(unknown)}; expected {', '.join(ABLATION_KEYS)}")
    unknown = set(spec.get("contrasts") or {}) - {"metric", "table", "sealed_test"}
    if unknown:  # a family under another name would be dropped without a word
        raise data.InputKeyError(f"{spec_path}: unknown keys {sorted(unknown)} in 'contrasts'; expected "
                                 f"metric, table, sealed_test")
    if spec.get("reference") and spec["reference"] not in spec["runs"]:
        raise data.InputError(f"{spec_path}: reference {spec['reference']!r} is not one of its runs")
    # the evaluation protocol of the table: the command line's, with the file's "eval" on top
    protocol = argparse.Namespace(**{**vars(args), **{k: tuple(v) if isinstance(v, list) else v
                                                       for k, v in spec.get("eval", {}).items()}})
    shared = [f"--{k}={v}" for k, v in spec.get("shared", {}).items()]
    init_from = spec.get("shared", {}).get("init_from")
    floor = "warm_start" if init_from else "random"
    if getattr(args, "report", False):      # the recorded runs only: nothing trained or written
        recorded, _ = read_recorded(Path(args.out), spec_path, spec.get("eval", {}))
        table = ablation_table(recorded, spec, floor)
        return {"ablation": str(spec_path), "base": spec["base"], "reference": spec.get("reference"),
                "report_only": True, "table": table,
                **({"contrasts": study_contrasts(spec, recorded, table)} if spec.get("contrasts") else {})}
    if init_from and not Path(init_from).is_file():
        if "pretrain" not in spec:
            raise FileNotFoundError(f"{spec_path}: init_from {init_from} does not exist")
        print(f"== pretraining {spec['pretrain']} -> {init_from}", flush=True)
        msd.pretrain(msd.load_config(spec["pretrain"], ["--progress=false"]))
    init_sha = msd.read_checkpoint(init_from)["sha256"] if init_from else None
    out = Path(args.out)
    recorded, superseded = read_recorded(out, spec_path, spec.get("eval", {}))

    def result():
        return {"ablation": str(spec_path), "base": spec["base"], "shared": spec.get("shared", {}),
                "eval": spec.get("eval", {}), "reference": spec.get("reference"),
                "init_sha256": init_sha, "recorded": recorded, "superseded": superseded,
                "table": (table := ablation_table(recorded, spec, floor)),
                **({"contrasts": study_contrasts(spec, recorded, table)} if spec.get("contrasts") else {})}

    jobs, skipped = [], 0
    for name, overrides in {floor: None, **spec["runs"]}.items():
        for seed in spec["seeds"]:
            run_dir = Path(args.ablation_dir) / name / f"seed{seed}"
            cfg = msd.load_config(spec["base"], shared + [f"--seed={seed}", f"--out_dir={run_dir}"]
                                  + [f"--{k}={v}" for k, v in (overrides or {}).items()])
            done = recorded.get(name, {}).get(str(seed))
            if done and msd.same_run(done["config"], cfg) \
                    and done.get("init_sha256") == init_sha:
                skipped += 1
                continue
            if done:  # recorded for another config or another init checkpoint: kept, set aside
                superseded.append({"run": name, "seed": seed, **recorded[name].pop(str(seed))})
                print(f"   {name} seed {seed}: the recorded run has another config or init "
                      f"checkpoint; it moves to 'superseded' in {out} and is trained again", flush=True)
            jobs.append({"name": name, "cfg": cfg, "protocol": protocol,
                         "floor": floor if overrides is None else None})
    jobs.sort(key=lambda job: spec["seeds"].index(job["cfg"].seed))  # seed by seed: a study
    # stopped half-way has every row at (nearly) the same number of seeds
    print(f"== {spec_path}: {len(jobs)} runs to train and evaluate, {skipped} already recorded "
          f"in {out}", flush=True)

    def record(job, metrics):
        sealed = metrics.pop("sealed_test", None)
        recorded.setdefault(job["name"], {})[str(job["cfg"].seed)] = {
            "config": asdict(job["cfg"]), "init_sha256": init_sha, "metrics": metrics,
            **({"sealed_test": sealed} if sealed is not None else {})}
        write_json_atomic(out, result())  # a finished run is never lost, even if the next dies
        print(f"   {job['name']} seed {job['cfg'].seed}: " + "  ".join(
            f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)), flush=True)

    if getattr(args, "jobs", 1) <= 1:
        for job in jobs:
            record(job, ablation_job(job))
    else:
        with multiprocessing.get_context("spawn").Pool(args.jobs, _one_thread_worker) as pool:
            for job, metrics in zip(jobs, pool.imap(ablation_job, jobs)):
                record(job, metrics)
    return result()


def print_ablation(res):
    """One row per run: mean ± sample std over seeds of each metric; with a reference run,
    Welch's t of each row's i->t and t->i R@10 against it."""
    table = res["table"]
    if not table:
        print(f"ablation {res['ablation']}: no run recorded yet")
        return
    cols = [k for k in next(iter(table.values())) if k.startswith(("zs_", "probe_", "i2t", "t2i", "mean_"))]
    fmt = lambda m, s: f"{m:>8.3f}±{s:<6.3f}" if s is not None else f"{m:>8.3f}{'':7}"  # noqa: E731
    ref = res.get("reference")
    print(f"ablation {res['ablation']} (base {res['base']}): mean ± sample std (ddof=1) over seeds"
          + (f"; t = Welch's t against {ref}" if ref else ""))
    print(f"  {'run':<26}{'seeds':>6}" + "".join(f"{c:>15}" for c in cols)
          + ("  t(i2t_R@10) t(t2i_R@10)" if ref else ""))
    for name, r in table.items():
        line = f"  {name:<26}{len(r['seeds']):>6}" + "".join(
            fmt(*r[c]) if r[c][0] is not None else f"{'n/a':>15}" for c in cols)
        if ref and "vs_reference" in r:
            t = [r["vs_reference"].get(k, {}).get("welch_t") for k in ("i2t_R@10", "t2i_R@10")]
            line += "".join(f"{v:>12.2f}" if v is not None else f"{'n/a':>12}" for v in t)
        print(line)
    if res.get("contrasts"):
        print_contrasts(res["contrasts"])


def print_contrasts(c):
    """The registered contrasts: estimate, Welch's t, df, p, Holm's p and the verdict."""
    for family in ("table", "sealed_test"):
        entries = c.get(family)
        if not entries:
            continue
        if "sealed" in entries:
            print(f"contrasts on the sealed test split: sealed until every run is recorded ({entries['sealed']})")
            continue
        print(f"contrasts on the {'table' if family == 'table' else 'sealed test split'}'s {c['metric']} "
              f"(Welch's t, two-sided p, Holm over {len(entries)}):")
        for name, r in entries.items():
            if r.get("t") is None:
                print(f"  {name:<30} {r['verdict']}")
                continue
            print(f"  {name:<30} {r['estimate']:+.3f}  t {r['t']:+.2f}  df {r['df']:.1f}  p {r['p']:.3f}"
                  f"  Holm p {r['holm_p']:.3f}  {r['verdict']}")
    for name, r in c.get("test_rows", {}).items():
        print(f"  test {name:<30} {r['mean']:.3f} ± {r['std']:.3f}  bootstrap 95 % "
              f"[{r['bootstrap_95'][0]:.3f}, {r['bootstrap_95'][1]:.3f}]")


# -----------------------------------------------------------------------------
# C. Command line
# Read this when you run evaluate.py from a shell: options, the results file, one-line errors.
# main loads a checkpoint (or an untrained model), runs the tasks, prints, writes the JSON.
# -----------------------------------------------------------------------------


# The tables each task prints (print_results); they show every note.


def _fmt(v):
    return "  nan" if v is None or math.isnan(v) else f"{v:.3f}"


def _print_notes(notes, indent="  "):
    for note in notes:
        print(f"{indent}note: {note}")


def _protocol_text(protocol):
    """'grid', or 'gloria: 5 prompts per class, seed 6, z-scored per class; 5-5 used per class'."""
    if protocol["name"] != "gloria":
        return protocol["name"]
    used = protocol["prompts_used"]
    return (f"gloria: {protocol['prompts_per_class']} prompts per class, seed "
            f"{protocol['prompt_seed']}, z-scored per class; {used['min']}-{used['max']} used per class")


def _cell(value):
    """A table cell: a number, 'mean ± std', or '-' (no such number)."""
    if isinstance(value, (tuple, list)):
        return f"{_fmt(value[0])} ± {_fmt(value[1])}"
    return "-" if value is None else _fmt(value)


def print_against_baselines(rows, base):
    """The own-label table: the LABEL_METRICS of each row [(name, {metric: value or (mean, std)})],
    of the majority class and of chance, in the same columns: no number without its baselines."""
    n = sum(base["class_counts"].values())
    print("  images per class: " + ", ".join(f"{c} {k} ({k / n:.0%})" for c, k in
                                              base["class_counts"].items())
          + f"; {base['classes_present']} of {len(base['class_counts'])} classes present")
    chance = base["chance_accuracy"]
    rows = rows + [(f"majority class ({base['majority_class']})", base["majority"]),
                   (f"chance (1/{base['classes_present']})",
                    {"accuracy": chance, "balanced_accuracy": chance, "auroc": 0.5})]
    print(f"  {'':<30}" + "".join(f"{h:>16}" for h in ("accuracy", "balanced acc.", "macro-F1", "AUROC")))
    for name, metrics in rows:
        print(f"  {name:<30}" + "".join(f"{_cell(metrics.get(k)):>16}" for k in LABEL_METRICS))


def print_zeroshot(res):
    mc = res["multiclass"]
    if mc:
        print(f"zero-shot {len(mc['classes'])}-way on {mc['split']} (n={mc['n']}, prompts "
              f"{res['prompt_set']}, protocol {_protocol_text(mc['protocol'])}): accuracy "
              f"{_fmt(mc['accuracy'])}  macro-F1 {_fmt(mc['macro_f1'])}  (chance "
              f"{_fmt(mc['chance_accuracy'])} over the {mc['classes_present']} classes present; "
              f"majority class {_fmt(mc['majority']['accuracy'])})")
        if res.get("label_column"):
            floor = [("untrained floor", mc["floor"])] if mc.get("floor") else []
            print_against_baselines([("zero-shot", mc)] + floor, mc)
        for c in mc["classes"]:
            print(f"  {c:<28} recall {_fmt(mc['per_class_recall'][c])}  images "
                  f"{mc['class_counts'][c]}  prompts {mc['n_prompts'][c]}")
        for warning in mc["warnings"]:
            print(f"  warning: {warning}")
    if res.get("binary"):
        b = res["binary"]
        print(f"zero-shot binary on {b['split']} (protocol {b['protocol']['name']}): "
              f"mean AUROC {_fmt(b['mean_auroc'])}")
        for name, a in b["auroc"].items():
            print(f"  {name:<28} AUROC {_fmt(a)}  positives {b['n_positive'][name]}")
        _print_notes(b["notes"])
    if res.get("skipped"):
        print(f"zero-shot skipped: {res['skipped']}")
    else:
        _print_notes(res["notes"], "zero-shot ")


def print_fewshot(res):
    if res.get("skipped"):
        print(f"linear probe skipped: {res['skipped']}")
    elif res["kind"] == "multi-class":
        print(f"linear probe, {len(res['classes'])} classes of column {res['label_column']!r}, on "
              f"{res['split']} ({len(res['seeds'])} seeds, mean ± std; chance accuracy "
              f"{_fmt(res['chance_accuracy'])} over the {res['classes_present']} classes present)")
        floor = (res.get("floor") or {}).get("results", {})
        rows = []
        for name, r in res["results"].items():
            rows.append((f"{name} ({r['train_rows_per_seed'][0]} train rows)",
                         {k: (r[f"{k}_mean"], r[f"{k}_std"]) for k in LABEL_METRICS}))
            if name in floor:
                rows.append((f"{name} untrained floor", floor[name]))
        print_against_baselines(rows, res)
    else:
        print(f"linear probe on {res['split']} (labels: {', '.join(res['labels'])}; "
              f"{len(res['seeds'])} seeds)")
        for name, r in res["results"].items():
            print(f"  {name:<9} AUROC {_fmt(r['auroc_mean'])} ± {_fmt(r['auroc_std'])}  "
                  f"train rows {r['train_rows_per_seed'][0]}")
    _print_notes([n for n in res["notes"] if n != res.get("skipped")])


def print_retrieval(res):
    for split, r in res.items():
        if "note" in r:
            print(f"retrieval on {split}: {r['note']}")
            continue
        print(f"retrieval on {split}: {r['n_images']} images, {r['n_texts']} distinct texts "
              f"(report level: an identical report is the same candidate)")
        for d in ("i2t", "t2i"):
            print(f"  {d}  " + "  ".join(f"{k} {_fmt(v) if k != 'median_rank' else v}"
                                         for k, v in r[d].items()))
        for d in ("i2t", "t2i") if "exact_pair" in r else ():
            print(f"  {d} exact pair (an identical report of another image counts against)  "
                  + "  ".join(f"{k} {_fmt(v)}" for k, v in r["exact_pair"][d].items() if k.startswith("R@")))
        _print_notes(r.get("notes", []))


def print_pixel_probe(res):
    print(f"pixel probe (a CNN trained on the train split's pixels, {res['epochs']} epochs at "
          f"{res['image_size']} px) on {res['split']}, {res['seconds']:.1f} s")
    for name, value in res["auroc"].items():
        print(f"{name:28s} AUROC {value:.3f}  (test positives {res['n_positive'][name]})")
    print(f"{'mean':28s} AUROC {_fmt(res['mean_auroc'])}")
    if res.get("skipped"):
        print(f"pixel probe: nothing to score: {res['skipped']}")


PRINTERS = {"zeroshot": print_zeroshot, "fewshot": print_fewshot, "retrieval": print_retrieval,
            "pixel-probe": print_pixel_probe, "efficiency": print_efficiency,
            "ablation": print_ablation}


def print_results(task, res):
    """A readable table per task (plots print as they go)."""
    if task in PRINTERS:
        PRINTERS[task](res)


def untrained_model(cfg, manifest):
    """The model of cfg as initialised (seeded by cfg.seed), with the vocabulary of the
    manifest's training split: `--checkpoint random` and the floor row of an ablation."""
    tokenizer = msd.build_tokenizer(cfg, manifest)
    return msd.build_model(cfg, tokenizer.vocab_size).eval(), tokenizer


def load_for_eval(args):
    """-> (model, tokenizer, cfg, manifest, step, checkpoint path or None, its SHA-256 or None)."""
    device = msd.pick_device(args.device)
    if args.checkpoint == "random":
        cfg, path, ckpt = msd.load_config(args.config), None, {"step": 0, "sha256": None}
    else:
        path = Path(args.checkpoint or Path(msd.load_config(args.config).out_dir) / "ckpt.pt")
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}; train it first "
                                    f"({how_to_train(args)}) or evaluate an untrained model with "
                                    f"--checkpoint random")
        model, tokenizer, cfg, ckpt = msd.load_checkpoint(path, map_location=device)
    cfg = replace(cfg, skip_bad=args.skip_bad)  # evaluation leaves bad rows out only when asked
    manifest = Path(args.data) if args.data else msd.prepare_data(cfg, check_splits=False)
    if path is None:
        model, tokenizer = untrained_model(cfg, manifest)
        model = model.to(device)
    return model, tokenizer, cfg, manifest, ckpt["step"], path, ckpt["sha256"]


def how_to_train(args):
    """The command that trains the run a task reads (for messages)."""
    if args.checkpoint and args.checkpoint != "random":
        return f"python msd.py --config {args.config} --out_dir={Path(args.checkpoint).parent}"
    return f"python msd.py --config {args.config}"


def run_folder(args):
    """The folder of the run a task evaluates or draws: the checkpoint's, the run of --config
    (its out_dir), or for --checkpoint random a folder beside it, random-<config name>."""
    if args.checkpoint == "random":
        return Path(msd.load_config(args.config).out_dir).parent / f"random-{Path(args.config).stem}"
    if args.checkpoint:
        return Path(args.checkpoint).parent
    return Path(msd.load_config(args.config).out_dir)


NOT_PROTOCOL = ("task", "checkpoint", "config", "out", "device", "batch_size", "chunk_size",
                "debug", "overrides", "jobs", "readme_pictures", "force",
                "floor")  # where and how fast, and what is shown beside the numbers, not what


def protocol_of(args):
    """The options that define what a task measures, as written in its results file."""
    return to_json({k: v for k, v in sorted(vars(args).items()) if k not in NOT_PROTOCOL})


def _file_name_part(text):
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in str(text))


def default_out(args):
    """Where a task writes its JSON without --out; never results/ (the README's numbers):
      zeroshot / fewshot / retrieval / all -> <run>/eval/<task>[_<split>][_<data>][_<column>].json
      plots        -> <run>/plots/plots.json (--readme-pictures: runs/plots/readme-pictures.json)
      efficiency, pixel-probe -> runs/<task>/<config name>[_<data>].json
      ablation     -> <--ablation-dir>/<ablation file name>.json (where finished runs are recorded)
    or <name>-2.json, -3.json, ... when that file holds another task's or protocol's (free_name)."""
    variant = "" if args.split == "test" else f"_{args.split}"
    if args.data:
        data_path = Path(args.data)
        variant += f"_{data_path.parent.name if data_path.stem == 'manifest' else data_path.stem}"
    if args.label_column:
        variant += f"_{args.label_column}"
    if args.task == "ablation":
        return Path(args.ablation_dir) / f"{Path(args.ablation).stem}.json"
    if args.task in (*TASKS, "all"):
        path = run_folder(args) / "eval" / _file_name_part(f"{args.task}{variant}.json")
    elif args.task == "plots":
        path = (Path("runs/plots/readme-pictures.json") if args.readme_pictures
                else run_folder(args) / "plots" / "plots.json")
    else:
        path = Path("runs") / args.task / _file_name_part(f"{Path(args.config).stem}{variant}.json")
    return free_name(path, args.task, protocol_of(args))


def free_name(path, task, protocol):
    """path, or the first of <name>-2.json, -3.json, ... that these results may replace."""
    candidate, n = path, 1
    while replace_problem(candidate, task, protocol) is not None:
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


WRITTEN_BY = "evaluate.py"   # the mark of every results JSON this file writes (results_mark)
# results files written before the mark, known by keys that only their task writes
UNMARKED_RESULTS = {"ablation": ("recorded", "table"), "efficiency": ("rows", "matmul_tflops"),
                    "plots": ("plots", "missing"), "pixel-probe": ("auroc", "n_train", "image_size")}


def results_mark(args):
    """The keys by which replace_problem knows its own results files (never by their names)."""
    return {"written_by": WRITTEN_BY, "task": args.task, "protocol": protocol_of(args)}


def results_kind(res):
    """-> (task, protocol) of a parsed results file of evaluate.py (older: by its keys), or None."""
    if not isinstance(res, dict):
        return None
    if res.get("written_by") == WRITTEN_BY:
        return res.get("task"), res.get("protocol")
    tasks = [t for t in TASKS if t in res]
    if "checkpoint_sha256" in res and tasks:
        return ("all" if len(tasks) == len(TASKS) else tasks[0]), res.get("protocol")
    return next(((task, res.get("protocol")) for task, keys in UNMARKED_RESULTS.items()
                 if all(k in res for k in keys)), None)


def replace_problem(path, task, protocol, force=False):
    """Why the results of `task` under `protocol` may not replace what is at path (None: they
    may). Only evaluate.py's results of the same task and protocol may be replaced (an ablation
    file: of the same task; read_recorded checks its protocol); with force, of any task or
    protocol; never anything else (a checkpoint, a log, a manifest, a picture, a device)."""
    path = Path(path)
    if not os.path.lexists(path):
        return None
    if not path.is_file():
        return "is not a regular file (a device, a FIFO, a socket or a broken link); choose another --out"
    try:
        with open(path, "rb") as f:
            json_object = f.read(1) == b"{"             # a checkpoint is not read through
        kind = results_kind(data.read_json(path)) if json_object else None
    except (OSError, ValueError):
        kind = None
    if kind is None:
        return ("is not a results file of evaluate.py (a checkpoint, a log, a manifest, a picture "
                "or a file of yours?) and would be lost; choose another --out")
    # a file written before results_mark recorded no protocol: the same task may replace it
    if force or kind[0] == task and (task == "ablation" or kind[1] in (protocol, None)):
        return None
    which = f"--task {kind[0]}" if kind[0] != task else f"--task {task} under another protocol"
    return f"holds evaluate.py's results of {which}; choose another --out, or add --force to replace them"


def check_out(p, args, given):
    """Before any work: the results file can be written (not a folder, not under a file, in a
    folder this user can write) and what is there may be replaced (replace_problem); else a
    usage error naming the way out."""
    path, option = Path(args.out), "--out" if given else "the default results file"
    if path.is_dir():
        p.error(f"{option} {path} is a folder; give a file name, e.g. --out {path / 'results.json'}")
    folder = path.parent
    while not folder.exists():                         # the folders still to make: their parent
        folder = folder.parent
    if not folder.is_dir():
        p.error(f"{option} {path}: {folder} is a file, not a folder; choose another --out")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        p.error(f"{option} {path}: {folder} is not writable; choose another --out")
    problem = replace_problem(args.out, args.task, protocol_of(args), args.force)
    if problem:
        p.error(f"{option} {args.out} {problem}")


def to_json(obj):
    """numpy / torch values -> plain Python; NaN -> null (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [to_json(v) for v in obj]
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(obj) else float(obj)
    return obj


def write_json_atomic(path, obj):
    """obj as strict JSON (to_json), written whole or not at all (data.write_text)."""
    data.write_text(path, json.dumps(to_json(obj), indent=1, allow_nan=False))


def _numbers(text, kind):
    try:
        return tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values such as "
                                         f"{'1,2,4' if kind is int else '0.1,1'}, got {text!r}") from None


_floats, _ints = functools.partial(_numbers, kind=float), functools.partial(_numbers, kind=int)


def _names(text):
    """Names separated by commas, or a JSON list of strings (for names that hold a comma)."""
    if not text.lstrip().startswith("["):
        return [n.strip() for n in text.split(",")]
    try:
        names = data.parse_json(text, "the JSON list")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
        raise argparse.ArgumentTypeError(f"expected a JSON list of names such as '[\"a, b\", "
                                         f"\"c\"]', got {text!r}")
    return names


class Parser(argparse.ArgumentParser):
    """argparse with a usage error in one line (exit status 2); --help shows the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    p = Parser(prog="evaluate.py", description="Evaluate an MSD checkpoint: zero-shot, linear "
               "probe, retrieval; or a benchmark that needs no checkpoint.")
    add = p.add_argument       # --label-column is stored as args.label_column, and so on
    add("--task", default="all", choices=[*TASKS, "all", "pixel-probe", *BENCHMARKS],
        help="all = zeroshot, fewshot and retrieval; pixel-probe, efficiency and ablation train "
             "or time models themselves (no checkpoint)")
    add("--checkpoint", help="ckpt.pt, or 'random' for an untrained model of --config (default: "
                             "the run of --config)")
    add("--config", default="configs/small.json")
    add("--data", help="manifest CSV (default: the run's own dataset)")
    add("--split", default="test", help="the split evaluated: N-way zero-shot with --label-column, "
        "binary zero-shot, probe, retrieval (the 5-way CheXpert protocol always uses test_5x)")
    add("--label-column", help="a manifest column holding one class name per row: N-way "
                               "zero-shot and a multi-class probe over its classes")
    add("--out", help="the results JSON (default: <run>/eval/<task>.json beside the checkpoint; "
                      "benchmarks: runs/<task>/...; see default_out)")
    add("--force", action="store_true", help="let --out replace evaluate.py's results of another "
        "task or protocol (never a checkpoint, log, manifest, picture or any other file)")
    add("--debug", action="store_true", help="a user error shows its traceback")
    add("--floor", help="with --label-column: the results of --checkpoint random to show beside "
                        "the model's (default: where that command writes them)")
    add("--prompt-set", choices=prompt_set_names(), help="a shipped prompt set, configs/prompts/"
        "NAME.json (default: synth for a synthetic manifest, the class names with --label-column, "
        "else chexpert; pneumonia for RSNA)")
    add("--prompts", help="your own JSON prompt file, keyed by class names")
    add("--zeroshot-protocol", default="grid", choices=list(ZEROSHOT_PROTOCOLS),
        help="N-way zero-shot: grid = every prompt, mean class vector (default); gloria = "
             "GLoRIA's: sampled prompts, highest cosine, z-scored per class")
    add("--prompts-per-class", type=int, default=5,
        help="gloria: prompts drawn per class (GLoRIA draws 5)")
    add("--prompt-seed", type=int, default=6,
        help="gloria: seed of the draw (6 draws GLoRIA's prompts from the chexpert grid)")
    add("--binary-protocol", default="prompts", choices=list(BINARY_PROTOCOLS),
        help="binary zero-shot: prompts = the prompt set's positives against its negatives "
             "(default); chexzero = CheXzero's ('<finding>', 'no <finding>')")
    add("--labels", type=_names, help="CheXpert labels to probe, separated by commas, or a JSON "
        "list such as '[\"a, b\", \"c\"]' for names holding a comma (default: those with both "
        "classes in train and --split)")
    add("--shots", type=_ints, default=(1, 2, 4, 8, 16))
    add("--fractions", type=_floats, default=(0.01, 0.1, 1.0))
    add("--seeds", type=int, default=5)
    add("--weight-decays", type=_floats, default=WEIGHT_DECAYS)
    add("--ks", type=_ints, default=(1, 5, 10))
    add("--chunk-size", type=int, default=256)
    add("--batch-size", type=int, default=64)
    add("--device", default="cpu", help="cpu, cuda, mps or auto")
    add("--no-5x", dest="with_5x", action="store_false",
        help="skip everything on the test_5x split (e.g. when tuning on --split valid)")
    add("--epochs", type=int, default=8, help="pixel-probe: training epochs")
    add("--no-probe", dest="probe", action="store_false", help="ablation: skip the probe")
    add("--steps", type=int, default=5, help="efficiency: optimizer steps timed per row")
    add("--repeats", type=int, default=3,
        help="efficiency: times each row's --steps are timed; their spread is reported")
    add("--sweep", action="store_true",
        help="efficiency: the micro-batch sweep on the CPU too (always on CUDA)")
    add("--time-budget", type=float, default=0,
        help="efficiency: skip rows that would start after this many seconds (0 = none)")
    add("--ablation", default="configs/ablation.json", help="ablation: the run list")
    add("--ablation-dir", default="runs/ablation",
        help="ablation: where runs are trained (finished runs are reused)")
    add("--report", action="store_true", help="ablation: print the table and the contrasts of the "
        "runs recorded in --out; train nothing, write nothing (safe while the runs go on)")
    add("--jobs", type=int, default=1,
        help="ablation: runs trained at once, each in a process of one thread")
    add("--skip-bad", action="store_true", help="evaluate the good rows of a manifest with bad "
        "ones; the others are counted and recorded in the results (skipped_rows)")
    add("--allow-split-overlap", action="store_true",
        help="evaluate although a patient or study is in train and in another split")
    add("--readme-pictures", action="store_true", help="plots: redraw the README's "
        "results/plots/*.svg from results/ (default: the pictures of the run of --checkpoint / "
        "--config, in its folder)")
    return p


def check_options(p, args):
    """Options that the chosen task would ignore are errors, never silent no-ops."""
    uses = {"prompts": ("zeroshot", "all"), "prompt_set": ("zeroshot", "all"),
            "label_column": (*TASKS, "all"), "labels": ("fewshot", "all"), "readme_pictures": ("plots",),
            "floor": ("zeroshot", "fewshot", "all"), "repeats": ("efficiency",), "skip_bad": (*TASKS, "all"),
            "report": ("ablation",),
            **dict.fromkeys(("zeroshot_protocol", "prompts_per_class", "prompt_seed",
                             "binary_protocol"), ("zeroshot", "all"))}
    for key, tasks in uses.items():
        if getattr(args, key) not in (None, p.get_default(key)) and args.task not in tasks:
            p.error(f"--{key.replace('_', '-')} is not used by --task {args.task} "
                    f"(only by {', '.join(tasks)})")
    if args.prompts and args.prompt_set:
        p.error("give --prompts FILE or --prompt-set NAME, not both")
    for key in ("prompts_per_class", "prompt_seed"):       # the settings of the gloria draw
        if getattr(args, key) != p.get_default(key) and args.zeroshot_protocol != "gloria":
            p.error(f"--{key.replace('_', '-')} is used only by --zeroshot-protocol gloria")
    if args.prompts_per_class < 1:
        p.error(f"--prompts-per-class {args.prompts_per_class}: at least 1 prompt per class")
    if args.label_column and args.binary_protocol != p.get_default("binary_protocol"):
        p.error("--binary-protocol is not used with --label-column (binary zero-shot scores the "
                "CheXpert label columns)")
    if args.floor and (not args.label_column or args.checkpoint == "random"):
        p.error("--floor shows the untrained floor beside a checkpoint's own-label results: it "
                "needs --label-column and a --checkpoint other than random")
    check_values(p, args)


AT_LEAST_ONE = ("seeds", "chunk_size", "batch_size", "epochs", "steps", "jobs", "repeats")  # counts, sizes


def check_values(p, args):
    """Values that make no sense are usage errors, before anything runs."""
    def refuse(key, why):
        value = getattr(args, key)
        shown = ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else value
        p.error(f"--{key.replace('_', '-')} {shown}: {why}")

    for key in AT_LEAST_ONE:
        if getattr(args, key) < 1:
            refuse(key, "must be at least 1")
    for key in ("shots", "ks"):
        values = getattr(args, key)
        if min(values) < 1 or len(set(values)) < len(values):
            refuse(key, "each value at least 1, none twice")
    if not all(0 < f <= 1 for f in args.fractions):
        refuse("fractions", "fractions of the training labels, each above 0 and at most 1 (= all)")
    names = [f"{f:.0%}" for f in args.fractions]          # how the results name them
    if len(set(names)) < len(names) or "0%" in names:
        refuse("fractions", f"the results name each by its whole percent ({', '.join(names)}); give "
                            f"distinct fractions of at least 0.005")
    if not all(math.isfinite(w) and w >= 0 for w in args.weight_decays):
        refuse("weight_decays", "each a finite number, at least 0")
    if not (math.isfinite(args.time_budget) and args.time_budget >= 0):
        refuse("time_budget", "seconds, a finite number at least 0 (0 = no budget)")
    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except RuntimeError:
            refuse("device", "expected cpu, cuda, cuda:N, mps or auto")
        if device.type == "cuda" and not torch.cuda.is_available():
            refuse("device", "this machine has no CUDA device (torch.cuda.is_available() is "
                             "False); use --device cpu")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            refuse("device", f"this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        if device.type == "mps" and not torch.backends.mps.is_available():
            refuse("device", "this machine has no MPS device; use --device cpu")


def evaluate_checkpoint(args):
    """The checkpoint tasks -> (results, problems: what was asked for but could not be computed)."""
    tasks = list(TASKS) if args.task == "all" else [args.task]
    for task in {"zeroshot", "fewshot"}.intersection(tasks) if args.floor else ():
        find_floor(args, task)                # a --floor FILE that does not fit: before any work
    model, tokenizer, cfg, manifest, step, checkpoint, sha256 = load_for_eval(args)
    ev = Evaluation(model, tokenizer, cfg, manifest, step, checkpoint, args.batch_size, sha256,
                    skip_bad=args.skip_bad)
    data.check_split_overlap(ev.rows, manifest, args.allow_split_overlap, contents=True)
    print(f"checkpoint {checkpoint or 'random (untrained)'} | step {step} | manifest {manifest} | "
          f"splits {ev.split_sizes}")
    results = {"checkpoint": str(checkpoint) if checkpoint else "random", "step": step,
               "checkpoint_sha256": sha256, "manifest": str(manifest), "split": args.split,
               "protocol": protocol_of(args), "split_sizes": ev.split_sizes, "config": asdict(cfg),
               "skipped_rows": [b._asdict() for b in ev.skipped]}   # --skip-bad: nothing dropped unseen
    skipped = {}
    for task in tasks:
        results[task] = TASKS[task](ev, args)
        add_floor(task, results[task], args, manifest)
        print_results(task, results[task])
        if skipped_reason(task, results[task]):
            skipped[task] = skipped_reason(task, results[task])
    if args.task == "all" and len(skipped) < len(tasks):   # all: a task that does not apply
        return results, []
    return results, [f"--task {task}: {why}" for task, why in skipped.items()]


def add_floor(task, res, args, manifest):
    """Own-label results (--label-column) of a checkpoint get the untrained floor's numbers beside
    them (find_floor), or a note saying how to make them."""
    if not args.label_column or args.checkpoint == "random" or task not in ("zeroshot", "fewshot") \
            or res.get("skipped"):
        return
    path, floor, notes = find_floor(args, task, manifest)
    res["notes"] += notes
    if floor is None:
        res["notes"].append(f"no untrained floor beside these numbers: the same command with "
                            f"--checkpoint random --config <the run's config> writes it (or give "
                            f"--floor FILE)")
    elif task == "zeroshot":
        mc = floor.get("multiclass") or {}
        res["multiclass"]["floor"] = {"file": str(path), **{k: mc.get(k) for k in LABEL_METRICS}}
    else:
        res["floor"] = {"file": str(path), "results": {
            name: {k: (r.get(f"{k}_mean"), r.get(f"{k}_std")) for k in LABEL_METRICS}
            for name, r in (floor.get("results") or {}).items()}}
    if floor is not None:
        res["notes"].append(f"untrained floor: {path}")


FLOOR_KEYS = ("split", "label_column", "data")  # what a floor must share with the evaluation


def find_floor(args, task, manifest=None):
    """The `task` results of --checkpoint random for this evaluation -> (path, those results,
    notes), or (None, None, notes): --floor FILE (same split, label column and --data, else an
    error), else where that command writes them or a file of the run's eval folder, for the very
    same protocol. With `manifest`, a floor evaluated on another manifest is not used (a note)."""
    protocol, notes = protocol_of(args), []
    if args.floor:
        res = data.read_json(args.floor)
        why = floor_problem(res, task)
        recorded = (res.get("protocol") or {}) if why is None else {}
        why = why or next((f"its {k} is {recorded.get(k)!r}, this evaluation's {protocol[k]!r}"
                           for k in FLOOR_KEYS if recorded.get(k) != protocol[k]), None)
        if why:
            raise data.InputError(f"--floor {args.floor}: {why}; give the results of --checkpoint random "
                                  f"with the same --split, --label-column and --data")
        if manifest is not None and not same_manifest(res, manifest):
            notes.append(f"the untrained floor {args.floor} was evaluated on {res.get('manifest')}, "
                         f"not on {manifest}: not shown")
            return None, None, notes
        other = sorted(k for k in protocol if recorded.get(k) != protocol[k])
        if other:
            notes.append(f"the untrained floor {args.floor} was evaluated with other {', '.join(other)}")
        return Path(args.floor), res[task], notes
    candidates = []
    try:
        untrained = {**vars(args), "checkpoint": "random"}
        candidates += [default_out(argparse.Namespace(**{**untrained, "task": t}))
                       for t in dict.fromkeys((task, "all"))]
    except (OSError, ValueError, KeyError) as e:    # --config cannot be read: no default place
        notes.append(f"no default place for the untrained floor ({msd.one_line(e)})")
    candidates += sorted((run_folder(args) / "eval").glob("*.json"))
    for path in dict.fromkeys(candidates):
        if not path.is_file():
            continue
        try:
            res = data.read_json(path)
        except (OSError, ValueError) as e:
            notes.append(f"not read while looking for the untrained floor: {msd.one_line(e)}")
            continue
        if floor_problem(res, task) is None and res.get("protocol") == protocol \
                and (manifest is None or same_manifest(res, manifest)):
            return path, res[task], notes
    return None, None, notes


def same_manifest(res, manifest):
    """Whether a results file was evaluated on `manifest` (paths compared resolved)."""
    return isinstance(res.get("manifest"), str) and Path(res["manifest"]).resolve() == Path(manifest).resolve()


def floor_problem(res, task):
    """Why a parsed results file is not an untrained floor of `task` (None: it is one)."""
    if results_kind(res) is None:
        return "not a results file of evaluate.py"
    if res.get("checkpoint") != "random":
        return f"the results of checkpoint {res.get('checkpoint')!r}, not of --checkpoint random"
    if not isinstance(res.get(task), dict) or res[task].get("skipped"):
        return f"it holds no {task} results"
    return None


def main(argv=None):
    """Parse and check the options, check that the results file can be written, run the task,
    print its tables, write its JSON (see default_out). User errors raise; cli() prints them."""
    p = build_parser()
    args, overrides = p.parse_known_args(argv)
    args.overrides = overrides  # efficiency: --key=value config overrides, as for msd.py
    if overrides and args.task != "efficiency":
        p.error(f"unrecognized arguments: {' '.join(overrides)}")
    check_options(p, args)
    given = args.out is not None
    args.out = str(args.out or default_out(args))   # the benchmarks write it as they go, too
    check_out(p, args, given)

    problems = []
    if args.task in BENCHMARKS:
        results = BENCHMARKS[args.task](args)
        print_results(args.task, results)
        if results.get("report_only"):   # --report: the results file stays as the runner wrote it
            return results
    elif args.task == "pixel-probe":
        results = {**run_pixel_probe(args), "protocol": protocol_of(args)}
        print_results(args.task, results)
        if results.get("skipped"):
            problems.append(f"--task pixel-probe: {results['skipped']}")
    else:
        results, problems = evaluate_checkpoint(args)
    results = {**results_mark(args), **results}
    write_json_atomic(args.out, results)
    print(f"wrote {args.out}")
    if problems:
        raise SystemExit("evaluate.py: error: nothing computed for what was asked: " + "; ".join(problems))
    return results


def cli(argv=None):
    """main, with a user error (msd.USER_ERRORS) printed as ONE line `evaluate.py: error: ...`, exit
    status 1; anything else is a bug and keeps its traceback (--debug: both do)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except msd.USER_ERRORS as e:
        if "--debug" in argv:
            raise
        print(f"evaluate.py: error: {msd.one_line(e)}", file=sys.stderr)
        sys.exit(1)


# -----------------------------------------------------------------------------
# D. Pictures
# Read this when you redraw a run's or the README's pictures (--task plots); it computes no
# number. SVG written by hand (no plotting library).
# -----------------------------------------------------------------------------

# `--task plots` draws one run's pictures into its folder:
#   <run>/log.jsonl          -> <run>/plots/log.svg, training curves
#   <run>/eval/<name>.json   -> <run>/plots/eval_<name>.svg, its evaluation numbers as bars
# and, with --readme-pictures, the README's pictures from the files in results/:
#   results/efficiency*.json -> memory of one step against the effective batch ("growth:" rows)
#   results/ablation*.json   -> the quality table as grouped bars with ±std whiskers
#   results/batch_*.json, results/study*.json -> the same, with the valid-split metrics
#   results/*log.jsonl       -> training curves (a run's log.jsonl, copied there from runs/)
# each into results/plots/<input name>.svg. Plain <svg> with lines, rectangles, polylines and
# text, which GitHub's markdown viewer shows as an image. A run name has one colour in every
# ablation picture drawn together.

PLOTS_FROM, PLOTS_TO = Path("results"), Path("results/plots")
COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
          "#9c755f", "#17becf", "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#a6761d"]
# one per series, in order (none of them the grey of the floor rows); repeats after sixteen
FLOOR_RUNS, FLOOR_COLOR = ("random", "warm_start"), "#666"  # the floor rows of a table: grey
CHAR_WIDTH = 0.6  # a sans-serif glyph is about 0.6 font sizes wide on average: for laying out text
METRIC_NAMES = {"zs_acc": "zero-shot accuracy", "zs_f1": "zero-shot macro-F1",
                "zs_auroc": "zero-shot AUROC", "probe_100%": "linear probe AUROC (100% of train)",
                "i2t_R@10": "image-to-text R@10", "t2i_R@10": "text-to-image R@10",
                "mean_R@10": "mean R@10 (both directions)"}
CURVE_NAMES = {"loss": "loss (of the logged optimizer step)",
               "tau": "tau: the learned temperature", "alpha": "alpha: weight of the teacher's soft targets",
               "lr": "learning rate", "grad_norm": "gradient norm (before clipping)"}
FROM_ZERO = ("alpha", "lr")  # curves that start at 0 (warm-up ramps): their axis starts there too


class Svg:
    """An SVG picture built element by element: pixel coordinates, x to the right, y down."""

    def __init__(self, width, height):
        self.width, self.height, self.parts = width, height, []

    def add(self, tag, text=None, **attrs):
        """One element; class_="bar" -> class="bar", stroke_width=2 -> stroke-width="2"."""
        pairs = " ".join(f'{k.rstrip("_").replace("_", "-")}="{_attr(v)}"' for k, v in attrs.items())
        body = "" if text is None else _escape(str(text))
        self.parts.append(f"<{tag} {pairs}/>" if text is None else f"<{tag} {pairs}>{body}</{tag}>")

    def text(self, x, y, text, size=12, anchor="start", **attrs):
        self.add("text", text, x=x, y=y, font_size=size, text_anchor=anchor, **attrs)

    def line(self, x1, y1, x2, y2, color="#000", width=1, **attrs):
        self.add("line", x1=x1, y1=y1, x2=x2, y2=y2, stroke=color, stroke_width=width, **attrs)

    def write(self, path, title):
        """The whole document, with a white background and a <title> (what screen readers say),
        written atomically. It replaces only a picture that evaluate.py drew (drawn_here)."""
        head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
                f'viewBox="0 0 {self.width} {self.height}" font-family="sans-serif">\n'
                f"<title>{_escape(title)}</title>\n"
                f'<rect x="0" y="0" width="{self.width}" height="{self.height}" fill="#fff"/>\n')
        if os.path.lexists(path) and not drawn_here(path):
            raise data.InputError(f"{path}: not a picture that evaluate.py drew, left as it is; move it "
                                  f"away to draw this picture there")
        data.write_text(path, head + "\n".join(self.parts) + "\n</svg>\n")


def drawn_here(path):
    """Whether path is a regular file that Svg.write wrote: its <svg> line, then its <title>."""
    if not Path(path).is_file():
        return False
    with open(path, "rb") as f:
        lines = f.read(4096).decode("utf-8", "replace").split("\n")
    return (len(lines) > 2 and lines[0].startswith('<svg xmlns="http://www.w3.org/2000/svg" width=')
            and lines[0].endswith('font-family="sans-serif">') and lines[1].startswith("<title>"))


def _escape(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _attr(value):
    return f"{value:.1f}" if isinstance(value, float) else _escape(str(value))


def _wrap(text, width):
    """Words -> lines of at most `width` characters (a longer word gets a line of its own)."""
    lines = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def _number(value):
    """A finite float, or None for a missing value (null in JSON, NaN, a string, True/False)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def nice_ticks(lo, hi, n=5):
    """About n round tick values (1, 2 or 5 times a power of ten) from <= lo to >= hi."""
    if hi - lo < 1e-12 * max(1.0, abs(hi)):           # one value: a range around it
        lo, hi = lo - max(abs(lo) * 0.5, 0.5), hi + max(abs(hi) * 0.5, 0.5)
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if step * m >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def _axes(svg, box, x_ticks, y_ticks, x_labels=True, grid=True):
    """Frame, grid lines and tick labels of box = (left, top, width, height); x_ticks, y_ticks:
    (value, label) pairs spanning each axis. -> the maps value -> pixel (fx, fy), big y high."""
    left, top, width, height = box
    (x0, x1), (y0, y1) = (x_ticks[0][0], x_ticks[-1][0]), (y_ticks[0][0], y_ticks[-1][0])

    def fx(v):
        return left + (v - x0) / (x1 - x0) * width

    def fy(v):
        return top + height - (v - y0) / (y1 - y0) * height

    for value, label in y_ticks:
        if grid:
            svg.line(left, fy(value), left + width, fy(value), color="#ddd")
        svg.text(left - 6, fy(value) + 4, label, size=11, anchor="end")
    for value, label in x_ticks:
        if label:
            svg.line(fx(value), top + height, fx(value), top + height + 4)
        if x_labels:
            svg.text(fx(value), top + height + 17, label, size=11, anchor="middle")
    svg.add("rect", x=left, y=top, width=width, height=height, fill="none", stroke="#000")
    return fx, fy


def _notes(svg, y, notes, fill="#a33", prefix="note: ", font=11):
    """Notes (values that were skipped, ...) as wrapped lines from y down; -> the y after them."""
    for note in notes:
        for line in _wrap(prefix + note, int(svg.width / (CHAR_WIDTH * font)) - 4):
            svg.text(10, y, line, size=font, fill=fill)
            y += font + 4
    return y


def plot_memory(efficiency_path, out_path, key="step_memory_mb"):
    """Memory of one step against the effective batch B, from the "growth:" rows of an efficiency
    file: end-to-end CLIP at B against exact CLIP and MSD with B/b micro-batches of b. -> notes."""
    res = data.read_json(efficiency_path)
    series, notes = {}, []                 # "CLIP" / "CLIP exact" / "MSD" -> [(B, memory MB)]
    legend = {"CLIP": "end-to-end CLIP (one batch of B)", "MSD": "MSD (micro-batches, teacher, queue)",
              "CLIP exact": "exact CLIP accumulation (micro-batches)"}
    for row in res.get("rows", []) if isinstance(res, dict) else []:
        name = str(row.get("name", "")) if isinstance(row, dict) else ""
        if not name.startswith("growth: "):
            continue
        words = name.split()                           # "growth: MSD 4x32 (B=128)"
        method = "CLIP exact" if words[1:3] == ["CLIP", "exact"] else words[1]  # "growth: CLIP exact 4x32 ..."
        batch, value = _number(row.get("effective_batch")), _number(row.get(key))
        micro = words[2 + (method == "CLIP exact")] if len(words) > 3 else ""
        if method != "CLIP" and "x" in micro:
            b = micro.split("x")[-1]
            legend[method] = (f"MSD (B/{b} micro-batches, teacher, queue)" if method == "MSD" else
                              f"exact CLIP accumulation (B/{b} micro-batches)")
        if batch is None or value is None:
            notes.append(f"{name}: no {key} or effective_batch, not drawn")
            continue
        series.setdefault(method, []).append((batch, value))
    if not any(series.values()):
        raise data.InputError(f"{efficiency_path}: no 'growth: ...' rows with {key} (rows come from "
                         f"python evaluate.py --task efficiency)")
    batches = sorted({b for points in series.values() for b, _ in points})
    top = max(v for points in series.values() for _, v in points)
    svg = Svg(600, 430)
    box = (70, 80, 440, 250)
    lo, hi = math.log2(batches[0]), math.log2(batches[-1])  # log scale: B doubles per tick
    pad = max(hi - lo, 1) * 0.06                       # keeps the end points off the frame
    x_ticks = [(lo - pad, "")] + [(math.log2(b), f"{b:g}") for b in batches] + [(hi + pad, "")]
    # 10 % headroom: the "... MB" label above the highest point stays inside the frame
    fx, fy = _axes(svg, box, x_ticks, [(v, f"{v:g}") for v in nice_ticks(0, 1.1 * top, 6)])
    svg.text(300, 24, "Memory of one optimizer step against the effective batch B", size=15,
             anchor="middle", font_weight="bold")
    summary = growth_summary(series)
    for i, line in enumerate(_wrap(summary, int(svg.width / (CHAR_WIDTH * 12)) - 2)[:2]):
        svg.text(300, 44 + 16 * i, line, size=12, anchor="middle")
    svg.text(290, 365, "effective batch B (pairs per optimizer step), log scale", anchor="middle")
    y_label = f"{key.replace('_mb', '').replace('_', ' ')} (MB) on {res.get('device', '?')}"
    svg.text(18, 205, y_label, anchor="middle", transform="rotate(-90 18 205)")
    label_ys = []                                      # end labels already placed: never stacked
    for k, (method, points) in enumerate(sorted(series.items())):
        color, points = COLORS[k % len(COLORS)], sorted(points)
        svg.add("polyline", class_="series", fill="none", stroke=color, stroke_width=2.5,
                points=" ".join(f"{fx(math.log2(b)):.1f},{fy(v):.1f}" for b, v in points))
        for b, v in points:
            svg.add("circle", class_="point", cx=fx(math.log2(b)), cy=fy(v), r=4, fill=color)
        last_b, last_v = points[-1]
        y_end = fy(last_v) - 9
        while any(abs(y_end - y) < 13 for y in label_ys):
            y_end -= 13
        label_ys.append(y_end)
        svg.text(fx(math.log2(last_b)) - 6, y_end, f"{last_v:.0f} MB", size=11, anchor="end", fill=color)
        svg.add("rect", x=box[0] + 12, y=box[1] + 12 + 18 * k, width=14, height=10, fill=color)
        svg.text(box[0] + 32, box[1] + 21 + 18 * k, legend.get(method, method), size=12)
    about = (f"{Path(efficiency_path).name}: device {res.get('device', '?')} ({res.get('machine', '?')}, "
             f"{res.get('threads', '?')} threads), config {res.get('config', '?')}"
             f"{''.join(' ' + str(o) for o in res.get('overrides', []))}. "
             f"Memory: {res.get('memory', 'not described')}.")
    y = _notes(svg, 388, [about], fill="#444", prefix="")
    svg.height = _notes(svg, y, notes) + 4
    svg.write(out_path, f"Memory of one optimizer step against the effective batch. {summary} "
                        f"({efficiency_path})")
    return notes


def growth_summary(series):
    """What the memory picture shows, in words: each method's first and last point and their
    ratio, e.g. "B = 32 -> 256: CLIP 152 -> 948 MB (6.2x), MSD 158 -> 329 MB (2.1x)"."""
    parts = []
    for method, points in sorted(series.items()):
        (b0, v0), (b1, v1) = min(points), max(points)
        ratio = f" ({v1 / v0:.1f}×)" if v0 > 0 else ""
        parts.append(f"{method} {v0:.0f} → {v1:.0f} MB{ratio}")
    batches = sorted(b for points in series.values() for b, _ in points)
    return f"B = {batches[0]:g} → {batches[-1]:g}: " + ", ".join(parts)


def read_log(log_path):
    """A run's log.jsonl -> records sorted by step (of a step logged twice, the later record)."""
    by_step = {}
    for i, line in enumerate(Path(log_path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = data.parse_json(line, f"{log_path} line {i}")
        if not isinstance(record, dict) or _number(record.get("step")) is None:
            raise data.InputError(f"{log_path} line {i}: a record needs a numeric 'step', got {line[:80]!r}")
        by_step[record["step"]] = record
    if not by_step:
        raise data.InputError(f"{log_path}: no records")
    return [by_step[s] for s in sorted(by_step)]


def plot_curves(log_path, out_path, keys=None):
    """Training curves of one run, one panel per key (default: loss, tau, alpha, valid_*) on a
    shared step axis; a value null, NaN or not a number leaves a gap, with a note. -> notes."""
    records = read_log(log_path)
    logged = {k for r in records for k in r}
    keys = list(keys or [k for k in ("loss", "tau", "alpha") if k in logged]  # alpha: MSD runs only
                + sorted(k for k in logged if k.startswith("valid_")))
    notes = [f"'{k}' is not in the log, no panel" for k in keys if k not in logged]
    keys = [k for k in keys if k in logged]
    if not keys:
        raise data.InputError(f"{log_path}: none of the keys to plot is logged (it has {sorted(logged)})")
    panel_h, gap, left, width = 110, 34, 70, 480
    svg = Svg(600, 0)  # the height is known once the notes are placed
    name = f"{Path(log_path).parent.name}/{Path(log_path).name}"      # run/log.jsonl
    svg.text(300, 24, f"Training curves of {name}", size=15, anchor="middle", font_weight="bold")
    last_step = max(float(r["step"]) for r in records)
    x_ticks = ticks_up_to(last_step)
    for k, key in enumerate(keys):
        segments, bad = [[]], 0                        # runs of finite values; a bad value ends one
        for r in records:
            if key in r and _number(r[key]) is None:
                bad, segments = bad + 1, segments + [[]]
            elif key in r:
                segments[-1].append((float(r["step"]), _number(r[key])))
        if bad:
            notes.append(f"{key}: {bad} value(s) null, NaN or not a number, skipped (a gap in the "
                         f"curve)")
        values = [v for seg in segments for _, v in seg] or [0.0]
        top = 50 + k * (panel_h + gap)
        low = min(0.0, min(values)) if key in FROM_ZERO else min(values)
        y_ticks = [(v, f"{v:g}") for v in nice_ticks(low, max(values), 3)]
        fx, fy = _axes(svg, (left, top, width, panel_h), x_ticks, y_ticks, x_labels=k == len(keys) - 1)
        svg.text(left, top - 6, CURVE_NAMES.get(key, key), size=12, font_weight="bold")
        color = COLORS[k % len(COLORS)]
        for seg in segments:
            if len(seg) == 1:                          # a lone point: a dot (a polyline is invisible)
                svg.add("circle", class_="point", cx=fx(seg[0][0]), cy=fy(seg[0][1]), r=2.5, fill=color)
            elif seg:
                svg.add("polyline", class_="series", fill="none", stroke=color, stroke_width=1.8,
                        points=" ".join(f"{fx(s):.1f},{fy(v):.1f}" for s, v in seg))
    bottom = 50 + len(keys) * (panel_h + gap) - gap  # of the last panel
    svg.text(left + width / 2, bottom + 36, "optimizer step", anchor="middle")
    svg.height = _notes(svg, bottom + 58, notes) + 4
    svg.write(out_path, f"Training curves of {name}: {', '.join(keys)} over {last_step:g} "
                        f"optimizer steps")
    return notes


def ticks_up_to(last, n=6):
    """(value, label) ticks of a step axis from 0: round values below `last`, then `last` itself."""
    if last <= 0:
        return [(v, f"{v:g}") for v in nice_ticks(min(last, 0.0), 0.0, n)]
    ticks = [v for v in nice_ticks(0, last, n) if v <= 0.92 * last]
    return [(v, f"{v:g}") for v in ticks + [last]]


def run_colors(names):
    """One colour per run name, the same in every picture drawn with this map: the floor rows
    grey, the others in the order they first appear in `names`."""
    others = [n for n in dict.fromkeys(names) if n not in FLOOR_RUNS]
    return {**{n: FLOOR_COLOR for n in FLOOR_RUNS},
            **{n: COLORS[k % len(COLORS)] for k, n in enumerate(others)}}


def draw_bars(bars, runs, groups, colors, title, y_label, marks=None):
    """Grouped bars, one group per (key, label) of `groups`, one bar per run: bars {(key, run):
    (mean, std or None)}, whiskers at mean ± std; marks {key: {MARKS name: value}}: dashed lines.
    -> (Svg, the y just under the group labels), for the caller to add notes and write."""
    marks = {key: {n: _number(v) for n, v in m.items() if _number(v) is not None}
             for key, m in (marks or {}).items()}
    mark_names = [n for n in MARKS if any(n in m for m in marks.values())]
    bar_w, gap, left, top, height = max(12, 60 // len(runs)), 26, 64, 50, 260
    group_w = len(runs) * bar_w + gap
    legend_x = left + len(groups) * group_w + 24
    legend_w = max(len(r) for r in [*runs, *mark_names]) * CHAR_WIDTH * 12 + 30
    svg = Svg(int(max(legend_x + legend_w, CHAR_WIDTH * 15 * len(title) + 20)), 0)
    highest = max(m + (s or 0) for m, s in bars.values())
    _, fy = _axes(svg, (left, top, len(groups) * group_w, height), [(0, ""), (1, "")],
                  [(v, f"{v:g}") for v in nice_ticks(0, max(1.0, highest), 5)], x_labels=False)
    svg.text(svg.width / 2, 24, title, size=15, anchor="middle", font_weight="bold")
    svg.text(18, top + height / 2, y_label, anchor="middle", transform=f"rotate(-90 18 {top + height / 2})")
    lines = 1
    for g, (key, label) in enumerate(groups):
        x0 = left + g * group_w + gap / 2
        for k, run in enumerate(runs):
            if (key, run) not in bars:
                continue
            mean, std = bars[key, run]
            x, color = x0 + k * bar_w, colors[run]
            y_base, y_top = fy(0), fy(max(mean, 0.0))
            svg.add("rect", class_="bar", x=x + 1, y=y_top, width=bar_w - 2, height=y_base - y_top,
                    fill=color, data_run=run)
            if std is not None:                        # the whisker, cut at the axis
                xm, low, high = x + bar_w / 2, fy(max(mean - std, 0.0)), fy(mean + std)
                svg.line(xm, low, xm, high)
                svg.line(xm - 3, low, xm + 3, low)
                svg.line(xm - 3, high, xm + 3, high)
        for name, value in marks.get(key, {}).items():     # majority class, untrained floor
            color, dashes = MARKS[name]
            svg.line(x0 - 4, fy(value), x0 + len(runs) * bar_w + 4, fy(value), color=color, width=2,
                     stroke_dasharray=dashes, class_="mark", data_mark=name)
        wrapped = _wrap(label, max(int(group_w / (CHAR_WIDTH * 11)), 6))
        lines = max(lines, len(wrapped))
        for i, line in enumerate(wrapped):
            svg.text(x0 + len(runs) * bar_w / 2, top + height + 16 + 14 * i, line, size=11, anchor="middle")
    for k, run in enumerate(runs):
        svg.add("rect", class_="swatch", x=legend_x, y=top + 18 * k, width=14, height=10,
                fill=colors[run], data_run=run)
        svg.text(legend_x + 20, top + 9 + 18 * k, run, size=12)
    for k, name in enumerate(mark_names, len(runs)):
        color, dashes = MARKS[name]
        svg.line(legend_x, top + 5 + 18 * k, legend_x + 14, top + 5 + 18 * k, color=color, width=2,
                 stroke_dasharray=dashes)
        svg.text(legend_x + 20, top + 9 + 18 * k, name, size=12)
    return svg, top + height + 16 + 14 * lines + 16


ABLATION_METRICS = ("zs_acc", "probe_100%", "i2t_R@10", "t2i_R@10")
BATCH_METRICS = ("zs_auroc", "i2t_R@10", "t2i_R@10", "mean_R@10")  # the valid-split studies: no probe


def plot_ablation(ablation_path, out_path, metrics=ABLATION_METRICS, colors=None):
    """An ablation file ({"table": {run: {metric: [mean, std]}}}) as grouped bars, one group per
    metric, whiskers at mean ± sample std over seeds; colors: run -> colour (run_colors). A
    missing mean is no bar, with a note; a missing std no whisker. -> notes."""
    res = data.read_json(ablation_path)
    table = res.get("table") if isinstance(res, dict) else None
    if not isinstance(table, dict) or not table:
        raise data.InputError(f"{ablation_path}: no 'table' of runs (files come from python evaluate.py "
                         f"--task ablation)")
    runs, notes, bars = list(table), [], {}          # (metric, run) -> (mean, std or None)
    for metric in metrics:
        for run in runs:
            cell = table[run].get(metric) if isinstance(table[run], dict) else None
            mean, std = (list(cell) + [None, None])[:2] if isinstance(cell, (list, tuple)) else (cell, None)
            if _number(mean) is None:
                notes.append(f"{run} {metric}: no value, no bar")
            else:
                bars[metric, run] = _number(mean), _number(std)
    metrics = [m for m in metrics if any((m, r) in bars for r in runs)]
    if not metrics:
        raise data.InputError(f"{ablation_path}: none of the metrics to plot has a value")
    seeds = "/".join(sorted({str(len(r.get("seeds", []))) for r in table.values() if isinstance(r, dict)}))
    colors = {**run_colors(runs), **(colors or {})}
    svg, y = draw_bars(bars, runs, [(m, METRIC_NAMES.get(m, m)) for m in metrics], colors,
                       f"{Path(ablation_path).name}: mean ± sample std over {seeds} seeds",
                       "mean over seeds (1 = perfect)")
    svg.height = _notes(svg, y, notes) + 4
    svg.write(out_path, f"Ablation table as bars ({ablation_path})")
    return notes


def _dict(value):
    return value if isinstance(value, dict) else {}


OWN_LABEL_BARS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
                  "macro_f1": "macro-F1", "auroc": "AUROC"}   # zero-shot bars of --label-column
MARKS = {"majority class": ("#a33", "6,3"), "untrained floor": (FLOOR_COLOR, "2,2")}  # colour, dashes


def eval_metrics(res):
    """The headline numbers of an evaluation results file -> ({label: (value, std or None)};
    {label: {mark: value}}: with --label-column, the majority class's and the untrained floor's)."""
    out, marks = {}, {}
    zs = _dict(res.get("zeroshot"))
    mc, binary = _dict(zs.get("multiclass")), _dict(zs.get("binary"))
    own = zs.get("label_column") is not None
    for key, name in OWN_LABEL_BARS.items() if mc else ():
        if own or key in ("accuracy", "macro_f1"):
            label = f"zero-shot {name} ({mc.get('split')})"
            out[label] = (mc.get(key), None)
            marks[label] = {"majority class": _dict(mc.get("majority")).get(key),
                            "untrained floor": _dict(mc.get("floor")).get(key)} if own else {}
    if binary:
        out[f"zero-shot binary AUROC ({binary.get('split')})"] = (binary.get("mean_auroc"), None)
    fs = _dict(res.get("fewshot"))
    score = "accuracy" if fs.get("kind") == "multi-class" else "auroc"
    floors = _dict(_dict(fs.get("floor")).get("results"))
    for name, r in _dict(fs.get("results")).items():
        label = f"probe {score.replace('auroc', 'AUROC')} {name}"
        out[label] = (_dict(r).get(f"{score}_mean"), _dict(r).get(f"{score}_std"))
        if score == "accuracy":
            floor = _dict(floors.get(name)).get("accuracy")
            marks[label] = {"majority class": _dict(fs.get("majority")).get("accuracy"),
                            "untrained floor": floor[0] if isinstance(floor, list) else None}
    for split, r in _dict(res.get("retrieval")).items():
        for direction in ("i2t", "t2i"):
            for k, v in _dict(_dict(r).get(direction)).items():
                if k.startswith("R@"):
                    out[f"{direction} {k} ({split})"] = (v, None)
    return out, marks


def plot_eval(eval_path, out_path, run="run", colors=None):
    """One evaluation results file of a run (its eval/<task>.json) as bars: zero-shot accuracy,
    macro-F1 and AUROC, the probe per setting (± std over seeds), retrieval recall. -> notes."""
    res = _dict(data.read_json(eval_path))
    metrics, marks = eval_metrics(res)
    if not metrics:
        raise data.InputError(f"{eval_path}: no zero-shot, probe or retrieval numbers (files come from "
                         f"python evaluate.py --task all)")
    bars, notes = {}, []
    for label, (value, std) in metrics.items():
        if _number(value) is None:
            notes.append(f"{label}: no value, no bar")
        else:
            bars[label, run] = _number(value), _number(std)
    if not bars:
        raise data.InputError(f"{eval_path}: none of the numbers to plot has a value")
    groups = [(label, label) for label in metrics if (label, run) in bars]
    svg, y = draw_bars(bars, [run], groups, {**run_colors([run]), **(colors or {})},
                       f"{run}: {Path(eval_path).name}, step {res.get('step', '?')}",
                       "score (1 = perfect)", marks)
    about = (f"checkpoint {res.get('checkpoint', '?')}, manifest {res.get('manifest', '?')}, "
             f"splits {res.get('split_sizes', '?')}")
    y = _notes(svg, y, [about], fill="#444", prefix="")
    svg.height = _notes(svg, y, notes) + 4
    svg.write(out_path, f"Evaluation of {run} as bars ({eval_path})")
    return notes


PLOTS = [  # (input files in results/, drawn by, how to make one; None: optional, never "missing")
    ("efficiency*.json", plot_memory, "python evaluate.py --task efficiency --out results/efficiency.json"),
    ("ablation*.json", plot_ablation, "python evaluate.py --task ablation --out results/ablation.json"),
    ("batch_*.json", plot_ablation, None),          # the batch-size study, drawn when it is there
    ("study*.json", plot_ablation, None),           # the ratio-matched study (valid split)
    ("*log.jsonl", plot_curves, "cp runs/small/log.jsonl results/small_log.jsonl after a training run")]


def _table_runs(path):
    """The run names of an ablation file ([] when it cannot be read: plot_ablation says why)."""
    try:
        res = data.read_json(path)
    except (OSError, ValueError):
        return []
    table = res.get("table") if isinstance(res, dict) else None
    return list(table) if isinstance(table, dict) else []


def readme_pictures():
    """Every input in results/ -> results/plots/<input name>.svg, one colour per run name over
    all the ablation pictures. -> (jobs, missing inputs)."""
    ablations = [p for pattern in ("ablation*.json", "batch_*.json", "study*.json")
                 for p in sorted(PLOTS_FROM.glob(pattern))]
    colors = run_colors([run for path in ablations for run in _table_runs(path)])
    jobs, missing = [], {}
    for pattern, plot, how in PLOTS:
        inputs = sorted(PLOTS_FROM.glob(pattern))
        if not inputs and how is not None:
            missing[str(PLOTS_FROM / pattern)] = f"no such file, picture not drawn (to make one: {how})"
        for path in inputs:
            if plot is plot_ablation:                   # the shared colours of the runs
                metrics = BATCH_METRICS if path.name.startswith(("batch_", "study")) else ABLATION_METRICS
                jobs.append((path, PLOTS_TO / f"{path.stem}.svg",
                             lambda p, out, m=metrics: plot_ablation(p, out, m, colors=colors)))
            else:
                jobs.append((path, PLOTS_TO / f"{path.stem}.svg", plot))
    return jobs, missing


def run_pictures(run_dir, checkpoint, train_how, eval_how):
    """One run's pictures, in its folder: log.jsonl -> plots/log.svg and eval/<name>.json ->
    plots/eval_<name>.svg for the evaluations of `checkpoint` (None: random) only.
    -> (jobs, missing inputs, {eval file: why not drawn})."""
    run_dir, jobs, missing, not_drawn = Path(run_dir), [], {}, {}
    log, evals = run_dir / "log.jsonl", sorted((run_dir / "eval").glob("*.json"))
    if log.is_file():
        jobs.append((log, run_dir / "plots" / "log.svg", plot_curves))
    else:
        missing[str(log)] = f"no such file, no training curves (to make one: {train_how})"
    if not evals:
        missing[str(run_dir / "eval" / "*.json")] = f"no such file, no evaluation picture (to make one: {eval_how})"
    current = None                           # --checkpoint random: its evaluations record none
    if checkpoint is not None:
        try:
            current = stored_sha256(checkpoint) if Path(checkpoint).is_file() else "missing"
        except Exception:                    # a corrupt checkpoint: no evaluation is of it
            current = "unreadable checkpoint"
    for path in evals:
        recorded = evaluated_sha256(path)
        if recorded not in (current, "unreadable"):          # unreadable: plot_eval says why
            short = ["none (untrained)" if sha is None else sha[:12] for sha in (recorded, current)]
            not_drawn[str(path)] = (f"evaluates checkpoint {short[0]}, not "
                                    f"{checkpoint or 'random'} ({short[1]}): not drawn")
            continue
        jobs.append((path, run_dir / "plots" / f"eval_{path.stem}.svg",
                     lambda p, out: plot_eval(p, out, run=run_dir.name)))
    return jobs, missing, not_drawn


def evaluated_sha256(path):
    """The checkpoint SHA-256 that an evaluation file records ("unreadable" when it cannot be read)."""
    try:
        res = data.read_json(path)
    except (OSError, ValueError):
        return "unreadable"
    return res.get("checkpoint_sha256", "not recorded") if isinstance(res, dict) else "unreadable"


def draw_pictures(jobs, missing):
    """Draw every (input, picture, drawing function) of jobs; an input that cannot be read is an
    error after the others are drawn. -> {picture: {"from": input, "notes": [...]}}."""
    written, broken = {}, {}
    for path, out, plot in jobs:
        try:
            notes = plot(path, out)
        except (OSError, ValueError) as e:
            broken[str(path)] = str(e)
            continue
        written[str(out)] = {"from": str(path), "notes": notes}
        print(f"wrote {out} from {path}" + "".join(f"\n  note: {n}" for n in notes))
    for path, why in missing.items():
        print(f"{path}: {why}")
    if broken:
        raise data.InputError("could not draw: " + "; ".join(f"{p}: {why}" for p, why in broken.items()))
    return written


def run_plots(args):
    """--task plots: one run's pictures in its folder, or (--readme-pictures) the README's."""
    not_drawn = {}
    if args.readme_pictures:
        jobs, missing = readme_pictures()
    else:
        which = f" --checkpoint {args.checkpoint}" if args.checkpoint else ""
        if not args.checkpoint or args.checkpoint == "random":
            which += f" --config {args.config}"
        run_dir, train_how = run_folder(args), how_to_train(args)
        eval_how = f"python evaluate.py --task all{which}"
        checkpoint = None if args.checkpoint == "random" else Path(args.checkpoint or run_dir / "ckpt.pt")
        jobs, missing, not_drawn = run_pictures(run_dir, checkpoint, train_how, eval_how)
        for path, why in not_drawn.items():
            print(f"note: {path}: {why}")
        if not jobs:
            raise data.InputError(f"{run_dir}: nothing to draw, no log.jsonl and no eval/*.json"
                                  + (" of this checkpoint" if not_drawn else "") + f"; train "
                                  f"({train_how}) and evaluate ({eval_how}) first, or redraw the "
                                  f"README pictures with --readme-pictures")
    return {"plots": draw_pictures(jobs, missing), "missing": missing, "not_drawn": not_drawn}


# -----------------------------------------------------------------------------
# E. The feature cache
# Read this when you wonder why a second evaluation of a checkpoint is fast, or what makes it
# recompute: a split's image features are kept on disk beside the checkpoint, keyed by content.
# -----------------------------------------------------------------------------


def stored_sha256(checkpoint):
    """The SHA-256 that msd.save_checkpoint records in a checkpoint (the SHA-256 of the file's
    bytes for a checkpoint written without one). mmap=True: the weights are not read."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    return ckpt.get("sha256") or data.sha256_file(checkpoint)


class FeatureCache:
    """A saved checkpoint's split features next to it, features_<split>_<16 hex digits>.pt, keyed
    by what they depend on: the checkpoint's SHA-256, the manifest's and every image's bytes, the
    split, the image size. The key is stored inside and checked on loading (a copied or stale
    file is recomputed). An unwritable folder means no cache, with a note; untrained: no cache."""

    CACHED = ("features", "embed", "labels")           # the tensors of a cache file, beside its key

    def __init__(self, checkpoint, manifest, image_size, n_labels, checkpoint_sha256=None):
        self.checkpoint, self.manifest = checkpoint, Path(manifest)
        self.image_size, self.n_labels = image_size, n_labels
        self._sha256 = checkpoint_sha256               # read from the checkpoint when not given

    def file(self, split, rows):
        """-> (path, key) of a split's feature cache (rows: its manifest rows), or (None, None)."""
        if self.checkpoint is None:
            return None, None
        if self._sha256 is None:                       # read once
            self._sha256 = stored_sha256(self.checkpoint)
        images = hashlib.sha256()  # each image's bytes, not its size and time (which cp -p keeps):
        for r in rows:             # about 0.1 s for 1,000 small PNGs, read from disk
            images.update(f"{r['_path']}|{data.sha256_file(r['_path'])}\n".encode())
        key = json.dumps({"checkpoint_sha256": self._sha256,
                          "manifest_sha256": data.sha256_file(self.manifest),
                          "images": images.hexdigest(), "split": split,
                          "image_size": self.image_size})
        name = f"features_{split}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
        return Path(self.checkpoint).parent / name, key

    def _problem(self, feats, n, key):
        """What is wrong with a loaded cache file for a split of n images (None: nothing)."""
        if not (isinstance(feats, dict) and set(feats) == {"key", *self.CACHED}):
            return "unexpected contents"
        if feats["key"] != key:
            return "written for another checkpoint, manifest or images: its key differs"
        ok = (all(torch.is_tensor(feats[k]) and len(feats[k]) == n for k in self.CACHED)
              and feats["labels"].shape[1:] == (self.n_labels,)
              and bool(torch.isfinite(feats["embed"]).all()))
        return None if ok else "unexpected contents"

    def load(self, path, n, key):
        """The cached features of a split of n images, or None (the caller computes them): no
        cache or file, or (a note on stderr) a file unreadable, truncated, unexpected or stale."""
        if path is None or not path.is_file():
            return None
        try:
            feats = torch.load(path, map_location="cpu", weights_only=True)
            problem = self._problem(feats, n, key)
        except Exception as e:                      # truncated zip, bad pickle, ... : recompute
            problem = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        if problem is None:
            return {k: feats[k] for k in self.CACHED}
        print(f"note: feature cache {path} is unusable ({problem}); recomputing it", file=sys.stderr)
        return None

    def save(self, path, key, feats):
        """Atomically (data.atomic_write); nothing without a cache. An unwritable folder, a full
        disk or a non-file at the path only means no cache: a note, and the evaluation goes on."""
        if path is None:
            return
        try:
            if path.exists() and not path.is_file():
                raise OSError(f"{path} is not a regular file, left as it is")
            with data.atomic_write(path) as tmp:
                torch.save({**feats, "key": key}, tmp)
        except OSError as e:
            print(f"note: cannot write the feature cache ({msd.one_line(e)}); evaluating "
                  f"without a cache", file=sys.stderr)


# The tasks that need no checkpoint (appendices A, B and D), dispatched by main (appendix C)
BENCHMARKS = {"efficiency": run_efficiency, "ablation": run_ablation, "plots": run_plots}


if __name__ == "__main__":
    cli()
