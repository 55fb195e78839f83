"""Data for MSD: the manifest format, report text, tokenizer, image transforms, the image-report
Dataset, and SynthCXR, a procedurally drawn chest X-ray dataset with MIMIC-like reports.

Every dataset, synthetic or real, becomes one CSV manifest with one row per image:
    image, text, split, study_id, patient_id, view, [extra columns], <14 CheXpert labels>
`image` is relative to the CSV's folder, `text` is extract_report_text(full report), labels are
1 / 0 / -1 (uncertain) / empty (not mentioned). PairDataset reads a manifest for training.

    python data.py synth --out data/synth [--n 4000] [--size 128] [--seed 0]   # write SynthCXR
    python data.py preview data/synth                                           # contact sheet PNG
    python data.py probe data/synth        # small supervised CNN: are the findings in the pixels?

Sections: 1 labels, manifest, report sections, images · 2 tokenizer · 3 image transforms ·
4 PairDataset · 5 SynthCXR · 6 real datasets · 7 command line.
Only the standard library, numpy, Pillow and torch are used.
"""
import argparse
import collections
import csv
import json
import math
import os
import re
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# -----------------------------------------------------------------------------
# 1. Labels, manifest format, report sections, image loading

LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
          "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity",
          "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
          "Pneumothorax", "Support Devices"]  # CheXpert's 14 observations, in MIMIC csv order
FIVE_CLASSES = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
REQUIRED_COLUMNS = ("image", "text", "split", "study_id", "patient_id", "view")
LABEL_VALUES = {"1": "1", "1.0": "1", "0": "0", "0.0": "0", "-1": "-1", "-1.0": "-1", "": ""}


class ManifestError(ValueError):
    """A bad manifest; the message names the file, the row and the column. `reason` groups skips."""

    def __init__(self, message, reason="bad row"):
        super().__init__(message)
        self.reason = reason


def read_manifest(path, skip_bad=False):
    """Read and validate a manifest -> list of row dicts (label values normalised to '1','0','-1','').

    Each row also gets '_row' (1-based data row; the CSV line is _row + 1 when no field spans lines)
    and '_path' (the absolute image path). A bad row raises ManifestError naming file, row, column
    and value; with skip_bad=True bad rows are skipped and counted on stderr, never silently.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    root = path.resolve().parent
    rows, skipped = [], collections.Counter()
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ManifestError(f"{path}: missing required column(s) {missing}; header is {columns}")
        label_columns = [c for c in LABELS if c in columns]  # real datasets may carry only some labels
        for i, row in enumerate(reader, start=1):
            try:
                if None in row or None in row.values():
                    raise ManifestError(f"{path}, row {i}: has {len(row)} fields, header has "
                                        f"{len(columns)}", "wrong number of fields")
                for c in label_columns:
                    if row[c].strip() not in LABEL_VALUES:
                        raise ManifestError(f"{path}, row {i}, column '{c}': bad label value "
                                            f"{row[c]!r}; expected 1, 0, -1 (or 1.0, 0.0, -1.0) "
                                            "or empty", "bad label value")
                    row[c] = LABEL_VALUES[row[c].strip()]
                if not row["text"].strip():
                    raise ManifestError(f"{path}, row {i}, column 'text': empty report text "
                                        f"(image {row['image']!r})", "empty text")
                row["_row"], row["_path"] = i, str(root / row["image"])
                if not os.path.isfile(row["_path"]):
                    raise ManifestError(f"{path}, row {i}, column 'image': file not found: "
                                        f"{row['_path']}", "missing image")
                rows.append(row)
            except ManifestError as e:
                if not skip_bad:
                    raise
                skipped[e.reason] += 1
    if skipped:
        why = ", ".join(f"{reason} ({count})" for reason, count in sorted(skipped.items()))
        print(f"read_manifest: {path}: skipped {sum(skipped.values())} rows: {why}", file=sys.stderr)
    return rows


def _label_str(value):
    """1 / 0 / -1 / None / NaN / '' / '1.0' -> '1' / '0' / '-1' / ''."""
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(int(float(value)))


def write_manifest(path, rows, label_names=LABELS):
    """Write rows (dicts) as a manifest. `image` is an absolute path or one already relative to the
    CSV's folder; absolute paths are stored relative. Keys starting with '_' are not written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.resolve().parent
    extra = []
    for row in rows:
        extra += [k for k in row if k not in REQUIRED_COLUMNS and k not in label_names
                  and not k.startswith("_") and k not in extra]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, [*REQUIRED_COLUMNS, *extra, *label_names], lineterminator="\n",
                                extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            out = dict(row)
            if Path(row["image"]).is_absolute():
                out["image"] = Path(os.path.relpath(row["image"], root)).as_posix()
            out.update({name: _label_str(row.get(name)) for name in label_names})
            writer.writerow(out)


# MIMIC-CXR reports: upper-case headings ending in a colon at the start of a line.
_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z ()/&,-]*[A-Z)])[ \t]*:", re.M)
FINDINGS_HEADINGS = {"FINDINGS", "FINDING", "FINDINGS AND IMPRESSION", "FINDINGS/IMPRESSION",
                     "IMPRESSION AND FINDINGS"}
IMPRESSION_HEADINGS = {"IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS"}


def extract_report_text(report):
    """Findings + impression of a report (the LAST occurrence of each section, since addenda and
    re-dictations repeat them), whitespace collapsed; "" if the report has neither."""
    found = {}
    heads = list(_HEADING.finditer(report))
    for head, nxt in zip(heads, heads[1:] + [None]):
        name = " ".join(head.group(1).split())
        kind = ("findings" if name in FINDINGS_HEADINGS else
                "impression" if name in IMPRESSION_HEADINGS else None)
        if kind:  # a later occurrence overwrites an earlier one
            found[kind] = " ".join(report[head.end(): nxt.start() if nxt else None].split())
    return " ".join(found[k] for k in ("findings", "impression") if found.get(k))


