"""
Evaluation of an MSD (or CLIP) checkpoint: zero-shot classification, few-shot / linear probe,
image-text retrieval. The protocols are those of /work/shared/PROTOCOLS.md §2; every metric is
hand-written below (no scikit-learn) and checked against scikit-learn values in the tests.

    python evaluate.py --task all                          # the run of configs/small.json
    python evaluate.py --task zeroshot --checkpoint random # same config, untrained: chance level
    python evaluate.py --task fewshot --checkpoint runs/x/ckpt.pt --data manifest.csv --out r.json

Reads top to bottom:
    (1) metrics            auroc, macro_f1, confusion_matrix, retrieval_ranks, recall_at_k, ...
    (2) features           one batched no-grad pass per split, eval mode; probe features cached
    (3) zero-shot          prompt sets, classifier = normalise(mean(normalise(prompt embeddings)))
    (4) linear probe       frozen features + logistic regression; k shots / label fractions; seeds
    (5) retrieval          one image per study, de-duplicated texts, pessimistic ranks, chunked
    (6) CLI                tasks are a dict of functions; a table is printed and JSON written

Label conventions (the same for every task): a manifest label is 1, 0, -1 (uncertain) or blank.
For scoring, blank counts as negative and -1 is excluded; a finding whose test labels hold only
one class gets AUROC NaN and is left out of the mean (with a note in the results).

Any manifest with labels works: the synthetic set (prompt set "synth"), CheXpert / CheXpert 5x200
("chexpert": GLoRIA's grid), RSNA ("pneumonia"), or prompts of your own (--prompts FILE.json).
Labels-only manifests (no report texts) skip retrieval. The JSON holds the checkpoint step, the
config, the split sizes and, per task, its numbers and protocol settings (NaN is written as null).
"""
import argparse
import hashlib
import itertools
import json
import math
import multiprocessing
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import data
import msd

# -----------------------------------------------------------------------------------------------
# (1) Metrics. Plain numpy; inputs may be lists, numpy arrays or torch tensors.


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
    out = []
    for j in range(y.shape[1]):
        keep = ~np.isnan(y[:, j])
        out.append(auroc(y[keep, j], s[keep, j]))
    return out


def nanmean(values):
    v = [x for x in values if not math.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


def confusion_matrix(y_true, y_pred, num_classes):
    """C[i, j] = number of samples of true class i predicted as class j."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (_np(y_true).astype(int), _np(y_pred).astype(int)), 1)
    return cm


def macro_f1(y_true, y_pred, num_classes):
    """Mean over ALL num_classes classes of F1 = 2TP / (2TP + FP + FN); 0 when the denominator is 0
    (a class never present and never predicted still counts, as in sklearn with labels=...)."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(float)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1.mean())


def accuracy(y_true, y_pred):
    return float((_np(y_true) == _np(y_pred)).mean())


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


def recall_at_k(sim, targets, ks=(1, 5, 10), cand_ids=None):
    """{"R@K": ...} for each K, from the pessimistic ranks of retrieval_ranks()."""
    ranks = retrieval_ranks(sim, targets, cand_ids)
    return {f"R@{k}": float((ranks <= k).mean()) for k in ks}


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


# -----------------------------------------------------------------------------------------------
# (2) Features: the student encoders in eval mode (no dropout), no gradients, one pass per split.


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


# -----------------------------------------------------------------------------------------------
# (3) Zero-shot classification. Prompt sets are fixed lists (never sampled); a prompt set is
# {"positive": {class: [prompts]}, "negative": {class: [prompts]}} ("negative" optional).


def grid(*slots):
    """All combinations of the word slots (e.g. severity x subtype x location), in a fixed order,
    joined by spaces; an empty word "" leaves its slot out."""
    return [" ".join(w for w in words if w) for words in itertools.product(*slots)]


# GLoRIA's CheXpert grid (Huang et al. 2021; their constants file), the words as they published
# them, misspellings included ("apperance", "presistent", "uppper"), so that results stay
# comparable: 210 / 15 / 192 / 18 / 54 prompts. Slots: severity, subtype, location, except for
# Pleural Effusion where GLoRIA joins severity, location, subtype ("small left subpulmonic ...").
CHEXPERT_GRID = {
    "Atelectasis": (
        ["", "mild", "minimal"],
        ["subsegmental atelectasis", "linear atelectasis", "trace atelectasis",
         "bibasilar atelectasis", "retrocardiac atelectasis", "bandlike atelectasis",
         "residual atelectasis"],
        ["at the mid lung zone", "at the upper lung zone", "at the right lung zone",
         "at the left lung zone", "at the lung bases", "at the right lung base",
         "at the left lung base", "at the bilateral lung bases", "at the left lower lobe",
         "at the right lower lobe"]),
    "Cardiomegaly": (
        [""],
        ["cardiac silhouette size is upper limits of normal", "cardiomegaly which is unchanged",
         "mildly prominent cardiac silhouette",
         "portable view of the chest demonstrates stable cardiomegaly",
         "portable view of the chest demonstrates mild cardiomegaly",
         "persistent severe cardiomegaly", "heart size is borderline enlarged",
         "cardiomegaly unchanged", "heart size is at the upper limits of normal",
         "redemonstration of cardiomegaly",
         "ap erect chest radiograph demonstrates the heart size is the upper limits of normal",
         "cardiac silhouette size is mildly enlarged",
         "mildly enlarged cardiac silhouette, likely left ventricular enlargement. "
         "other chambers are less prominent",
         "heart size remains at mildly enlarged",
         "persistent cardiomegaly with prominent upper lobe vessels"],
        [""]),
    "Consolidation": (
        ["", "increased", "improved", "apperance of"],
        ["bilateral consolidation", "reticular consolidation", "retrocardiac consolidation",
         "patchy consolidation", "airspace consolidation", "partial consolidation"],
        ["at the lower lung zone", "at the upper lung zone", "at the left lower lobe",
         "at the right lower lobe", "at the left upper lobe", "at the right uppper lobe",
         "at the right lung base", "at the left lung base"]),
    "Edema": (
        ["", "mild", "improvement in", "presistent", "moderate", "decreased"],
        ["pulmonary edema", "trace interstitial edema", "pulmonary interstitial edema"],
        [""]),
    "Pleural Effusion": (
        ["", "small", "stable", "large", "decreased", "increased"],
        ["left", "right", "tiny"],
        ["bilateral pleural effusion", "subpulmonic pleural effusion", "bilateral pleural effusion"]),
}

# RSNA Pneumonia: one finding, positive vs negative prompts (ours).
PNEUMONIA_PROMPTS = {
    "positive": {"Pneumonia": [
        "pneumonia", "findings consistent with pneumonia", "right lower lobe pneumonia",
        "left lower lobe pneumonia", "multifocal pneumonia", "bilateral pneumonia",
        "focal consolidation concerning for pneumonia",
        "patchy airspace opacity compatible with pneumonia"]},
    "negative": {"Pneumonia": [
        "no pneumonia", "no evidence of pneumonia", "no focal consolidation to suggest pneumonia",
        "the lungs are clear", "no acute cardiopulmonary process"]},
}


def synth_prompts():
    """Prompts in the words of the synthetic reports (data.BANK's sentences, filled with the
    severities, sides and lobes that data.py's report writer uses), as fixed grids."""
    sev = {k: ("",) + v for k, v in data.SEVERITY.items()}
    lobes = [f"{lobe} lobe." for lobe in data.LOBES]
    positive = {
        "Atelectasis": grid(sev["atelectasis"], ["left basilar", "right basilar", "bibasilar"],
                            ["atelectasis.", "linear atelectasis."]),
        "Cardiomegaly": grid(sev["cardiomegaly"],
                             ["cardiomegaly.", "enlargement of the cardiac silhouette."]),
        "Consolidation": grid(["consolidation in the"], lobes),
        "Edema": grid(sev["edema"], ["pulmonary edema.", "interstitial edema with perihilar haziness."]),
        "Lung Lesion": grid(["nodule in the", "pulmonary nodule projecting over the"], lobes),
        "Lung Opacity": grid(["patchy opacity in the"], lobes),
        "Pleural Effusion": grid(sev["effusion"], ["left pleural effusion.", "right pleural effusion.",
                                                   "bilateral pleural effusions."]),
        "Pneumonia": grid([lobe[:-1] for lobe in lobes], ["pneumonia."]),
        "Pneumothorax": grid(sev["pneumothorax"], ["left", "right"],
                             ["pneumothorax.", "apical pneumothorax."]),
        "Support Devices": ["endotracheal tube terminates above the carina.",
                            "nasogastric tube courses below the diaphragm into the stomach.",
                            "right internal jugular central venous catheter terminates in the svc.",
                            "left-sided pacemaker with a lead in the right ventricle.",
                            "lines and tubes in standard position."],
        "No Finding": ["no acute cardiopulmonary process.", "no acute intrathoracic process.",
                       "normal chest radiograph."],
    }
    negative = {  # the banks' negated sentences; "No Finding" has none (no double negation)
        "Atelectasis": ["no atelectasis."],
        "Cardiomegaly": ["heart size is normal.", "normal heart size.", "no cardiomegaly."],
        "Consolidation": ["no focal consolidation."],
        "Edema": ["no pulmonary edema.", "there is no pulmonary edema."],
        "Lung Lesion": ["no suspicious pulmonary nodules."],
        "Lung Opacity": ["the lungs are clear."],
        "Pleural Effusion": ["no pleural effusion.", "there is no pleural effusion."],
        "Pneumonia": ["no consolidation to suggest pneumonia."],
        "Pneumothorax": ["no pneumothorax.", "there is no pneumothorax."],
    }
    return {"positive": positive, "negative": negative}


PROMPT_SETS = {
    "synth": synth_prompts,
    "chexpert": lambda: {"positive": {c: grid(*slots) for c, slots in CHEXPERT_GRID.items()},
                         "negative": {}},
    "pneumonia": lambda: PNEUMONIA_PROMPTS,
}


def load_prompt_set(name_or_path):
    """A built-in set by name, or a JSON file: {class: [prompts]} or
    {"positive": {class: [prompts]}, "negative": {class: [prompts]}}."""
    if name_or_path in PROMPT_SETS:
        return PROMPT_SETS[name_or_path]()
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt set {name_or_path!r}: neither a built-in set "
                                f"({', '.join(PROMPT_SETS)}) nor a JSON file")
    raw = json.loads(path.read_text())
    prompts = raw if "positive" in raw else {"positive": raw, "negative": {}}
    for part in ("positive", "negative"):
        for cls, lst in prompts.get(part, {}).items():
            if not (isinstance(lst, list) and lst and all(isinstance(p, str) and p for p in lst)):
                raise ValueError(f"{path}: {part} prompts of {cls!r}: expected a non-empty list "
                                 f"of non-empty strings, got {lst!r}")
    return {"positive": prompts["positive"], "negative": prompts.get("negative", {})}