def load_image(path):
    """Open an image as 8-bit grayscale (mode "L"). 16-bit images are min-max scaled to 0..255.
    Raises FileNotFoundError (missing) or ValueError (unreadable, truncated), naming the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so that a truncated file fails here and not later
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                a = np.asarray(img, dtype=np.float32)
                a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6)
                return Image.fromarray((a * 255).round().astype(np.uint8))
            return img.convert("L")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


# -----------------------------------------------------------------------------
# 2. Tokenizer: lower-case words, numbers and punctuation; vocabulary from training reports

SPECIAL_TOKENS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]  # ids 0..4
_TOKEN = re.compile(r"[a-z]+|\d+(?:\.\d+)?|_+|[^\sa-z\d_]")  # words | numbers (3.5) | ___ | one symbol


class Tokenizer:
    """Word-level tokenizer. encode() gives [CLS] tokens [SEP], truncated to max_len; __call__
    pads a batch with [PAD] to max_len. Saved as JSON inside checkpoints and restored exactly."""

    def __init__(self, vocab, max_len=64):
        if list(vocab[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS or len(set(vocab)) != len(vocab):
            raise ValueError(f"vocab must start with {SPECIAL_TOKENS} and have no duplicates")
        if max_len < 3:
            raise ValueError(f"max_len must be >= 3 ([CLS] token [SEP]), got {max_len}")
        self.vocab, self.max_len = list(vocab), int(max_len)
        self.token_to_id = {t: i for i, t in enumerate(self.vocab)}
        self.pad_id, self.cls_id, self.sep_id, self.unk_id, self.mask_id = range(5)

    @property
    def vocab_size(self):
        return len(self.vocab)

    @classmethod
    def build(cls, texts, min_freq=2, max_len=64):
        """Vocabulary = tokens seen >= min_freq times, most frequent first (ties alphabetical)."""
        counts = collections.Counter(tok for text in texts for tok in cls.tokenize(text))
        words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        return cls(SPECIAL_TOKENS + words, max_len)

    @staticmethod
    def tokenize(text):
        return _TOKEN.findall(text.lower())

    def encode(self, text):
        ids = [self.token_to_id.get(t, self.unk_id) for t in self.tokenize(text)]
        return [self.cls_id] + ids[:self.max_len - 2] + [self.sep_id]

    def decode(self, ids):
        """Tokens joined by spaces, without [PAD] [CLS] [SEP]."""
        skip = (self.pad_id, self.cls_id, self.sep_id)
        return " ".join(self.vocab[int(i)] for i in ids if int(i) not in skip)

    def __call__(self, texts):
        """list of B texts -> input_ids (B, max_len) long, attention_mask (B, max_len) long."""
        if isinstance(texts, str):
            raise TypeError("Tokenizer expects a list of texts, got one string")
        input_ids = torch.full((len(texts), self.max_len), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), self.max_len), dtype=torch.long)
        for b, text in enumerate(texts):
            ids = self.encode(text)
            input_ids[b, :len(ids)] = torch.tensor(ids)
            attention_mask[b, :len(ids)] = 1  # 1 = real token, 0 = padding
        return input_ids, attention_mask

    def unk_rate(self, texts):
        """Fraction of tokens (before truncation) that are not in the vocabulary."""
        toks = [t for text in texts for t in self.tokenize(text)]
        return sum(t not in self.token_to_id for t in toks) / max(len(toks), 1)

    def to_dict(self):
        return {"vocab": self.vocab, "max_len": self.max_len}

    @classmethod
    def from_dict(cls, d):
        return cls(d["vocab"], d["max_len"])

    def save(self, path):
        Path(path).write_text(json.dumps(self.to_dict()), encoding="utf-8")

    @classmethod
    def load(cls, path):
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


# -----------------------------------------------------------------------------
# 3. Image transforms (GLoRIA/MGCA recipe scaled to image_size: 224 <- 256 becomes S <- S*256/224)

class ImageTransform:
    """PIL image -> normalised float32 tensor (1, S, S).
    Longer side -> round(S*256/224), zero-pad to square; train: small rotation, random resized
    square crop (area fraction in `scale`), brightness/contrast jitter; eval: centre crop.
    No horizontal flip by default: it swaps left and right, and the reports say which side."""

    def __init__(self, image_size, train, scale=(0.8, 1.0), rotate=5.0, brightness=0.1,
                 contrast=0.1, hflip=False, mean=0.5, std=0.5):
        self.image_size, self.train, self.scale, self.rotate = image_size, train, scale, rotate
        self.brightness, self.contrast, self.hflip, self.mean, self.std = (
            brightness, contrast, hflip, mean, std)
        self.resize_to = round(image_size * 256 / 224)

    def __call__(self, img, rng=None):
        if self.train and rng is None:  # train mode draws only from rng, so runs are reproducible
            raise ValueError("ImageTransform(train=True) needs rng=numpy.random.Generator")
        img = img if img.mode == "L" else img.convert("L")
        R, S = self.resize_to, self.image_size
        k = R / max(img.size)
        img = img.resize((max(1, round(img.width * k)), max(1, round(img.height * k))),
                         Image.BILINEAR)
        square = Image.new("L", (R, R), 0)  # zero padding: black, like air
        square.paste(img, ((R - img.width) // 2, (R - img.height) // 2))
        if self.train:
            square = square.rotate(rng.uniform(-self.rotate, self.rotate), Image.BILINEAR,
                                   fillcolor=0)
            side = R * math.sqrt(rng.uniform(*self.scale))
            x0, y0 = rng.uniform(0, R - side, size=2)
            img = square.resize((S, S), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
            if self.hflip and rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            o = (R - S) // 2
            img = square.crop((o, o, o + S, o + S))
        x = np.asarray(img, dtype=np.float32) / 255.0
        if self.train:
            x = x * (1 + rng.uniform(-self.brightness, self.brightness))
            m = x.mean()
            x = np.clip((x - m) * (1 + rng.uniform(-self.contrast, self.contrast)) + m, 0, 1)
        x = (x - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x[None], dtype=np.float32))


# -----------------------------------------------------------------------------
# 4. PairDataset: (image, report tokens, pair id, labels) from one split of a manifest

class PairDataset(torch.utils.data.Dataset):
    """One split of a manifest. Item i -> (image (1,H,W) float32, input_ids (L,) long,
    attention_mask (L,) long, pair_id () long, labels (len(label_names),) float32 with NaN = blank).

    pair_id is the index of the row's study_id among the sorted study_ids of the WHOLE manifest,
    so images of one study share it. Augmentation for item i draws from
    default_rng([seed, epoch, i]): identical with any num_workers. Call set_epoch(e) each epoch
    (with persistent DataLoader workers, recreate the loader for it to take effect)."""

    def __init__(self, manifest_path, split, tokenizer, transform, seed=0, label_names=LABELS,
                 cache_images=False, skip_bad=False):
        self.manifest_path = Path(manifest_path)
        all_rows = read_manifest(self.manifest_path, skip_bad=skip_bad)
        pair_of = {s: i for i, s in enumerate(sorted({r["study_id"] for r in all_rows}))}
        self.rows = [r for r in all_rows if r["split"] == split]
        if not self.rows:
            raise ValueError(f"{self.manifest_path}: no rows with split {split!r} "
                             f"(splits present: {sorted({r['split'] for r in all_rows})})")
        self.texts = [r["text"] for r in self.rows]
        self.pair_ids = torch.tensor([pair_of[r["study_id"]] for r in self.rows], dtype=torch.long)
        self.labels = torch.tensor([[float(r[n]) if r.get(n, "") != "" else math.nan
                                     for n in label_names] for r in self.rows], dtype=torch.float32)
        self.tokenizer, self.transform, self.seed, self.epoch = tokenizer, transform, seed, 0
        self._cache = {} if cache_images else None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def _image(self, i):
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        row = self.rows[i]
        try:
            img = load_image(row["_path"])
        except (FileNotFoundError, ValueError) as e:  # say which manifest row points at the file
            raise type(e)(f"{self.manifest_path}, row {row['_row']}: {e}") from e
        if self._cache is not None:
            self._cache[i] = img
        return img

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.transform.train else None
        image = self.transform(self._image(i), rng)
        input_ids, attention_mask = self.tokenizer([self.texts[i]])
        return image, input_ids[0], attention_mask[0], self.pair_ids[i], self.labels[i]


# -----------------------------------------------------------------------------
# 5. SynthCXR: procedurally drawn PA chest radiographs with reports and labels
#
# Conventions (PROTOCOLS §4): coordinates are fractions of the image, x to the right, y down.
# The patient faces us, so the patient's RIGHT is on the IMAGE LEFT. Brightness = attenuation:
# air and lung dark, soft tissue, fluid and bone bright. A finding's side and severity come from
# one parameter dict that both the renderer and the report writer read.

SYNTH_VERSION = 1
FINDINGS = ["devices", "cardiomegaly", "edema", "consolidation", "atelectasis", "nodule",
            "effusion", "pneumothorax"]  # report order: tubes, heart, lungs, pleura
FIVE_FINDINGS = {"Atelectasis": "atelectasis", "Cardiomegaly": "cardiomegaly",
                 "Consolidation": "consolidation", "Edema": "edema", "Pleural Effusion": "effusion"}
SIDE = {"right": -1, "left": 1}  # patient's side -> direction on the image from the midline
CTR = {"normal": (0.40, 0.48), "borderline": (0.50, 0.53), "mild": (0.53, 0.58),
       "moderate": (0.58, 0.65), "severe": (0.65, 0.72)}  # cardiothoracic ratio
EFFUSION_HEIGHT = {"small": (0.05, 0.12), "moderate": (0.28, 0.38), "large": (0.50, 0.62)}
PTX_GAP = {"small": (0.02, 0.035), "moderate": (0.045, 0.07), "large": (0.08, 0.11)}
SEVERITY = {"cardiomegaly": ("borderline", "mild", "moderate", "severe"),
            "effusion": ("small", "moderate", "large"), "pneumothorax": ("small", "moderate", "large"),
            "edema": ("mild", "moderate", "severe"), "atelectasis": ("minimal", "mild", "moderate")}
# lobe -> (offset from the lung's centre in lung half-widths, height as a fraction apex..base)
LOBES = {"right upper": (0.0, 0.22), "right middle": (-0.45, 0.62), "right lower": (0.15, 0.84),
         "left upper": (0.0, 0.3), "left lower": (0.15, 0.84)}
DEVICES = ["ett", "ngt", "cvc", "pacemaker"]


def sample_anatomy(rng):
    """One patient's body: fixed across that patient's studies."""
    u = rng.uniform
    return dict(top=u(0.12, 0.17), base=u(0.70, 0.75), left_drop=u(0.015, 0.04),  # right dome higher
                dc=u(0.175, 0.2), a=u(0.115, 0.135), dome=u(0.035, 0.06), body=u(0.05, 0.09),
                ctr=u(*CTR["normal"]), heart_h=u(0.10, 0.12), lung=u(0.12, 0.2), soft=u(0.55, 0.68),
                rib_gap=u(0.06, 0.075), rib_phase=u(0, 1), vessels=u(-1.9, 1.9, size=(2, 9)))


def _sides(side):
    return ["right", "left"] if side == "bilateral" else [side]


def _finding_params(name, rng, severity=None, side=None):
    """Sample one finding's parameters: side, severity and the numbers they imply."""
    if severity is None and name in SEVERITY:
        weights = [.15, .4, .3, .15] if name == "cardiomegaly" else [.5, .3, .2]
        severity = str(rng.choice(SEVERITY[name], p=weights))
    if name == "cardiomegaly":
        return {"severity": severity, "ctr": rng.uniform(*CTR[severity])}
    if name == "effusion":
        side = side or str(rng.choice(["right", "left", "bilateral"], p=[.35, .35, .3]))
        return {"side": side, "severity": severity, "height": rng.uniform(*EFFUSION_HEIGHT[severity])}
    if name == "pneumothorax":
        return {"side": side or str(rng.choice(["right", "left"])), "severity": severity,
                "gap": rng.uniform(*PTX_GAP[severity])}
    if name == "edema":
        return {"severity": severity}
    if name == "atelectasis":
        side = side or str(rng.choice(["right", "left", "bilateral"], p=[.3, .3, .4]))
        return {"side": side, "severity": severity}
    if name == "consolidation":
        k = 1 if rng.random() < 0.75 else int(rng.integers(2, 4))  # multifocal: 2-3 lobes
        return {"lobes": [list(LOBES)[i] for i in sorted(rng.choice(len(LOBES), k, replace=False))]}
    if name == "nodule":
        return {"lobe": str(rng.choice(list(LOBES))), "mm": int(rng.integers(10, 26))}
    if name == "devices":
        items = [d for d in DEVICES if rng.random() < 0.4] or [str(rng.choice(DEVICES))]
        return {"items": items, "ett_cm": int(rng.integers(2, 7))}
    raise ValueError(f"unknown finding {name!r}; expected one of {FINDINGS}")