def negative_prompts(prompt_set, finding):
    """The negative prompts of a finding: given ones, else "no <finding>" (CheXzero). None for
    "No Finding" without given negatives ("no no finding" is a double negation)."""
    if finding in prompt_set.get("negative", {}):
        return prompt_set["negative"][finding]
    return None if finding == "No Finding" else [f"no {finding.lower()}"]


def class_embeddings(encode, prompts_by_class):
    """One row per class (dict order): c_k = normalise(mean_p normalise(t_p)) over ALL its prompts.
    `encode` maps a list of strings to (n, d) text embeddings. A mean: prompt order is irrelevant."""
    rows = []
    for name, prompts in prompts_by_class.items():
        t = F.normalize(encode(list(prompts)), dim=-1)                          # (n_prompts, d)
        rows.append(F.normalize(t.mean(0), dim=-1))
    return torch.stack(rows)                                                    # (C, d)


def zeroshot_multiclass(image_emb, y_true, class_emb, class_names):
    """5xN style: predict argmax_k cos(v, c_k) for each image independently (no test-set
    statistics, no z-scoring) -> accuracy, macro-F1, per-class recall, confusion matrix."""
    pred = (image_emb @ class_emb.T).argmax(1).numpy()                         # (N,)
    y_true = _np(y_true).astype(int)
    cm = confusion_matrix(y_true, pred, len(class_names))
    recall = {c: float(cm[i, i] / cm[i].sum()) if cm[i].sum() else float("nan")
              for i, c in enumerate(class_names)}
    return {"n": int(len(y_true)), "classes": list(class_names),
            "accuracy": accuracy(y_true, pred), "macro_f1": macro_f1(y_true, pred, len(class_names)),
            "chance_accuracy": 1.0 / len(class_names), "per_class_recall": recall,
            "confusion_matrix": cm.tolist(), "predictions": pred}


def zeroshot_binary(image_emb, labels, pos_emb, neg_emb, findings):
    """CheXzero style: p = softmax(v.c+ / tau, v.c- / tau)[0] per finding. p is monotone in
    v.c+ - v.c-, so that difference is the score (AUROC does not depend on tau).
    labels: (N, F) scoring labels (score_labels: NaN excluded)."""
    score = (image_emb @ pos_emb.T - image_emb @ neg_emb.T).numpy()             # (N, F)
    per = dict(zip(findings, auroc_per_label(labels, score)))
    notes = [f"{f}: only one class present in the labels, AUROC NaN, left out of the mean"
             for f, a in per.items() if math.isnan(a)]
    return {"auroc": per, "mean_auroc": nanmean(per.values()), "notes": notes,
            "n_positive": {f: int((_np(labels)[:, j] == 1).sum()) for j, f in enumerate(findings)}}


# -----------------------------------------------------------------------------------------------
# (4) Linear probe / few-shot: frozen features, one linear layer trained with L-BFGS.

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


def sample_fraction(n, fraction, seed):
    """A seeded random `fraction` of n training rows (at least one), sorted."""
    m = max(1, int(round(fraction * n)))
    rng = np.random.default_rng([seed, int(fraction * 1e6)])
    return np.sort(rng.permutation(n)[:m])