def sample_findings(rng):
    """A study's findings {name: params}: about a third normal, realistic co-occurrence
    (edema with cardiomegaly and small bilateral effusions, atelectasis with effusions, ...)."""
    if rng.random() < 0.34:
        return {}
    base_rates = {"edema": 0.18, "consolidation": 0.25, "pneumothorax": 0.08, "nodule": 0.05}
    names = {n for n, q in base_rates.items() if rng.random() < q}
    edema = "edema" in names
    if rng.random() < (0.6 if edema else 0.25):
        names.add("cardiomegaly")
    if rng.random() < (0.5 if edema else 0.3):
        names.add("effusion")
    if rng.random() < (0.5 if "effusion" in names else 0.25):
        names.add("atelectasis")
    if rng.random() < (0.5 if edema or "pneumothorax" in names else 0.15):
        names.add("devices")
    if not names - {"devices"}:  # abnormal means at least one pathology
        names.add(FIVE_FINDINGS[str(rng.choice(FIVE_CLASSES))])
    findings = {n: _finding_params(n, rng) for n in FINDINGS if n in names}
    if edema and "effusion" in findings:
        findings["effusion"] = _finding_params("effusion", rng, "small", "bilateral")
    return findings


def _smooth_noise(rng, size, cells):
    """Low-frequency noise, unit std: a cells x cells random grid upsampled to size x size."""
    g = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32))
    return np.asarray(g.resize((size, size), Image.BICUBIC))


def _line(x, y, points, width):
    """Soft polyline through `points` (x, y pairs): exp(-(distance / width)^2), vectorised."""
    out = np.zeros_like(x)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy + 1e-12), 0, 1)
        out = np.maximum(out, np.exp(-((x - x0 - t * dx) ** 2 + (y - y0 - t * dy) ** 2) / width ** 2))
    return out