def train_logistic_regression(x, y, weight_decay, max_iter=100):
    """One sigmoid per label: minimise mean over known (i, j) of BCE(w_j . x_i + b_j, y_ij)
    + weight_decay / 2 * |W|^2 (bias not decayed). Convex, so L-BFGS from zero is deterministic."""
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    known = ~torch.isnan(y)
    target = torch.nan_to_num(y)
    head = torch.nn.Linear(x.shape[1], y.shape[1])
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        bce = F.binary_cross_entropy_with_logits(head(x), target, reduction="none")
        loss = bce[known].sum() / known.sum().clamp(min=1) + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


@torch.no_grad()
def probe_scores(head, x):
    return head(torch.as_tensor(x, dtype=torch.float32)).numpy()


def linear_probe(train, valid, test, label_names, shots=(1, 2, 4, 8, 16),
                 fractions=(0.01, 0.1, 1.0), seeds=range(5), weight_decays=WEIGHT_DECAYS):
    """train / valid / test: (features (N, D), scoring labels (N, L)). For every setting (k shots,
    or a fraction of the training labels) and seed: draw training rows from `train` only, fit one
    head per weight decay, keep the one with the best mean AUROC on `valid`, score it on `test`.
    Features are standardised with the mean / std of all training-split features (no labels).
    100 % uses every training row, so its seeds agree (std 0)."""
    xs = {name: torch.as_tensor(s[0], dtype=torch.float32) for name, s in
          (("train", train), ("valid", valid), ("test", test))}
    mu, sd = xs["train"].mean(0), xs["train"].std(0) + 1e-6
    xs = {name: (x - mu) / sd for name, x in xs.items()}
    settings = [(f"{k}-shot", lambda seed, k=k: sample_shots(train[1], k, seed)) for k in shots]
    settings += [(f"{f:.0%}", lambda seed, f=f: sample_fraction(len(train[1]), f, seed))
                 for f in fractions]
    results = {}
    for name, draw in settings:
        per_seed, per_label, chosen_wd, n_rows = [], [], [], []
        for seed in seeds:
            rows = draw(seed)                                   # indices into the TRAIN split
            best = None
            for wd in weight_decays:
                head = train_logistic_regression(xs["train"][rows], train[1][rows], wd)
                val = nanmean(auroc_per_label(valid[1], probe_scores(head, xs["valid"])))
                val = -1.0 if math.isnan(val) else val
                if best is None or val > best[0]:              # ties: the first (smaller) decay
                    best = (val, wd, head)
            test_auc = auroc_per_label(test[1], probe_scores(best[2], xs["test"]))
            per_seed.append(nanmean(test_auc))
            per_label.append(test_auc)
            chosen_wd.append(best[1])
            n_rows.append(int(len(rows)))
        results[name] = {
            "auroc_mean": float(np.mean(per_seed)),
            "auroc_std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
            "auroc_per_seed": per_seed,
            "auroc_per_label": {l: nanmean([a[j] for a in per_label]) for j, l in enumerate(label_names)},
            "weight_decay_per_seed": chosen_wd, "train_rows_per_seed": n_rows}
    return results


# -----------------------------------------------------------------------------------------------
# (5) Retrieval over the full pool: one image per study, identical texts collapsed.


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


def evaluate_retrieval(image_emb, text_emb, text_of_image, image_classes=None,
                       ks=(1, 5, 10), chunk_size=256):
    """image->text: each image's one correct candidate is its text's index. text->image: the
    queries are the distinct texts, correct = every image carrying that text. With image_classes,
    class-level Precision@K too (a text's class = the class of its first image)."""
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
    return {"n_images": int(len(image_emb)), "n_texts": int(len(text_emb)), "i2t": i2t, "t2i": t2i}


# -----------------------------------------------------------------------------------------------
# (6) Command line: load a checkpoint (or an untrained model), run tasks, print, write JSON.


class Evaluation:
    """What every task needs: model, tokenizer, manifest, and each split's image features,
    computed in one pass per split and cached (in memory; on disk next to a saved checkpoint,
    keyed by checkpoint step / file, manifest contents, split and image size)."""

    def __init__(self, model, tokenizer, cfg, manifest, step, checkpoint=None, batch_size=64):
        self.model, self.tokenizer, self.cfg, self.step = model, tokenizer, cfg, step
        self.manifest, self.checkpoint, self.batch_size = Path(manifest), checkpoint, batch_size
        self.rows = data.read_manifest(self.manifest)
        self.label_names = [c for c in data.LABELS if c in self.rows[0]]  # those the CSV has
        self.split_sizes = {}
        for r in self.rows:
            self.split_sizes[r["split"]] = self.split_sizes.get(r["split"], 0) + 1
        self._images = {}

    def dataset(self, split):
        if not self.split_sizes.get(split):
            raise ValueError(f"{self.manifest}: no rows with split {split!r} "
                             f"(splits: {self.split_sizes})")
        return data.PairDataset(self.manifest, split, self.tokenizer,
                                data.ImageTransform(self.cfg.image_size, train=False),
                                label_names=self.label_names)

    def _cache_path(self, split):
        if self.checkpoint is None:                             # untrained model: nothing to key
            return None
        ckpt, stat = Path(self.checkpoint), Path(self.checkpoint).stat()
        key = "|".join(map(str, [  # mtime + size: a checkpoint retrained to the same step differs
            self.step, ckpt.resolve(), stat.st_mtime_ns, stat.st_size, self.manifest.resolve(),
            hashlib.sha1(self.manifest.read_bytes()).hexdigest(), split, self.cfg.image_size]))
        return ckpt.parent / f"features_{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"

    def images(self, split):
        """{"features", "embed", "labels" (manifest values), "rows"} of one split."""
        if split not in self._images:
            dataset, path = self.dataset(split), self._cache_path(split)
            if path is not None and path.is_file():
                feats = torch.load(path)
            else:
                feats = encode_images(self.model, dataset, self.batch_size, self.cfg.num_workers)
                if path is not None:
                    torch.save(feats, path)
            self._images[split] = {**feats, "rows": dataset.rows}
        return self._images[split]

    def encode_texts(self, texts):
        return encode_texts(self.model, self.tokenizer, texts)


def five_way_labels(labels, label_names, rows):
    """The 5xN set: the label columns positive somewhere (No Finding aside), and for each image
    the index of its one positive column among them."""
    y = _np(labels) == 1
    cols = [j for j in range(y.shape[1]) if y[:, j].any() and label_names[j] != "No Finding"]
    y = y[:, cols]
    bad = np.flatnonzero(y.sum(1) != 1)
    if len(bad):
        raise ValueError(f"manifest row {rows[bad[0]]['_row']} (split {rows[bad[0]]['split']!r}): "
                         f"expected exactly one positive among {[label_names[j] for j in cols]}")
    return [label_names[j] for j in cols], y.argmax(1)


def run_zeroshot(ev, args):
    name = args.prompts or args.prompt_set
    if name is None:        # data.generate_synthetic writes meta.json beside the manifest
        name = "synth" if (ev.manifest.parent / "meta.json").is_file() else "chexpert"
    prompt_set = load_prompt_set(name)
    out = {"prompt_set": name}
    if args.with_5x and ev.split_sizes.get("test_5x"):
        feats = ev.images("test_5x")
        classes, y = five_way_labels(feats["labels"], ev.label_names, feats["rows"])
        missing = [c for c in classes if c not in prompt_set["positive"]]
        if missing:
            raise ValueError(f"prompt set {out['prompt_set']!r} has no prompts for {missing}")
        class_emb = class_embeddings(ev.encode_texts, {c: prompt_set["positive"][c] for c in classes})
        mc = zeroshot_multiclass(feats["embed"], y, class_emb, classes)
        mc.pop("predictions")
        mc["split"], mc["n_prompts"] = "test_5x", {c: len(prompt_set["positive"][c]) for c in classes}
        out["multiclass"] = mc
    else:
        out["multiclass"] = None
        out["note"] = "no test_5x split (or --no-5x): multi-class zero-shot skipped"
    findings = [f for f in ev.label_names
                if f in prompt_set["positive"] and negative_prompts(prompt_set, f) is not None]
    if findings and not ev.split_sizes.get(args.split):
        out["binary"] = None
        out["note_binary"] = (f"no {args.split!r} split in the manifest: binary zero-shot skipped "
                              f"(choose another with --split)")
    elif findings:
        feats = ev.images(args.split)
        cols = [ev.label_names.index(f) for f in findings]
        pos = class_embeddings(ev.encode_texts, {f: prompt_set["positive"][f] for f in findings})
        neg = class_embeddings(ev.encode_texts, {f: negative_prompts(prompt_set, f) for f in findings})
        out["binary"] = zeroshot_binary(feats["embed"], score_labels(feats["labels"])[:, cols],
                                        pos, neg, findings)
        out["binary"]["split"] = args.split
    return out


def run_fewshot(ev, args):
    splits = {s: ev.images(s) for s in ("train", "valid", args.split)}
    y = {s: score_labels(f["labels"]) for s, f in splits.items()}

    def both_classes(s, j):
        return (y[s][:, j] == 1).any() and (y[s][:, j] == 0).any()

    if args.labels:
        names = [n.strip() for n in args.labels.split(",")]
        unknown = [n for n in names if n not in ev.label_names]
        if unknown:
            raise ValueError(f"--labels: {unknown} not among the manifest's labels {ev.label_names}")
    else:
        names = [n for j, n in enumerate(ev.label_names)
                 if both_classes("train", j) and both_classes(args.split, j)]
    if not names:
        raise ValueError(f"no label has both classes in train and {args.split}")
    cols = [ev.label_names.index(n) for n in names]
    part = {s: (splits[s]["features"], y[s][:, cols]) for s in splits}
    results = linear_probe(part["train"], part["valid"], part[args.split], names, args.shots,
                           args.fractions, range(args.seeds), args.weight_decays)
    return {"labels": names, "split": args.split, "shots": list(args.shots),
            "fractions": list(args.fractions), "seeds": list(range(args.seeds)),
            "weight_decays": list(args.weight_decays), "selection": "best mean AUROC on valid",
            "uncertain": "excluded (-1); blank = negative", "results": results}


def run_retrieval(ev, args):
    out = {}
    with_5x = args.with_5x and ev.split_sizes.get("test_5x")
    for split in dict.fromkeys([args.split] + (["test_5x"] if with_5x else [])):
        if not any(r["text"].strip() for r in ev.rows if r["split"] == split):
            out[split] = {"note": "labels-only split (no report texts): retrieval skipped"}
            continue
        feats = ev.images(split)
        image_rows, texts, text_of_image = retrieval_pool(feats["rows"])
        classes = None
        if split == "test_5x":
            _, classes = five_way_labels(feats["labels"][image_rows], ev.label_names,
                                         [feats["rows"][i] for i in image_rows])
        out[split] = evaluate_retrieval(feats["embed"][image_rows], ev.encode_texts(texts),
                                        text_of_image, classes, args.ks, args.chunk_size)
    return out


TASKS = {"zeroshot": run_zeroshot, "fewshot": run_fewshot, "retrieval": run_retrieval}


# -----------------------------------------------------------------------------------------------
# (7) Efficiency: time, peak memory and FLOPs of one optimizer step, MSD vs end-to-end CLIP.
# Each configuration runs in a fresh process, so that its peak memory is its own. The batches
# are random tensors of the configured shapes: this times the training step, not the loader.


def efficiency_configs(cfg, max_factor=8):
    """(name, config) rows: the ablation's methods at b = cfg.batch_size, N = cfg.accum_steps,
    then how memory grows with the effective batch: CLIP end to end at B = k*b against MSD with
    N = k micro-batches of b, k = 1, 2, 4, ... max_factor."""
    b, N = cfg.batch_size, cfg.accum_steps
    rows = [(f"CLIP end-to-end B={b}", replace(cfg, method="clip", accum_steps=1)),
            (f"CLIP end-to-end B={N * b}", replace(cfg, method="clip", batch_size=N * b, accum_steps=1)),
            (f"CLIP naive accumulation {N}x{b}", replace(cfg, method="clip")),
            (f"MSD alpha=0 {N}x{b}", replace(cfg, method="msd", alpha=0.0)),
            (f"MSD {N}x{b}", replace(cfg, method="msd")),
            (f"MSD no queue {N}x{b}", replace(cfg, method="msd", queue_size=0)),
            (f"MSD EMA per micro-batch {N}x{b}", replace(cfg, method="msd", ema_per_micro_batch=True))]
    k = 1
    while k <= max_factor:
        rows.append((f"growth: CLIP end-to-end B={k * b}",
                     replace(cfg, method="clip", batch_size=k * b, accum_steps=1)))
        rows.append((f"growth: MSD {k}x{b} (B={k * b})", replace(cfg, method="msd", accum_steps=k)))
        k *= 2
    return rows