def _lung_field(x, y, s, A, base, gap=0.0):
    """Approximate signed distance (> 0 inside) to one lung field's border, and d = distance from
    the midline outwards. s = -1: patient's right lung (image left). A rounded apex over straight
    walls that widen towards the base; the bottom is the hemidiaphragm dome, deepest laterally, so
    the costophrenic angle is sharp. gap > 0 pulls the apex and lateral edge in (pneumothorax)."""
    d = s * (x - 0.5)
    top, dc, a = A["top"] + gap, A["dc"] - 0.3 * gap, A["a"] - 0.3 * gap
    t = np.clip((y - top) / (base - top), 0, 1)
    u = np.abs(d - dc) / (a * (0.9 + 0.2 * t))
    yc = top + 0.45 * (base - top)
    v = np.clip((yc - y) / (yc - top), 0, None)  # only the upper part is rounded
    wall = (1 - (u ** 2.5 + v ** 2.5) ** 0.4) * a
    dome = base - A["dome"] * (1 - ((d - A["dc"] + 0.2 * A["a"]) / (1.2 * A["a"])) ** 2)
    return np.minimum(wall, dome - y), d


def _vessels(angles, s, A, base, size):
    """Vessel texture of one lung (float32, 0..1): tapering wavy branches radiating from the
    hilum, one side branch each, fading towards the periphery. PIL draws the lines (fast)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    hd, hy = A["dc"] - 0.6 * A["a"], A["top"] + 0.5 * (base - A["top"])
    for k, phi in enumerate(angles):
        for phi0, r0, length in ((phi, 0.0, 0.22), (phi + (0.45 if k % 2 else -0.45), 0.08, 0.12)):
            d0, y0 = hd + r0 * math.cos(phi), hy + r0 * math.sin(phi)  # a branch starts on its parent
            pts = []
            for j in range(7):
                r = length * j / 6
                a = phi0 + 0.12 * math.sin(30 * r + k)
                pts.append(((0.5 + s * (d0 + r * math.cos(a))) * size, (y0 + r * math.sin(a)) * size))
            for part, fade in ((pts[:4], 1.0), (pts[3:], 0.5)):  # thick, bright near the hilum
                draw.line(part, fill=int(255 * fade * math.exp(-r0 / 0.14)),
                          width=max(1, round(size * 0.016 * fade * (1 - r0 / 0.3))), joint="curve")
    canvas = canvas.filter(ImageFilter.GaussianBlur(0.5 * size / 128))
    return np.asarray(canvas, dtype=np.float32) / 255


def _consolidation(g, p, rng):
    """Ill-defined patchy opacity centred in each involved lobe."""
    noise, out = _smooth_noise(rng, g.size, 14), 0
    for lobe in p["lobes"]:
        sd, (ou, ot) = lobe.split()[0], LOBES[lobe]
        r0 = rng.uniform(0.045, 0.075)
        blob = np.exp(-((g.d[sd] - g.A["dc"] - ou * g.A["a"]) ** 2
                        + ((g.y - g.A["top"] - ot * g.h[sd]) / 1.3) ** 2) / r0 ** 2)
        out = out + np.clip(blob * (0.9 + 0.5 * noise) - 0.15, 0, 0.8) * g.mask[sd]
    return out


def _edema(g, p, rng):
    """Bilateral perihilar haze fading outwards; Kerley B lines at the lateral bases (moderate+)."""
    sev, out = SEVERITY["edema"].index(p["severity"]), 0
    for sd, s in SIDE.items():
        hilum = (g.d[sd] - g.A["dc"] + 0.45 * g.A["a"]) / 0.11, (g.y - g.A["top"] - 0.55 * g.h[sd]) / 0.16
        out = out + (0.3 + 0.15 * sev) * np.exp(-hilum[0] ** 2 - hilum[1] ** 2) * g.mask[sd]
        wall = g.A["dc"] + 1.05 * g.A["a"]
        for _ in range(2 * sev + (1 if sev else 0)):
            yk = g.base[sd] - rng.uniform(0.03, 0.14)
            pts = [(0.5 + s * (wall - 0.004), yk), (0.5 + s * (wall - 0.035), yk)]
            out = out + 0.7 * _line(g.x, g.y, pts, 0.004) * g.mask[sd]
    return out


def _atelectasis(g, p, rng):
    """Thin plate-like bands just above the dome (moderate also raises it: see render_study)."""
    sev, out = SEVERITY["atelectasis"].index(p["severity"]), 0
    for sd in _sides(p["side"]):
        for _ in range(sev + 1):
            yb = g.base[sd] - g.A["dome"] - rng.uniform(0.015, 0.06)
            d0 = g.A["dc"] + rng.uniform(-0.35, 0.35) * g.A["a"]
            hl, tilt = rng.uniform(0.04, 0.07), rng.uniform(-0.15, 0.15)
            pts = [(0.5 + SIDE[sd] * (d0 + e * hl), yb + e * tilt * hl) for e in (-1, 1)]
            out = out + 0.8 * _line(g.x, g.y, pts, 0.007 + 0.0025 * sev) * g.mask[sd]
    return out


def _nodule(g, p, rng):
    """A round well-defined opacity in the given lobe."""
    sd, (ou, ot) = p["lobe"].split()[0], LOBES[p["lobe"]]
    nd = g.A["dc"] + ou * g.A["a"] + rng.uniform(-0.03, 0.03)
    ny = g.A["top"] + ot * g.h[sd] + rng.uniform(-0.03, 0.03)
    r = p["mm"] / 700  # the image is about 35 cm wide; radius = diameter / 2
    return 0.75 * g.soft_edge(r - np.sqrt((g.d[sd] - nd) ** 2 + (g.y - ny) ** 2)) * g.mask[sd]


def _effusion(g, p, rng):
    """Fluid mask: from the base up to a meniscus that climbs the lateral wall (concave up), so
    a small effusion only fills, i.e. blunts, the costophrenic angle."""
    fluid = 0
    for sd in _sides(p["side"]):
        lateral = np.clip((g.d[sd] - g.A["dc"] + g.A["a"]) / (2.2 * g.A["a"]), 0, 1)  # 0 medial, 1 lateral
        level = g.base[sd] - p["height"] * rng.uniform(0.9, 1.1) * g.h[sd] * (0.55 + 0.45 * lateral ** 2)
        fluid = np.maximum(fluid, g.mask[sd] * np.clip(0.5 + (g.y - level) / (2 * g.eps), 0, 1))
    return fluid


def _devices(g, p, cxm, heart_bottom):
    """Radiopaque tubes, lines and a pacemaker (1 = metal)."""
    x, y, top, out = g.x, g.y, g.A["top"], 0
    paths = {"ett": [(cxm, 0.0), (cxm, top + 0.16 - p["ett_cm"] / 35)],  # tip this far above the carina
             "ngt": [(cxm - 0.005, 0.0), (cxm + 0.01, g.base["left"]), (cxm + 0.12, g.base["left"] + 0.07)],
             "cvc": [(cxm - 0.09, 0.02), (cxm - 0.05, top + 0.1), (cxm - 0.025, top + 0.24)],  # right IJ -> SVC
             "pacemaker": [(cxm + 0.2, top), (cxm + 0.03, top + 0.25), (cxm + 0.05, heart_bottom)]}
    for item in p["items"]:
        out = np.maximum(out, _line(x, y, paths[item], 0.006 if item == "ett" else 0.004))
        if item == "pacemaker":  # generator box below the left clavicle
            box = np.minimum(0.04 - np.abs(x - cxm - 0.23), 0.028 - np.abs(y - top + 0.01))
            out = np.maximum(out, g.soft_edge(box))
    return out


OPACITIES = {"consolidation": _consolidation, "edema": _edema, "atelectasis": _atelectasis, "nodule": _nodule}


def render_study(anatomy_seed, findings, size=128, study_seed=0):
    """Draw one PA radiograph -> uint8 array (size, size). anatomy_seed fixes the body,
    study_seed the pose, noise and the finding-specific randomness; `findings` is
    {name: params} as from sample_findings / _finding_params. Each finding draws from its own
    random stream, so adding one finding leaves every other pixel source unchanged."""
    A, F = sample_anatomy(np.random.default_rng([anatomy_seed, 0])), findings
    srng = np.random.default_rng([anatomy_seed, study_seed, 1])
    frng = {n: np.random.default_rng([anatomy_seed, study_seed, 2 + k]) for k, n in enumerate(FINDINGS)}
    # anatomical coordinates: fractions of the image, x to the right, y down (pose comes last)
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = np.meshgrid(t, t, indexing="ij")
    eps = 1.2 / size  # edge softness: about one pixel
    g = types.SimpleNamespace(x=x, y=y, A=A, size=size, eps=eps,
                              soft_edge=lambda dist: np.clip(0.5 + dist / eps, 0, 1))

    # 1. hemidiaphragms (lobar volume loss raises one), lung fields, vessels, pneumothorax, ribs
    g.base = {"right": A["base"], "left": A["base"] + A["left_drop"]}
    if "atelectasis" in F and F["atelectasis"]["severity"] == "moderate":
        for sd in _sides(F["atelectasis"]["side"]):
            g.base[sd] -= 0.025
    g.h = {sd: g.base[sd] - A["top"] for sd in SIDE}
    dist, g.d = {}, {}
    for sd in SIDE:
        dist[sd], g.d[sd] = _lung_field(x, y, SIDE[sd], A, g.base[sd])
    g.mask = {sd: g.soft_edge(dist[sd]) for sd in SIDE}
    lung = np.maximum(g.mask["right"], g.mask["left"])
    paren = A["lung"] + 0.02 * _smooth_noise(srng, size, 12)
    for k, sd in enumerate(SIDE):
        vessels = _vessels(A["vessels"][k], SIDE[sd], A, g.base[sd], size)
        if "pneumothorax" in F and F["pneumothorax"]["side"] == sd:
            inner = _lung_field(x, y, SIDE[sd], A, g.base[sd], gap=F["pneumothorax"]["gap"])[0]
            outside = g.mask[sd] * (1 - g.soft_edge(inner))  # air beyond the pleural line: dark, no vessels
            vessels = vessels * (1 - outside)
            line = np.exp(-(inner / (0.7 * eps)) ** 2) * g.soft_edge(dist[sd] - 2 * eps)  # where lung and
            paren = paren - outside * 0.5 * A["lung"] + 0.25 * line                       # wall have parted
        paren = paren + 0.2 * vessels * g.mask[sd]
    ph = (y + 0.6 * (np.abs(x - 0.5) - 0.15) ** 2) / A["rib_gap"] - A["rib_phase"]
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * ph)) ** 8  # posterior ribs: periodic curved bands

    # 2. body soft tissue, spine, clavicles; then the dark lungs; then opacities inside them
    half = A["dc"] + 1.1 * A["a"] + A["body"]
    body = np.clip(0.5 + (1 - np.abs((x - 0.5) / half) ** 4 - np.abs((y - 0.75) / 0.8) ** 4) / 0.15, 0, 1)
    cxm = 0.5  # mediastinal midline; a large pneumothorax pushes it to the other side
    if "pneumothorax" in F and F["pneumothorax"]["severity"] == "large":
        cxm -= 0.025 * SIDE[F["pneumothorax"]["side"]]
    spine = np.exp(-((x - cxm) / 0.028) ** 4) * (1 + 0.3 * np.cos(2 * np.pi * y / 0.045))
    img = body * (A["soft"] * (0.85 + 0.15 * (1 - ((x - 0.5) / half) ** 2)) + 0.1 * spine)
    for s in (-1, 1):  # clavicles, rising laterally
        clavicle = [(0.5 + s * 0.04, A["top"] + 0.01), (0.5 + s * 0.3, A["top"] - 0.05)]
        img += 0.12 * _line(x, y, clavicle, 0.012)
    img = img * (1 - lung) + (paren + 0.08 * ribs) * lung
    opacity = sum(draw(g, F[name], frng[name]) for name, draw in OPACITIES.items() if name in F)
    img += np.clip(opacity, 0, 0.9) * (0.95 * A["soft"] - img)  # towards soft-tissue brightness

    # 3. heart (CTR = heart width / thoracic width; a third right of the midline, two thirds left),
    #    mediastinum, aortic knob, trachea
    ctr = F["cardiomegaly"]["ctr"] if "cardiomegaly" in F else A["ctr"]
    width = ctr * 2 * (A["dc"] + 1.1 * A["a"])
    hh = A["heart_h"] * (1 + 0.5 * (ctr - 0.44))
    hx, hy = cxm + width / 6, g.base["left"] - A["dome"] - 0.15 * hh  # widest near the dome
    heart = g.soft_edge((1 - np.sqrt(((x - hx) / (width / 2)) ** 2 + ((y - hy) / hh) ** 2)) * hh)
    mw = A["dc"] - A["a"] + 0.01
    med = g.soft_edge(mw - np.abs(x - cxm)) * (y < hy)
    knob = g.soft_edge(0.025 - np.sqrt((x - cxm - mw) ** 2 + (y - A["top"] - 0.12) ** 2))
    heart = np.maximum(heart, np.maximum(med, knob))
    trachea = np.exp(-((x - cxm) / 0.011) ** 2) * (y < A["top"] + 0.16)
    img = img * (1 - heart) + heart * (0.95 * A["soft"] + 0.1 * spine - 0.25 * trachea)

    # 4. pleural fluid over everything but the devices; devices last
    if "effusion" in F:
        fluid = _effusion(g, F["effusion"], frng["effusion"])
        img = img * (1 - fluid) + fluid * 0.92 * A["soft"]
    if "devices" in F:
        img += 0.8 * _devices(g, F["devices"], cxm, hy + 0.6 * hh) * (1 - img)

    # 5. pose (rotation, scale, shift about the centre), exposure (gamma), quantum noise
    ang, scale = math.radians(srng.uniform(-3, 3)), srng.uniform(0.93, 1.04)
    sx, sy = (float(v) * size for v in srng.uniform(-0.025, 0.025, size=2))
    a, b, c = size / 2, math.cos(ang) / scale, math.sin(ang) / scale
    affine = (b, c, a - b * (a + sx) - c * (a + sy), -c, b, a + c * (a + sx) - b * (a + sy))  # output -> input
    img = np.asarray(Image.fromarray(np.clip(img, 0, 1).astype(np.float32)).transform(
        (size, size), Image.AFFINE, affine, resample=Image.BILINEAR, fillcolor=0))
    img = img ** srng.uniform(0.8, 1.25)
    img = img + srng.uniform(0.01, 0.025) * srng.standard_normal(img.shape, dtype=np.float32)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


# Sentence banks. Each entry is (template, labels it asserts); slots come from the finding's
# parameters. Entry 0 of "pos" is the canonical certain phrasing used for the 5xN set.
# CheXpert convention: positive mention 1, hedged ("possible", "cannot be excluded") -1, negated 0.
BANK = {
    "cardiomegaly": {
        "pos": [("{sev} cardiomegaly.", {"Cardiomegaly": 1}),
                ("The heart is {sevly} enlarged.", {"Cardiomegaly": 1}),
                ("{sev} enlargement of the cardiac silhouette.", {"Cardiomegaly": 1})],
        "hedge": [("Borderline heart size, possibly mild cardiomegaly.", {"Cardiomegaly": -1}),
                  ("The heart is top normal in size; cardiomegaly cannot be excluded.", {"Cardiomegaly": -1})],
        "neg": [("Heart size is normal.", {"Cardiomegaly": 0}), ("Normal heart size.", {"Cardiomegaly": 0}),
                ("No cardiomegaly.", {"Cardiomegaly": 0})]},
    "effusion": {
        "pos": [("{sev} {side} pleural effusion{s}.", {"Pleural Effusion": 1}),
                ("There {is} {sev} {side} pleural effusion{s}.", {"Pleural Effusion": 1}),
                ("{sev} {side} pleural effusion{s} with blunting of the costophrenic angle{s}.",
                 {"Pleural Effusion": 1})],
        "hedge": [("Possible {sev} {side} pleural effusion{s}.", {"Pleural Effusion": -1}),
                  ("{sev} {side} pleural effusion{s} cannot be excluded.", {"Pleural Effusion": -1})],
        "neg": [("No pleural effusion.", {"Pleural Effusion": 0}),
                ("There is no pleural effusion.", {"Pleural Effusion": 0})]},
    "pneumothorax": {
        "pos": [("{sev} {side} apical pneumothorax.", {"Pneumothorax": 1}),
                ("There is a {sev} {side} pneumothorax.", {"Pneumothorax": 1}),
                ("{side}-sided pneumothorax, {sev} in size.", {"Pneumothorax": 1})],
        "hedge": [("Possible {sev} {side} apical pneumothorax.", {"Pneumothorax": -1}),
                  ("A {sev} {side} pneumothorax cannot be excluded.", {"Pneumothorax": -1})],
        "neg": [("No pneumothorax.", {"Pneumothorax": 0}), ("There is no pneumothorax.", {"Pneumothorax": 0})]},
    "consolidation": {
        "pos": [("Consolidation in the {loc}.", {"Consolidation": 1}),
                ("{loc} pneumonia.", {"Pneumonia": 1}),
                ("Patchy opacity in the {loc}.", {"Lung Opacity": 1}),
                ("Consolidation in the {loc} consistent with pneumonia.", {"Consolidation": 1, "Pneumonia": 1})],
        "hedge": [("Opacity in the {loc}, possibly pneumonia.", {"Lung Opacity": 1, "Pneumonia": -1}),
                  ("Possible consolidation in the {loc}.", {"Consolidation": -1}),
                  ("{loc} opacity concerning for pneumonia.", {"Lung Opacity": 1, "Pneumonia": -1})],
        "neg": [("No focal consolidation.", {"Consolidation": 0}),
                ("No consolidation to suggest pneumonia.", {"Consolidation": 0, "Pneumonia": 0})]},
    "edema": {
        "pos": [("{sev} pulmonary edema.", {"Edema": 1}),
                ("{sev} interstitial edema with perihilar haziness{kerley}.", {"Edema": 1}),
                ("Findings consistent with {sev} pulmonary edema.", {"Edema": 1})],
        "hedge": [("Possible {sev} pulmonary edema.", {"Edema": -1}),
                  ("Perihilar haziness may reflect {sev} pulmonary edema.", {"Edema": -1})],
        "neg": [("No pulmonary edema.", {"Edema": 0}), ("There is no pulmonary edema.", {"Edema": 0})]},
    "atelectasis": {
        "pos": [("{sev} {where} atelectasis.", {"Atelectasis": 1}),
                ("Plate-like atelectasis at the {base}.", {"Atelectasis": 1}),
                ("{sev} {where} linear atelectasis.", {"Atelectasis": 1})],
        "hedge": [("{where} opacities may reflect atelectasis.", {"Lung Opacity": 1, "Atelectasis": -1}),
                  ("Possible {sev} {where} atelectasis.", {"Atelectasis": -1})],
        "neg": [("No atelectasis.", {"Atelectasis": 0})]},
    "nodule": {
        "pos": [("{mm} mm nodule in the {loc}.", {"Lung Lesion": 1}),
                ("{mm} mm pulmonary nodule projecting over the {loc}.", {"Lung Lesion": 1})],
        "hedge": [("Possible {mm} mm nodule in the {loc}.", {"Lung Lesion": -1})],
        "neg": [("No suspicious pulmonary nodules.", {"Lung Lesion": 0})]},
}
DEVICE_SENTENCES = {
    "ett": ("Endotracheal tube terminates {ett_cm} cm above the carina.", {"Support Devices": 1}),
    "ngt": ("Nasogastric tube courses below the diaphragm into the stomach.", {"Support Devices": 1}),
    "cvc": ("Right internal jugular central venous catheter terminates in the SVC.", {"Support Devices": 1}),
    "pacemaker": ("Left-sided pacemaker with a lead in the right ventricle.", {"Support Devices": 1})}
DEVICES_IMPRESSION = ("Lines and tubes in standard position.", {"Support Devices": 1})
NEGATABLE = ["effusion", "pneumothorax", "consolidation", "edema", "cardiomegaly"]
NORMAL_FINDINGS = [
    ("PA and lateral views of the chest provided.", {}),
    ("The lungs are clear.", {}),
    ("No pleural effusion or pneumothorax.", {"Pleural Effusion": 0, "Pneumothorax": 0}),
    ("The cardiomediastinal silhouette is normal.", {"Enlarged Cardiomediastinum": 0}),
    ("No acute osseous abnormality.", {"Fracture": 0}),
    ("No focal consolidation.", {"Consolidation": 0}),
    ("Heart size is normal.", {"Cardiomegaly": 0}),
    ("No pulmonary edema.", {"Edema": 0})]
NORMAL_IMPRESSIONS = [("No acute cardiopulmonary process.", {}), ("No acute intrathoracic process.", {}),
                      ("Normal chest radiograph.", {})]
INDICATIONS = ["shortness of breath", "cough", "fever, evaluate for pneumonia", "chest pain",
               "evaluate for effusion", "line placement"]


def _words(name, p):
    """Template slot values for one finding, from its parameters."""
    side = p.get("side", "")
    bil = side == "bilateral"
    lobes = p.get("lobes", [])
    if len(lobes) > 1:
        loc = f"{', '.join(lobes[:-1])} and {lobes[-1]} lobes"
    else:
        loc = f"{(lobes or [p.get('lobe')])[0]} lobe"
    sev = p.get("severity", "")
    return {"sev": sev, "sevly": {"mild": "mildly", "moderate": "moderately", "severe": "severely"}.get(sev, sev),
            "side": side, "s": "s" if bil else "", "is": "are" if bil else "is a", "loc": loc,
            "where": {"left": "left basilar", "right": "right basilar", "bilateral": "bibasilar"}.get(side, ""),
            "base": {"left": "left lung base", "right": "right lung base", "bilateral": "lung bases"}.get(side, ""),
            "kerley": "" if sev == "mild" else " and Kerley B lines", "mm": p.get("mm"),
            "ett_cm": p.get("ett_cm")}


def _fill(entry, words):
    text = entry[0].format(**words)
    return text[0].upper() + text[1:], entry[1]


def write_report(findings, rng, strict=False):
    """A MIMIC-like report for `findings` -> (report text, labels {label: 1 / 0 / -1}).
    Labels come from the sentences actually written (1 beats -1 beats 0, as the CheXpert labeler
    aggregates); No Finding = 1 when no observation other than Support Devices is 1 or -1.
    strict=True (5xN set): canonical, certain phrasing only."""
    pick = (lambda bank: bank[0]) if strict else (lambda bank: bank[rng.integers(len(bank))])
    found, impression = [], []  # (sentence, labels)
    if not findings:
        if rng.random() < 0.5:  # the one report that many normal studies share word for word
            found, impression = NORMAL_FINDINGS[:5], NORMAL_IMPRESSIONS[:1]
        else:
            k = int(rng.integers(2, 6))
            found = [NORMAL_FINDINGS[i] for i in sorted(rng.choice(len(NORMAL_FINDINGS), k, replace=False))]
            impression = [pick(NORMAL_IMPRESSIONS)]
    for name, p in findings.items():
        if name == "devices":
            found += [_fill(DEVICE_SENTENCES[item], _words(name, p)) for item in p["items"]]
            impression.append(DEVICES_IMPRESSION)
            continue
        # a borderline heart is always hedged; other findings sometimes (never in the 5xN set)
        hedged = p["severity"] == "borderline" if name == "cardiomegaly" else not strict and rng.random() < 0.12
        bank, words = BANK[name]["hedge" if hedged else "pos"], _words(name, p)
        found.append(_fill(pick(bank), words))
        impression.append(_fill(pick(bank), words))
    if findings:
        found += [pick(BANK[n]["neg"]) for n in NEGATABLE if n not in findings and rng.random() < 0.5]
    if rng.random() < 0.25:  # impression-only report: it keeps the negations, drops the rest
        impression += [s for s in found if s[1] and all(v == 0 for v in s[1].values())]
        found = []
    sections = []
    if rng.random() < 0.3:
        sections += ["EXAMINATION: CHEST (PA AND LAT)",
                     f"INDICATION: ___-year-old with {INDICATIONS[rng.integers(len(INDICATIONS))]}.",
                     "COMPARISON: None."]
    if found:
        sections.append("FINDINGS: " + " ".join(s for s, _ in found))
    if len(impression) >= 2 and rng.random() < 0.5:
        sections.append("IMPRESSION:\n" + "\n".join(f"{i}. {s}" for i, (s, _) in enumerate(impression, 1)))
    else:
        sections.append("IMPRESSION: " + " ".join(s for s, _ in impression))
    rank = {1: 3, -1: 2, 0: 1}
    labels = {}
    for _, sentence_labels in found + impression:
        for k, v in sentence_labels.items():
            if k not in labels or rank[v] > rank[labels[k]]:
                labels[k] = v
    if not any(v in (1, -1) for k, v in labels.items() if k != "Support Devices"):
        labels["No Finding"] = 1
    return "\n\n".join(sections) + "\n", labels


def _assign_splits(rng, n):
    """n studies -> list of (patient index, split); ~15% of patients have two studies; splits
    80/10/10 are drawn per PATIENT, so no patient is in two splits."""
    counts = []
    while sum(counts) < n:
        counts.append(2 if rng.random() < 0.15 and sum(counts) + 2 <= n else 1)
    order = rng.permutation(len(counts))
    split_of = {}
    for rank, p in enumerate(order):
        frac = rank / len(counts)
        split_of[int(p)] = "train" if frac < 0.8 else "valid" if frac < 0.9 else "test"
    return [(p, split_of[p]) for p, c in enumerate(counts) for _ in range(c)]


def _caption(findings):
    """Short human-readable summary of a findings spec, e.g. 'effusion small left; devices ett'."""
    parts = []
    for name, p in findings.items():
        bits = [str(p[k]) for k in ("severity", "side", "lobe") if k in p]
        bits += p.get("lobes", []) + p.get("items", [])
        parts.append(" ".join([name] + bits))
    return "; ".join(parts) or "normal"


def generate_synthetic(out_dir, n=4000, size=128, seed=0, n_per_class_5x=100):
    """Write SynthCXR to out_dir: images/*.png, reports/*.txt, manifest.csv, meta.json (last, so
    an interrupted run is redone by ensure_synthetic). Splits train/valid/test (by patient) of n
    studies plus test_5x: n_per_class_5x studies per FIVE_CLASSES class, each with exactly that
    one finding, certain phrasing, all other observations 0 (blank -> 0 as in CheXpert 5x200),
    on patients of their own. Same arguments -> byte-identical files. Returns the manifest path."""
    out = Path(out_dir)
    for sub in ("images", "reports"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    studies = _assign_splits(np.random.default_rng([seed, 0]), n)
    n_patients = studies[-1][0] + 1 if studies else 0
    for k in range(len(FIVE_CLASSES)):  # the zero-shot set: one study per new patient
        studies += [(n_patients + k * n_per_class_5x + j, "test_5x") for j in range(n_per_class_5x)]
    rows = []
    for i, (patient, split) in enumerate(studies):
        rng = np.random.default_rng([seed, 1, i])
        if split == "test_5x":
            label = FIVE_CLASSES[(patient - n_patients) // n_per_class_5x]
            name = FIVE_FINDINGS[label]
            # a borderline heart would be reported as uncertain (-1), which the 5x rule excludes
            severity = str(rng.choice(SEVERITY[name][1:])) if name == "cardiomegaly" else None
            findings = {name: _finding_params(name, rng, severity)}
        else:
            findings = sample_findings(rng)
        study_id, patient_id = f"s{50000000 + i}", f"p{10000000 + patient}"
        pixels = render_study(seed * 1_000_000 + patient, findings, size, study_seed=i)
        Image.fromarray(pixels).save(out / "images" / f"{study_id}.png", format="PNG")
        report, labels = write_report(findings, np.random.default_rng([seed, 2, i]),
                                      strict=split == "test_5x")
        (out / "reports" / f"{study_id}.txt").write_text(report, encoding="utf-8")
        if split == "test_5x":
            labels = {c: labels.get(c, 0) for c in LABELS if c != "No Finding"}
        rows.append({"image": f"images/{study_id}.png", "text": extract_report_text(report),
                     "split": split, "study_id": study_id, "patient_id": patient_id, "view": "PA",
                     "report": f"reports/{study_id}.txt", "findings": _caption(findings), **labels})
    write_manifest(out / "manifest.csv", rows)
    meta = _synth_meta(n, size, seed, n_per_class_5x)
    (out / "meta.json").write_text(json.dumps(meta, sort_keys=True) + "\n", encoding="utf-8")
    return out / "manifest.csv"


def _synth_meta(n, size, seed, n_per_class_5x):
    return {"version": SYNTH_VERSION, "n": n, "size": size, "seed": seed, "n_per_class_5x": n_per_class_5x}


def ensure_synthetic(out_dir, n=4000, size=128, seed=0, n_per_class_5x=100):
    """generate_synthetic unless out_dir/meta.json already records the same arguments."""
    meta = _synth_meta(n, size, seed, n_per_class_5x)
    meta_path = Path(out_dir) / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        return Path(out_dir) / "manifest.csv"
    return generate_synthetic(out_dir, n, size, seed, n_per_class_5x)


def preview(data_dir, out=None, n=30, cols=6, tile=160):
    """Contact sheet of the first train images and the first test_5x image of each class, each
    captioned with its drawn findings, so a person can check that the pictures match the words."""
    rows = read_manifest(Path(data_dir) / "manifest.csv")
    shown = [r for r in rows if r["split"] == "train"][:n - cols]
    shown += list({r["findings"].split()[0]: r for r in reversed(rows) if r["split"] == "test_5x"}.values())
    cap_h, font = 40, ImageFont.load_default()
    sheet = Image.new("L", (cols * tile, math.ceil(len(shown) / cols) * (tile + cap_h)), 255)
    draw = ImageDraw.Draw(sheet)
    for k, row in enumerate(shown):
        x0, y0 = (k % cols) * tile, (k // cols) * (tile + cap_h)
        sheet.paste(load_image(row["_path"]).resize((tile - 4, tile - 4), Image.BILINEAR), (x0 + 2, y0 + 2))
        caption = f"[{row['split']}] {row['findings']}"
        draw.multiline_text((x0 + 3, y0 + tile), "\n".join(textwrap.wrap(caption, 30)[:3]), fill=0, font=font)
    out = Path(out) if out else Path(data_dir) / "preview.png"
    sheet.save(out)
    return out


def probe(data_dir, epochs=8, image_size=64, seed=0):
    """Are the findings learnable from pixels? A tiny CNN trained on the train split (labels
    1 vs 0/blank; uncertain -1 masked out) -> per-label AUROC on the test split."""
    from evaluate import auroc  # evaluate.py imports data.py, so import lazily
    torch.manual_seed(seed)
    rows = read_manifest(Path(data_dir) / "manifest.csv")

    def tensors(split):
        part = [r for r in rows if r["split"] == split]
        x = np.stack([np.asarray(load_image(r["_path"]).resize((image_size, image_size), Image.BILINEAR))
                      for r in part]).astype(np.float32) / 255.0
        y = np.array([[{"1": 1.0, "-1": math.nan}.get(r.get(n, ""), 0.0) for n in LABELS] for r in part])
        return torch.from_numpy((x[:, None] - 0.5) / 0.5), torch.tensor(y, dtype=torch.float32)

    (xtr, ytr), (xte, yte) = tensors("train"), tensors("test")
    net = torch.nn.Sequential(  # (B,1,64,64) -> (B,8,32,32) -> (B,16,16,16) -> (B,32,8,8) -> (B,14)
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(image_size // 32),
        torch.nn.Flatten(), torch.nn.Linear(32 * 64, len(LABELS)))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    for epoch in range(epochs):
        for idx in torch.randperm(len(xtr)).split(64):
            logits, y = net(xtr[idx]), ytr[idx]
            known = ~torch.isnan(y)  # uncertain labels carry no target
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], y[known])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        scores = net(xte).numpy()
    results = {}
    for j, name in enumerate(LABELS):
        known = ~np.isnan(yte[:, j].numpy())
        if 0 < yte[known, j].sum() < known.sum():
            results[name] = float(auroc(yte[known, j].numpy(), scores[known, j]))
    for name, value in results.items():
        positives = int((yte[:, LABELS.index(name)] == 1).sum())
        print(f"{name:28s} AUROC {value:.3f}  (test positives {positives})")
    print(f"{'mean':28s} AUROC {np.mean(list(results.values())):.3f}")
    return results


# -----------------------------------------------------------------------------
# 6. Real datasets (MIMIC-CXR, CheXpert, RSNA, IU X-Ray, ROCO)


# -----------------------------------------------------------------------------
# 7. Command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="write the SynthCXR dataset")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=4000, help="studies in train/valid/test")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-5x", type=int, default=100, help="studies per class in the test_5x set")
    p = sub.add_parser("preview", help="contact sheet PNG of a dataset folder with a manifest.csv")
    p.add_argument("dir")
    p.add_argument("--out", default=None, help="PNG path (default DIR/preview.png)")
    p = sub.add_parser("probe", help="supervised CNN per-label test AUROC: are findings in the pixels?")
    p.add_argument("dir")
    p.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args(argv)
    if args.command == "synth":
        t0 = time.time()
        path = generate_synthetic(args.out, args.n, args.size, args.seed, args.n_5x)
        print(f"wrote {path}: {args.n + 5 * args.n_5x} studies of {args.size}px in {time.time() - t0:.1f} s")
    elif args.command == "preview":
        print(f"wrote {preview(args.dir, args.out)}")
    elif args.command == "probe":
        t0 = time.time()
        probe(args.dir, args.epochs)
        print(f"probe took {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