def sweep_configs(cfg, micro_batches=(32, 64, 128, 256)):
    """The micro-batch sweep at the config's effective batch B = N * b: end-to-end CLIP at B and
    MSD with N = B / b micro-batches of b, each eager and with the encoders compiled. How much
    does a small micro-batch (the one that fits a small GPU) cost per pair?"""
    B = cfg.batch_size * cfg.accum_steps
    rows = []
    for mode, tag in (("off", "eager"), ("on", "compiled")):
        rows.append((f"sweep {tag}: CLIP end-to-end B={B}",
                     replace(cfg, method="clip", batch_size=B, accum_steps=1, compile=mode)))
        rows += [(f"sweep {tag}: MSD {B // b}x{b}",
                  replace(cfg, method="msd", batch_size=b, accum_steps=B // b, compile=mode))
                 for b in micro_batches if b <= B and B % b == 0]
    return rows


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device, n=2048, repeats=10):
    """This machine's measured matmul throughput in TFLOP/s (float32 on CPU, bf16 on CUDA):
    the denominator of MFU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    _sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e12


def measure_step(cfg, steps, vocab_size=1000, warmup=2):
    """Seconds per optimizer step, training FLOPs per pair and peak memory for one config.
    Every report is max_len tokens long (no padding): the worst case. FLOPs are counted on an
    eager step (the count is the same when compiled)."""
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
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = msd.peak_memory_mb(device)
    return {"effective_batch": B, "micro_batch": cfg.batch_size, "accum_steps": cfg.accum_steps,
            "seconds_per_step": seconds, "pairs_per_s": B / seconds, "flops_per_pair": flops,
            "peak_memory_mb": peak, "step_memory_mb": peak - baseline}


def _measure_child(cfg_dict, steps, queue):
    queue.put(measure_step(msd.Config(**cfg_dict), steps))


GPU_MEMORY_GB = (11, 24, 80)  # an RTX 2080 Ti, an RTX 4090 (the paper's GPUs), an H100


def run_efficiency(args):
    """Each configuration on random tensors of the configured shapes (this times the training
    step, not the loader). On the CPU each runs in a fresh process, so that its peak RSS is its
    own; on CUDA all run in this process, with the allocator's peak reset in between. On CUDA (or
    with --sweep) the micro-batch sweep comes first. With --time-budget, rows that would start
    after that many seconds are skipped (and listed); the JSON is rewritten after every row."""
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
           "rows": [], "skipped": []}
    start = time.perf_counter()
    for name, row_cfg in configs:
        if args.time_budget and time.perf_counter() - start > args.time_budget:
            res["skipped"].append(name)
            continue
        if device.type == "cuda":
            r = measure_step(row_cfg, args.steps)
        else:                                         # a fresh process: its peak memory is its own
            queue = ctx.Queue()
            proc = ctx.Process(target=_measure_child, args=(asdict(row_cfg), args.steps, queue))
            proc.start()
            r = queue.get()
            proc.join()
        r["name"] = name
        r["epoch_minutes"] = train_pairs / r["pairs_per_s"] / 60 if train_pairs else None
        r["fits_gb"] = {gb: r["peak_memory_mb"] / 1024 + 1.0 <= gb for gb in GPU_MEMORY_GB} \
            if device.type == "cuda" else None    # + 1 GB: CUDA context and fragmentation
        res["rows"].append(r)
        print(f"  measured {name}: {r['seconds_per_step']:.3f} s/step", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(to_json(res), indent=1, allow_nan=False))
    rows = res["rows"]
    by_name = {r["name"]: r for r in rows}
    for r in rows:  # FLOPs per pair do not depend on compilation: take the eager twin's count
        if r["flops_per_pair"] is None:
            twin = by_name.get(r["name"].replace("compiled", "eager"))
            r["flops_per_pair"] = twin["flops_per_pair"] if twin else None
        r["mfu"] = (r["flops_per_pair"] * r["pairs_per_s"] / (peak_tflops * 1e12)
                    if r["flops_per_pair"] else None)
    base = next((r for r in rows if not r["name"].startswith("sweep")), None)
    for r in rows:
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
    print(f"  {'configuration':<40} {'B':>4} {'s/step':>7} {'pairs/s':>8} {'epoch min':>9} "
          f"{'x time/pair':>11} {'peak MB':>8} {'step MB':>8} {'x step mem':>10} "
          f"{'GFLOP/pair':>10} {'MFU':>6}")
    for r in res["rows"]:
        if r["name"].startswith("sweep"):
            continue
        print(f"  {r['name']:<40} {r['effective_batch']:>4} {r['seconds_per_step']:>7.3f} "
              f"{r['pairs_per_s']:>8.0f} {num(r['epoch_minutes'], '>9.2f')} {r['time_ratio']:>11.2f} "
              f"{r['peak_memory_mb']:>8.0f} {r['step_memory_mb']:>8.0f} {r['memory_ratio']:>10.2f} "
              f"{num(r['flops_per_pair'] and r['flops_per_pair'] / 1e9, '>10.3f')} "
              f"{num(r['mfu'], '>6.1%')}")
    if res.get("skipped"):
        print(f"  skipped (past --time-budget): {', '.join(res['skipped'])}")


# -----------------------------------------------------------------------------------------------
# (7b) Pictures: SVG written by hand (no plotting library) from the files in results/:
#   results/efficiency*.json -> memory of one step against the effective batch ("growth:" rows)
#   results/ablation*.json   -> the quality table as grouped bars with ±std whiskers
#   results/*log.jsonl       -> training curves (a run's log.jsonl, copied there from runs/)
# Each picture lands in results/plots/<input name>.svg; plain <svg> with lines, rectangles,
# polylines and text, which GitHub's markdown viewer shows as an image.

PLOTS_FROM, PLOTS_TO = Path("results"), Path("results/plots")
COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
          "#9c755f", "#bab0ac"]  # one per series, in order; repeats after ten
CHAR_WIDTH = 0.6  # a sans-serif glyph is about 0.6 font sizes wide on average: for laying out text
METRIC_NAMES = {"zs_acc": "zero-shot accuracy", "zs_f1": "zero-shot macro-F1",
                "zs_auroc": "zero-shot AUROC", "probe_100%": "linear probe AUROC (100% of train)",
                "i2t_R@10": "image-to-text R@10", "t2i_R@10": "text-to-image R@10"}
CURVE_NAMES = {"loss": "loss (of the logged optimizer step)",
               "tau": "tau: the learned temperature", "alpha": "alpha: weight of the teacher's soft targets",
               "lr": "learning rate", "grad_norm": "gradient norm (before clipping)"}


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
        """The whole document, with a white background and a <title> (what screen readers say)."""
        head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
                f'viewBox="0 0 {self.width} {self.height}" font-family="sans-serif">\n'
                f"<title>{_escape(title)}</title>\n"
                f'<rect x="0" y="0" width="{self.width}" height="{self.height}" fill="#fff"/>\n')
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(head + "\n".join(self.parts) + "\n</svg>\n", encoding="utf-8")


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
    """Frame, grid lines and tick labels of one plot area box = (left, top, width, height).
    x_ticks, y_ticks: (value, label) pairs whose first and last values span the axis.
    Returns the maps value -> pixel (fx, fy); a bigger y value is higher on the picture."""
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


def _notes(svg, y, notes, font=11):
    """Notes (values that were skipped, ...) as wrapped lines from y down; -> the y after them."""
    for note in notes:
        for line in _wrap("note: " + note, int(svg.width / (CHAR_WIDTH * font)) - 4):
            svg.text(10, y, line, size=font, fill="#a33")
            y += font + 4
    return y


def _read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def plot_memory(efficiency_path, out_path, key="step_memory_mb"):
    """Memory of one optimizer step against the effective batch B, from the "growth:" rows of an
    efficiency file (python evaluate.py --task efficiency): end-to-end CLIP at B, whose
    activations grow with B, against MSD with B/b micro-batches of b. -> notes (skipped rows)."""
    res = _read_json(efficiency_path)
    series, notes = {}, []                             # "CLIP" / "MSD" -> [(B, memory MB)]
    legend = {"CLIP": "end-to-end CLIP: one batch of B", "MSD": "MSD: micro-batches, teacher, queue"}
    for row in res.get("rows", []) if isinstance(res, dict) else []:
        name = str(row.get("name", "")) if isinstance(row, dict) else ""
        if not name.startswith("growth: "):
            continue
        words = name.split()                           # "growth: MSD 4x32 (B=128)"
        method, batch, value = words[1], _number(row.get("effective_batch")), _number(row.get(key))
        if method == "MSD" and len(words) > 2 and "x" in words[2]:
            legend[method] = f"MSD: B/{words[2].split('x')[-1]} micro-batches, teacher, queue"
        if batch is None or value is None:
            notes.append(f"{name}: no {key} or effective_batch, not drawn")
            continue
        series.setdefault(method, []).append((batch, value))
    if not any(series.values()):
        raise ValueError(f"{efficiency_path}: no 'growth: ...' rows with {key} (rows come from "
                         f"python evaluate.py --task efficiency)")
    batches = sorted({b for points in series.values() for b, _ in points})
    top = max(v for points in series.values() for _, v in points)
    svg = Svg(600, 400)
    box = (70, 50, 440, 250)
    lo, hi = math.log2(batches[0]), math.log2(batches[-1])  # log scale: B doubles per tick
    pad = max(hi - lo, 1) * 0.06                       # keeps the end points off the frame
    x_ticks = [(lo - pad, "")] + [(math.log2(b), f"{b:g}") for b in batches] + [(hi + pad, "")]
    fx, fy = _axes(svg, box, x_ticks, [(v, f"{v:g}") for v in nice_ticks(0, top)])
    svg.text(300, 24, "Memory of one optimizer step against the effective batch B", size=15,
             anchor="middle", font_weight="bold")
    svg.text(290, 335, "effective batch B (pairs per optimizer step), log scale", anchor="middle")
    y_label = f"{key.replace('_mb', '').replace('_', ' ')} (MB) on {res.get('device', '?')}"
    svg.text(18, 175, y_label, anchor="middle", transform="rotate(-90 18 175)")
    for k, (method, points) in enumerate(sorted(series.items())):
        color, points = COLORS[k % len(COLORS)], sorted(points)
        svg.add("polyline", class_="series", fill="none", stroke=color, stroke_width=2.5,
                points=" ".join(f"{fx(math.log2(b)):.1f},{fy(v):.1f}" for b, v in points))
        for b, v in points:
            svg.add("circle", class_="point", cx=fx(math.log2(b)), cy=fy(v), r=4, fill=color)
        last_b, last_v = points[-1]
        svg.text(fx(math.log2(last_b)) - 6, fy(last_v) - 9, f"{last_v:.0f} MB", size=11, anchor="end",
                 fill=color)
        svg.add("rect", x=box[0] + 12, y=box[1] + 12 + 18 * k, width=14, height=10, fill=color)
        svg.text(box[0] + 32, box[1] + 21 + 18 * k, legend.get(method, method), size=12)
    about = (f"{Path(efficiency_path).name}: device {res.get('device', '?')} ({res.get('machine', '?')}, "
             f"{res.get('threads', '?')} threads), config {res.get('config', '?')}"
             f"{''.join(' ' + str(o) for o in res.get('overrides', []))}. "
             f"Memory: {res.get('memory', 'not described')}.")
    y = 358
    for line in _wrap(about, int(svg.width / (CHAR_WIDTH * 11)) - 4):
        svg.text(10, y, line, size=11, fill="#444")
        y += 15
    svg.height = _notes(svg, y, notes) + 4
    svg.write(out_path, f"Memory of one optimizer step against the effective batch ({efficiency_path})")
    return notes


def read_log(log_path):
    """A run's log.jsonl -> records sorted by step. A resumed run appends to its log, so a step
    may appear twice: the later record is kept (it is the run that continued)."""
    by_step = {}
    for i, line in enumerate(Path(log_path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{log_path} line {i}: not JSON ({e})") from None
        if not isinstance(record, dict) or _number(record.get("step")) is None:
            raise ValueError(f"{log_path} line {i}: a record needs a numeric 'step', got {line[:80]!r}")
        by_step[record["step"]] = record
    if not by_step:
        raise ValueError(f"{log_path}: no records")
    return [by_step[s] for s in sorted(by_step)]


def plot_curves(log_path, out_path, keys=None):
    """Training curves of one run as small multiples sharing the step axis: one panel per key
    (default: loss, tau, alpha and any valid_* metric in the log). A record without the key (a
    metric logged every few steps) is simply no point; a value that is null, NaN or not a number
    is skipped with a note and leaves a gap in the curve. -> notes."""
    records = read_log(log_path)
    logged = {k for r in records for k in r}
    keys = list(keys or ["loss", "tau", "alpha"] + sorted(k for k in logged if k.startswith("valid_")))
    notes = [f"'{k}' is not in the log, no panel" for k in keys if k not in logged]
    keys = [k for k in keys if k in logged]
    if not keys:
        raise ValueError(f"{log_path}: none of the keys to plot is logged (it has {sorted(logged)})")
    panel_h, gap, left, width = 110, 34, 70, 480
    svg = Svg(600, 0)  # the height is known once the notes are placed
    svg.text(300, 24, f"Training curves of {Path(log_path).name}", size=15, anchor="middle",
             font_weight="bold")
    x_ticks = [(v, f"{v:g}") for v in nice_ticks(0, max(float(r["step"]) for r in records), 6)]
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
        y_ticks = [(v, f"{v:g}") for v in nice_ticks(min(values), max(values), 3)]
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
    svg.write(out_path, f"Training curves ({log_path})")
    return notes


def plot_ablation(ablation_path, out_path, metrics=("zs_acc", "probe_100%", "i2t_R@10", "t2i_R@10")):
    """An ablation file (python evaluate.py --task ablation; {"table": {run: {metric: [mean, std]}}})
    as grouped bars: one group per metric, one bar per run, whiskers at mean ± std over seeds.
    A missing (null, NaN) mean is not drawn, with a note; a missing std draws no whisker. -> notes."""
    res = _read_json(ablation_path)
    table = res.get("table") if isinstance(res, dict) else None
    if not isinstance(table, dict) or not table:
        raise ValueError(f"{ablation_path}: no 'table' of runs (files come from python evaluate.py "
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
        raise ValueError(f"{ablation_path}: none of the metrics to plot has a value")
    bar_w, gap, left, top, height = 12, 26, 64, 50, 260
    group_w = len(runs) * bar_w + gap
    legend_x = left + len(metrics) * group_w + 24
    legend_w = max(len(r) for r in runs) * CHAR_WIDTH * 12 + 30
    svg = Svg(int(legend_x + legend_w), 0)
    highest = max(m + (s or 0) for m, s in bars.values())
    _, fy = _axes(svg, (left, top, len(metrics) * group_w, height), [(0, ""), (1, "")],
                  [(v, f"{v:g}") for v in nice_ticks(0, max(1.0, highest), 5)], x_labels=False)
    seeds = "/".join(sorted({str(len(r.get("seeds", []))) for r in table.values() if isinstance(r, dict)}))
    svg.text(svg.width / 2, 24, f"{Path(ablation_path).name}: mean ± std over {seeds} seeds", size=15,
             anchor="middle", font_weight="bold")
    for g, metric in enumerate(metrics):
        x0 = left + g * group_w + gap / 2
        for k, run in enumerate(runs):
            if (metric, run) not in bars:
                continue
            mean, std = bars[metric, run]
            x, color = x0 + k * bar_w, COLORS[k % len(COLORS)]
            y_base, y_top = fy(0), fy(max(mean, 0.0))
            svg.add("rect", class_="bar", x=x + 1, y=y_top, width=bar_w - 2, height=y_base - y_top,
                    fill=color)
            if std is not None:                        # the whisker, cut at the axis
                xm, low, high = x + bar_w / 2, fy(max(mean - std, 0.0)), fy(mean + std)
                svg.line(xm, low, xm, high)
                svg.line(xm - 3, low, xm + 3, low)
                svg.line(xm - 3, high, xm + 3, high)
        label = _wrap(METRIC_NAMES.get(metric, metric), int(group_w / (CHAR_WIDTH * 11)))
        for i, line in enumerate(label):
            svg.text(x0 + len(runs) * bar_w / 2, top + height + 16 + 14 * i, line, size=11, anchor="middle")
    for k, run in enumerate(runs):
        svg.add("rect", x=legend_x, y=top + 18 * k, width=14, height=10, fill=COLORS[k % len(COLORS)])
        svg.text(legend_x + 20, top + 9 + 18 * k, run, size=12)
    svg.height = _notes(svg, top + height + 58, notes) + 4
    svg.write(out_path, f"Ablation table as bars ({ablation_path})")
    return notes


PLOTS = [  # (input files in results/, drawn by, how to make one)
    ("efficiency*.json", plot_memory, "python evaluate.py --task efficiency --out results/efficiency.json"),
    ("ablation*.json", plot_ablation, "python evaluate.py --task ablation --out results/ablation.json"),
    ("*log.jsonl", plot_curves, "cp runs/small/log.jsonl results/small_log.jsonl after a training run")]


def run_plots(args):
    """Draw every picture whose input is in results/. A missing input is reported and the other
    pictures are still drawn; an input that cannot be read is an error, after the others are drawn."""
    written, missing, broken = {}, {}, {}
    for pattern, plot, how in PLOTS:
        inputs = sorted(PLOTS_FROM.glob(pattern))
        if not inputs:
            missing[str(PLOTS_FROM / pattern)] = f"no such file, picture not drawn (to make one: {how})"
        for path in inputs:
            out = PLOTS_TO / f"{path.stem}.svg"
            try:
                written[str(out)] = {"from": str(path), "notes": plot(path, out)}
            except (OSError, ValueError) as e:
                broken[str(path)] = str(e)
                continue
            notes = written[str(out)]["notes"]
            print(f"wrote {out} from {path}" + "".join(f"\n  note: {n}" for n in notes))
    for path, why in missing.items():
        print(f"{path}: {why}")
    if broken:
        raise ValueError("could not draw: " + "; ".join(f"{p}: {why}" for p, why in broken.items()))
    return {"plots": written, "missing": missing}


# -----------------------------------------------------------------------------------------------
# (8) Ablation: train every configuration of an ablation file for several seeds, evaluate each
# checkpoint with the protocols above, and tabulate mean +- std. Finished runs are reused.


def ablation_metrics(ev, args):
    """The few numbers of the quality table, from the three tasks above. For tuning on the valid
    split ("eval": {"split": "valid", "with_5x": false, "probe": false}) nothing is read from a
    test split: no 5xN zero-shot, no probe (it would choose and report on one split)."""
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


ABLATION_KEYS = ("base", "shared", "seeds", "runs", "eval", "pretrain")


def run_is_done(ckpt_path, cfg):
    """A finished run of exactly this config (and, with init_from, of exactly that checkpoint)."""
    if not ckpt_path.is_file():
        return False
    ckpt = msd.read_checkpoint(ckpt_path)
    if ckpt["config"] != asdict(cfg):
        return False
    return not cfg.init_from or (ckpt.get("init_from") or {}).get("sha256") == \
        msd.read_checkpoint(cfg.init_from)["sha256"]


def run_ablation(args):
    """Train every run of an ablation file for every seed (finished runs are reused), evaluate
    each checkpoint with the protocol of the file's "eval" entry, tabulate mean and std over seeds.
    The first row is the floor: the untrained model ("random"), or, when the runs start from a
    checkpoint ("init_from" in "shared"), that checkpoint itself ("warm_start", no second stage).
    "pretrain": the config whose run writes that checkpoint; it is trained first if missing."""
    spec_path = Path(args.ablation)
    spec = json.loads(spec_path.read_text())
    unknown = set(spec) - set(ABLATION_KEYS)
    if unknown:
        raise KeyError(f"{spec_path}: unknown keys {sorted(unknown)}; expected {', '.join(ABLATION_KEYS)}")
    # the evaluation protocol of the table: the command line's, with the file's "eval" on top
    protocol = argparse.Namespace(**{**vars(args), **{k: tuple(v) if isinstance(v, list) else v
                                                       for k, v in spec.get("eval", {}).items()}})
    shared = [f"--{k}={v}" for k, v in spec.get("shared", {}).items()]
    init_from = spec.get("shared", {}).get("init_from")
    if init_from and not Path(init_from).is_file():
        if "pretrain" not in spec:
            raise FileNotFoundError(f"{spec_path}: init_from {init_from} does not exist")
        print(f"== pretraining {spec['pretrain']} -> {init_from}", flush=True)
        msd.train(msd.load_config(spec["pretrain"], ["--progress=false"]))
    floor = "warm_start" if init_from else "random"
    table = {}
    for name, overrides in {floor: None, **spec["runs"]}.items():
        per_seed = []
        for seed in spec["seeds"]:
            run_dir = Path(args.ablation_dir) / name / f"seed{seed}"
            cfg = msd.load_config(spec["base"], shared + [f"--seed={seed}", f"--out_dir={run_dir}"]
                                  + [f"--{k}={v}" for k, v in (overrides or {}).items()])
            manifest, ckpt_path, seconds = msd.prepare_data(cfg), run_dir / "ckpt.pt", None
            if overrides is None and init_from:               # the warm checkpoint, as it is
                model, tokenizer, _, ckpt = msd.load_checkpoint(init_from)
                step, ckpt_path = ckpt["step"], Path(init_from)
            elif overrides is None:                           # the untrained floor
                tokenizer = msd.build_tokenizer(cfg, manifest)
                model, step, ckpt_path = msd.build_model(cfg, tokenizer.vocab_size).eval(), 0, None
            else:
                if not run_is_done(ckpt_path, cfg):
                    print(f"== training {name} seed {seed} -> {run_dir}"
                          + (" (replacing a run of another config)" if ckpt_path.is_file() else ""),
                          flush=True)
                    seconds = msd.train(cfg, overwrite=True)["seconds"]
                model, tokenizer, cfg, ckpt = msd.load_checkpoint(ckpt_path)
                step = ckpt["step"]
            ev = Evaluation(model, tokenizer, cfg, manifest, step, ckpt_path, args.batch_size)
            metrics = ablation_metrics(ev, protocol)
            metrics["train_seconds"] = seconds
            per_seed.append(metrics)
            print(f"   {name} seed {seed}: " + "  ".join(
                f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)), flush=True)
        keys = [k for k in per_seed[0] if k != "train_seconds"]
        table[name] = {"overrides": overrides, "seeds": spec["seeds"], "per_seed": per_seed,
                       **{k: (float(np.nanmean([r[k] for r in per_seed])),
                              float(np.nanstd([r[k] for r in per_seed]))) for k in keys}}
    return {"ablation": str(spec_path), "base": spec["base"], "shared": spec.get("shared", {}),
            "eval": spec.get("eval", {}), "table": table}


BENCHMARKS = {"efficiency": run_efficiency, "ablation": run_ablation, "plots": run_plots}


def print_results(task, res):
    """A readable table per task."""
    def f(v):
        return "  nan" if v is None or math.isnan(v) else f"{v:.3f}"

    if task == "zeroshot":
        mc = res["multiclass"]
        if mc:
            print(f"zero-shot {len(mc['classes'])}-way on {mc['split']} (n={mc['n']}, prompts "
                  f"{res['prompt_set']}): accuracy {f(mc['accuracy'])}  macro-F1 {f(mc['macro_f1'])}"
                  f"  (chance {f(mc['chance_accuracy'])})")
            for c in mc["classes"]:
                print(f"  {c:<28} recall {f(mc['per_class_recall'][c])}  prompts {mc['n_prompts'][c]}")
        if res.get("binary"):
            b = res["binary"]
            print(f"zero-shot binary on {b['split']}: mean AUROC {f(b['mean_auroc'])}")
            for name, a in b["auroc"].items():
                print(f"  {name:<28} AUROC {f(a)}  positives {b['n_positive'][name]}")
            for note in b["notes"]:
                print(f"  note: {note}")
    elif task == "fewshot":
        print(f"linear probe on {res['split']} (labels: {', '.join(res['labels'])}; "
              f"{len(res['seeds'])} seeds)")
        for name, r in res["results"].items():
            print(f"  {name:<9} AUROC {f(r['auroc_mean'])} ± {f(r['auroc_std'])}  "
                  f"train rows {r['train_rows_per_seed'][0]}")
    elif task == "retrieval":
        for split, r in res.items():
            if "note" in r:
                print(f"retrieval on {split}: {r['note']}")
                continue
            print(f"retrieval on {split}: {r['n_images']} images, {r['n_texts']} distinct texts")
            for d in ("i2t", "t2i"):
                print(f"  {d}  " + "  ".join(f"{k} {f(v) if k != 'median_rank' else v}"
                                             for k, v in r[d].items()))
    elif task == "efficiency":
        print_efficiency(res)
    elif task == "ablation":
        cols = [k for k in next(iter(res["table"].values())) if k.startswith(("zs_", "probe_", "i2t", "t2i"))]
        print(f"ablation {res['ablation']} (base {res['base']}): mean ± std over seeds")
        print(f"  {'run':<26}" + "".join(f"{c:>15}" for c in cols))
        for name, r in res["table"].items():
            print(f"  {name:<26}" + "".join(f"{r[c][0]:>8.3f}±{r[c][1]:<6.3f}" for c in cols))
    else:                                        # a task without its own table yet
        print(json.dumps(to_json(res), indent=1))


def load_for_eval(args):
    """-> (model, tokenizer, cfg, manifest, step, checkpoint path or None)."""
    device = msd.pick_device(args.device)
    if args.checkpoint == "random":
        cfg = msd.load_config(args.config)
        manifest = Path(args.data) if args.data else msd.prepare_data(cfg)
        tokenizer = msd.build_tokenizer(cfg, manifest)
        model = msd.build_model(cfg, tokenizer.vocab_size).to(device).eval()
        return model, tokenizer, cfg, manifest, 0, None
    path = args.checkpoint or Path(msd.load_config(args.config).out_dir) / "ckpt.pt"
    model, tokenizer, cfg, ckpt = msd.load_checkpoint(path, map_location=device)
    manifest = Path(args.data) if args.data else msd.prepare_data(cfg)
    return model, tokenizer, cfg, manifest, ckpt["step"], path


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


def _floats(text):
    return tuple(float(v) for v in text.split(","))


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate an MSD checkpoint (PROTOCOLS.md §2).")
    p.add_argument("--task", default="all", choices=[*TASKS, "all", *BENCHMARKS],
                   help="efficiency and ablation train or time models themselves (no checkpoint)")
    p.add_argument("--checkpoint", help="ckpt.pt, or 'random' for an untrained model of --config "
                                        "(default: the run of --config)")
    p.add_argument("--config", default="configs/small.json")
    p.add_argument("--data", help="manifest CSV (default: the run's own dataset)")
    p.add_argument("--split", default="test", help="the test split (binary zero-shot, probe, retrieval)")
    p.add_argument("--out", default="results.json")
    p.add_argument("--prompt-set", dest="prompt_set", choices=list(PROMPT_SETS),
                   help="built-in prompts (default: synth for a synthetic manifest, else chexpert; "
                        "use pneumonia for RSNA)")
    p.add_argument("--prompts", help="JSON prompt file; overrides --prompt-set")
    p.add_argument("--labels", help="comma-separated labels to probe (default: both classes "
                                    "present in train and test)")
    p.add_argument("--shots", type=lambda s: tuple(int(v) for v in s.split(",")), default=(1, 2, 4, 8, 16))
    p.add_argument("--fractions", type=_floats, default=(0.01, 0.1, 1.0))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--weight-decays", dest="weight_decays", type=_floats, default=WEIGHT_DECAYS)
    p.add_argument("--ks", type=lambda s: tuple(int(v) for v in s.split(",")), default=(1, 5, 10))
    p.add_argument("--chunk-size", dest="chunk_size", type=int, default=256)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.add_argument("--no-5x", dest="with_5x", action="store_false",
                   help="skip everything on the test_5x split (e.g. when tuning on --split valid)")
    p.add_argument("--no-probe", dest="probe", action="store_false", help="ablation: skip the probe")
    p.add_argument("--steps", type=int, default=5, help="efficiency: optimizer steps timed per row")
    p.add_argument("--sweep", action="store_true",
                   help="efficiency: the micro-batch sweep on the CPU too (always on CUDA)")
    p.add_argument("--time-budget", dest="time_budget", type=float, default=0,
                   help="efficiency: skip rows that would start after this many seconds (0 = none)")
    p.add_argument("--ablation", default="configs/ablation.json", help="ablation: the run list")
    p.add_argument("--ablation-dir", dest="ablation_dir", default="runs/ablation",
                   help="ablation: where runs are trained (finished runs are reused)")
    args, overrides = p.parse_known_args(argv)
    args.overrides = overrides  # efficiency: --key=value config overrides, as for msd.py
    if overrides and args.task != "efficiency":
        p.error(f"unrecognized arguments: {' '.join(overrides)}")

    if args.task in BENCHMARKS:
        results = BENCHMARKS[args.task](args)
        print_results(args.task, results)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(to_json(results), indent=1, allow_nan=False))
        print(f"wrote {args.out}")
        return results

    model, tokenizer, cfg, manifest, step, checkpoint = load_for_eval(args)
    ev = Evaluation(model, tokenizer, cfg, manifest, step, checkpoint, args.batch_size)
    print(f"checkpoint {checkpoint or 'random (untrained)'} | step {step} | manifest {manifest} | "
          f"splits {ev.split_sizes}")
    results = {"checkpoint": str(checkpoint) if checkpoint else "random", "step": step,
               "manifest": str(manifest), "split_sizes": ev.split_sizes, "config": asdict(cfg)}
    for task in (TASKS if args.task == "all" else [args.task]):
        results[task] = TASKS[task](ev, args)
        print_results(task, results[task])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(to_json(results), indent=1, allow_nan=False))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
