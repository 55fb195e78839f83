"""Data for MSD: the manifest format, report text, tokenizer, image transforms, the image-report
Dataset, and SynthCXR, a procedurally drawn chest X-ray dataset with MIMIC-like reports.

Every dataset, synthetic or real, becomes one CSV manifest with one row per image:
    image, text, split, study_id, patient_id, view, [extra columns], <14 CheXpert labels>
`image` is relative to the CSV's folder, `text` is extract_report_text(full report) (or empty in
EVERY row: a labels-only manifest for evaluation, e.g. CheXpert, which has no reports), `split`
is train / valid / test / test_5x, labels are 1 / 0 / -1 (uncertain) / empty (not mentioned); a
dataset of your own may carry a `label` column of class names instead of the 14 labels.
PairDataset reads a manifest for training.

    python data.py synth --out data/synth [--n 4000] [--size 128] [--seed 0]   # write SynthCXR
    python data.py preview data/synth                                           # contact sheet PNG
    python data.py prepare mimic-cxr --root DIR --out mimic.csv [--cache DIR]   # a real dataset
    python data.py prepare image-folder --root MY_IMAGES --out my.csv           # your own images
    python data.py prepare csv MY_DATA --out my.csv --image-column file ...     # your own table

Part I, the core that msd.py trains from: 1 labels and the manifest · 2 report text ·
3 loading images · 4 the word-level tokenizer · 5 image transforms · 6 PairDataset.
Part II, appendices: A files, image checks and DICOM · B WordPiece, BERT's tokenizer · C SynthCXR ·
D real datasets and image folders (prepare) · E command line.
Only the standard library, numpy, Pillow, torch and tqdm are used (pydicom, optional, for DICOM).
"""
import argparse
import collections
import contextlib
import csv
import gzip
import hashlib
import html
import inspect
import io
import json
import math
import multiprocessing
import numbers
import os
import re
import shutil
import stat
import sys
import time
import types
import unicodedata
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps
from tqdm import tqdm

# =============================================================================
# Part I: the core (the manifest, report text, images, tokenizer, transforms, PairDataset)
# =============================================================================

# -----------------------------------------------------------------------------
# 1. Labels and the manifest
# Reading it (with its checks), split leakage between patients, and writing it.
# -----------------------------------------------------------------------------

LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
          "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity",
          "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
          "Pneumothorax", "Support Devices"]  # CheXpert's 14 observations, in MIMIC csv order
FIVE_CLASSES = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
REQUIRED_COLUMNS = ("image", "text", "split", "study_id", "patient_id", "view")
SPLITS = ("train", "valid", "test", "test_5x")  # test_5x: the 5xN zero-shot set (docs/data.md)
LABEL_VALUES = {"1": "1", "1.0": "1", "0": "0", "0.0": "0", "-1": "-1", "-1.0": "-1", "": ""}


class InputError(ValueError):
    """Bad input that its user can fix: a file, a row, a key or a value, named in the message.
    Both command lines print its one line and exit non-zero; any other exception is a bug and
    keeps its traceback. (A ValueError, so that callers may catch it as one.)"""


class InputKeyError(InputError, KeyError):
    """An unknown key (of a config, an ablation file): also a KeyError for callers."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class InputTypeError(InputError, TypeError):
    """A value of the wrong type (a config key given text where a number belongs)."""


class MissingPackageError(InputError, ImportError):
    """An optional package (pydicom) that this input needs is not installed."""


USER_ERRORS = (InputError, OSError)  # msd.USER_ERRORS adds the run's own refusals


class ManifestError(InputError):
    """A bad manifest; the message names the file, the row and the column. `reason` groups skips."""

    def __init__(self, message, reason="bad row"):
        super().__init__(message)
        self.reason = reason


# One bad row of a manifest or of a metadata table: its 1-based data row, its image as written
# in the file ('' when the row could not be read), the kind of problem (`reason`: "missing
# image", "empty text", "duplicate row", ...) and the message naming file, row, column and value.
BadRow = collections.namedtuple("BadRow", "row image reason message")
EXAMPLES_PER_KIND = 3  # rows of each kind a BadRowsError quotes


class BadRowsError(ManifestError):
    """Every bad row of a file at once, in one line: the count of each kind, the first
    EXAMPLES_PER_KIND rows of each kind (file, row, column and value) and the way out. `bad_rows`
    holds them all (BadRow), for write_skipped."""

    def __init__(self, source, bad_rows, total, way_out=None):
        kinds = collections.Counter(b.reason for b in bad_rows).most_common()
        examples = []
        for reason, n in kinds:
            first = [b.message for b in bad_rows if b.reason == reason][:EXAMPLES_PER_KIND]
            examples += first + ([f"... and {n - len(first)} more {reason}"] if n > len(first) else [])
        good = total - len(bad_rows)
        way_out = way_out or (f"or go on with the {good} good rows: msd.py --skip_bad=true, "
                              f"evaluate.py --skip-bad (the others are counted and listed)")
        super().__init__(f"{source}: {len(bad_rows)} bad row(s) of {total} ("
                         f"{', '.join(f'{n} {reason}(s)' for reason, n in kinds)}): "
                         f"{' | '.join(examples)}. Fix or remove these rows, {way_out}", "bad rows")
        self.bad_rows = list(bad_rows)


def scan_manifest(path):
    """Read and check a manifest in one pass -> (good rows, [BadRow] of every bad row).

    Good rows are dicts, label values normalised to '1', '0', '-1', ''; each also gets '_row'
    (1-based data row; the CSV line is _row + 1 when no field spans lines) and '_path' (the
    absolute image path). A row is bad when a field count, split or label value is wrong, its
    text is empty (unless EVERY text is: a labels-only manifest), its image is missing or not a
    file, or it repeats an earlier row in every column. A problem of the whole file (not found,
    not UTF-8, a missing column) raises ManifestError / OSError. Empty ids are checked once per
    command, with the split check (check_split_overlap -> check_ids)."""
    path = Path(path)
    root = path.resolve().parent
    text = read_utf8(path, "manifest", "save the manifest as UTF-8 CSV")
    columns, records = read_csv_records(path, io.StringIO(text, newline=""))
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(f"{path}: missing required column(s) {missing}; header is {columns}")
    label_columns = [c for c in LABELS if c in columns]  # real datasets may carry only some labels
    # No text in any row = a labels-only manifest (CheXpert, RSNA have no reports), fine for
    # image-label evaluation; one empty text among reports is a broken row.
    text_at = columns.index("text")
    labels_only = bool(records) and not any(f[text_at].strip() for _, f in records if len(f) > text_at)

    def make_row(i, row):
        if row["split"] not in SPLITS:
            raise ManifestError(f"{path}, row {i}, column 'split': unknown split "
                                f"{row['split']!r}; expected one of {list(SPLITS)}",
                                "unknown split")
        for c in label_columns:
            if row[c].strip() not in LABEL_VALUES:
                raise ManifestError(f"{path}, row {i}, column '{c}': bad label value {row[c]!r}; "
                                    "expected 1, 0, -1 (or 1.0, 0.0, -1.0) or empty",
                                    "bad label value")
            row[c] = LABEL_VALUES[row[c].strip()]
        if not row["text"].strip() and not labels_only:
            raise ManifestError(f"{path}, row {i}, column 'text': empty report text "
                                f"(image {row['image']!r})", "empty text")
        row["_row"], row["_path"] = i, str(root / row["image"])
        check_row_image(path, i, "image", row["_path"])
        return row

    return scan_records(path, columns, records, "image", make_row)


def scan_records(path, header, records, image_column, make_row, keep=None):
    """The row loop of scan_manifest and prepare_csv -> (rows, [BadRow]). Each record becomes a
    dict (record_dict); keep(row) False leaves it out; a row that repeats an earlier one in every
    column is a "duplicate row"; make_row(i, row) returns the row to keep or raises
    ManifestError: a bad row, counted by its reason."""
    image_at, rows, bad, first_of = header.index(image_column), [], [], {}
    for i, (line, fields) in enumerate(records, start=1):
        try:
            row = record_dict(path, i, line, header, fields)
            if keep and not keep(row):
                continue
            first = first_of.setdefault(tuple(fields), i)
            if first != i:
                raise ManifestError(f"{path}, row {i}: the same as row {first} in every column "
                                    f"(image {row[image_column]!r})", "duplicate row")
            rows.append(make_row(i, row))
        except ManifestError as e:
            bad.append(BadRow(i, fields[image_at] if len(fields) > image_at else "", e.reason, str(e)))
    return rows, bad


def read_manifest(path, skip_bad=False, skipped=None):
    """Read and validate a manifest -> list of row dicts (scan_manifest). The file must be UTF-8
    (a byte-order mark, as Excel writes, is fine). Bad rows raise ONE BadRowsError listing them
    all; with skip_bad=True they are skipped, counted on stderr (never silently) and, when
    `skipped` is a list, appended to it (BadRow each; write_skipped writes them as a CSV)."""
    rows, bad = scan_manifest(path)
    if bad and not skip_bad:
        raise BadRowsError(path, bad, len(rows) + len(bad))
    note_skipped("read_manifest", path, bad, skipped)
    return rows


def check_row_image(source, i, column, image):
    """ManifestError ("missing image", or "image not a file" for a folder, FIFO, device) unless
    the image of row i of `source` is an existing regular file."""
    problem = file_problem(image)
    if problem == NOT_FOUND:
        raise ManifestError(f"{source}, row {i}, column '{column}': file not found: {image}",
                            "missing image")
    if problem:
        raise ManifestError(f"{source}, row {i}, column '{column}': {image} {problem}",
                            "image not a file")


def check_ids(path, rows):
    """study_id empty in every row is refused: every image would be one study (one pair id,
    one retrieval target). An empty study_id or patient_id in some rows is warned on stderr with
    the count: those rows share a study, or escape the split check (check_split_overlap)."""
    if rows and not any(r["study_id"].strip() for r in rows):
        raise ManifestError(f"{path}: column 'study_id' is empty in all {len(rows)} rows, so every "
                            f"image would be one study (one pair id, one retrieval target); write "
                            f"each image's study id, or the image's own id for one study per image",
                            "empty study_id")
    why = {"study_id": "those rows are pooled into one study",
           "patient_id": "the split check cannot see their patients, so a patient in 'train' and "
                         "in a test split would go unnoticed; fill in patient_id"}
    for column, consequence in why.items():
        empty = sum(not r[column].strip() for r in rows)
        if empty:
            print(f"warning: {path}: column '{column}' is empty in {empty} of {len(rows)} rows: "
                  f"{consequence}", file=sys.stderr)


def note_skipped(who, source, bad, skipped=None, where=""):
    """skip_bad: the skipped rows counted by kind on one stderr line, and appended to `skipped`
    (a list) when one is given."""
    if not bad:
        return
    if skipped is not None:
        skipped.extend(bad)
    kinds = collections.Counter(b.reason for b in bad)
    why = ", ".join(f"{reason} ({count})" for reason, count in sorted(kinds.items()))
    print(f"{who}: {source}: skipped {len(bad)} rows{where}: {why}", file=sys.stderr)


def write_skipped(path, skipped):
    """The skipped rows (BadRow list: read_manifest(..., skipped=[]), PairDataset.skipped) as a
    CSV with columns row, image, reason, message; msd.py writes it as skipped_rows.csv beside a
    run. Returns the path."""
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(BadRow._fields)
        writer.writerows(skipped)
    return Path(path)


def read_csv_records(path, lines):
    """The header and the data rows of a CSV (`lines`: an open text file) -> (header, [(line
    number, fields)]), blank lines skipped as csv.DictReader skips them. A repeated column name
    (which a dict would silently collapse to its last column) and a field longer than
    csv.field_size_limit() (an unclosed quote, or something that is not a report) are refused."""
    reader, records = csv.reader(lines), []
    try:
        header = next(reader, [])
        for fields in reader:
            if fields:
                records.append((reader.line_num, fields))
    except csv.Error as e:
        raise ManifestError(f"{path}, row {len(records) + 1} (line {reader.line_num}): {e}: a "
                            f"field that long is not a report; look for a quote (\") that opens a "
                            f"field and is never closed, or raise csv.field_size_limit() if the "
                            f"field is meant to be that long") from None
    repeated = sorted(c for c, n in collections.Counter(header).items() if n > 1)
    if repeated:
        raise ManifestError(f"{path}: column(s) {repeated} appear more than once in the header "
                            f"{header}; rename or remove the extra column")
    return header, records


def record_dict(path, i, line, header, fields):
    """One data row (read_csv_records) -> {column: value}; a row whose number of fields is not
    the header's is an error naming the row, its line and both counts."""
    if len(fields) != len(header):
        raise ManifestError(f"{path}, row {i} (line {line}): has {len(fields)} fields, the header "
                            f"has {len(header)} (a field holding a comma must be in double quotes)",
                            "wrong number of fields")
    return dict(zip(header, fields))


ALLOW_OVERLAP = ("config key allow_split_overlap=true (msd.py --allow_split_overlap=true, "
                 "evaluate.py --allow-split-overlap)")


def check_split_overlap(rows, source, allow=False, contents=False, way_out=ALLOW_OVERLAP):
    """Leakage: a patient or a study with rows in split 'train' and in another split (valid,
    test, test_5x) means that a model is evaluated on people it was trained on. contents=True
    also compares the images' bytes (SHA-256, image_sha256; cached beside the manifest `source`):
    the same picture under two patient ids, or copied under two names. Raises ManifestError
    giving, per id column, the count and a few examples, and for contents both rows of a few
    pairs, and `way_out`, the option of the calling command; with allow=True it warns on stderr
    instead. Empty ids are not compared: check_ids, first, refuses or counts them."""
    check_ids(source, rows)
    found = []
    for column in ("patient_id", "study_id"):
        train = {r[column] for r in rows if r["split"] == "train" and r[column]}
        shared = collections.defaultdict(set)  # id -> the other splits it is in
        for r in rows:
            if r["split"] != "train" and r[column] in train:
                shared[r[column]].add(r["split"])
        if shared:
            splits = sorted(set().union(*shared.values()))
            examples = ", ".join(sorted(shared)[:3]) + (", ..." if len(shared) > 3 else "")
            found.append(f"{len(shared)} {column}(s) in 'train' and in {splits} (e.g. {examples})")
    pairs = same_bytes_across_splits(source, rows) if contents else []
    if pairs:
        examples = "; ".join(f"{describe_row(a)} and {describe_row(b)}" for a, b in pairs[:3])
        found.append(f"{len(pairs)} image(s) outside 'train' with the same bytes as an image in "
                     f"'train' (the same picture under two patient ids, or copied under two "
                     f"names; e.g. {examples}{'; ...' if len(pairs) > 3 else ''})")
    if not found:
        return
    message = (f"{source}: {'; '.join(found)}: a model would be evaluated on patients it was "
               f"trained on")
    if allow:
        print(f"warning: {message} (allowed by allow_split_overlap)", file=sys.stderr)
        return
    raise ManifestError(f"{message}. Split by patient (each patient in one split, each image "
                        f"under one patient id), or allow it: {way_out}", "split overlap")


def same_bytes_across_splits(source, rows):
    """[(train row, other row)]: each row outside 'train' whose image file has the same bytes as
    a 'train' row's. Only files whose size occurs both in 'train' and outside it are hashed."""
    size_of = {}
    for r in rows:
        with contextlib.suppress(OSError):  # a missing file is reported by read_manifest
            size_of[image_path(r)] = os.stat(image_path(r)).st_size
    sizes = {split: {size_of.get(image_path(r)) for r in rows if (r["split"] == "train") == split}
             for split in (True, False)}
    both = (sizes[True] & sizes[False]) - {None}
    candidates = [r for r in rows if size_of.get(image_path(r)) in both]
    digest = image_sha256(source, candidates)
    train = {}
    for r in candidates:
        if r["split"] == "train" and image_path(r) in digest:
            train.setdefault(digest[image_path(r)], r)
    return [(train[digest[image_path(r)]], r) for r in candidates
            if r["split"] != "train" and digest.get(image_path(r)) in train]


def image_path(row):
    """The image file of a row: '_path' of a row read_manifest returns, 'image' (absolute) of a
    row a preparer makes."""
    return row.get("_path") or row["image"]


def describe_row(row):
    """A row named for a message: 'metadata.csv row 3 (/data/a.png, patient p1, train)'. '_source'
    names the file whose rows '_row' counts, when it is not the manifest itself."""
    where = f"row {row['_row']} " if "_row" in row else ""
    where = f"{row['_source']} {where}" if "_source" in row else where
    return f"{where}({row['image']}, patient {row['patient_id'] or '(empty)'}, {row['split']})"


def _label_str(value):
    """1 / 0 / -1 / None / NaN / '' / '1.0' -> '1' / '0' / '-1' / ''."""
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(int(float(value)))


def write_manifest(path, rows, label_names=LABELS):
    """Write rows (dicts) as a manifest, whole or not at all (atomic_write). `image` is an absolute
    path or one already relative to the CSV's folder; absolute paths are stored relative. Keys
    starting with '_' are not written."""
    path = Path(path)
    root = path.resolve().parent
    extra = []
    for row in rows:
        extra += [k for k in row if k not in REQUIRED_COLUMNS and k not in label_names
                  and not k.startswith("_") and k not in extra]
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, [*REQUIRED_COLUMNS, *extra, *label_names], lineterminator="\n",
                                extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            out = dict(row)
            if Path(row["image"]).is_absolute():
                out["image"] = Path(os.path.relpath(row["image"], root)).as_posix()
            out.update({name: _label_str(row.get(name)) for name in label_names})
            writer.writerow(out)


# -----------------------------------------------------------------------------
# 2. Report text
# The findings and impression of a report, cleaned the same way for every dataset.
# -----------------------------------------------------------------------------

# MIMIC-CXR reports: upper-case headings ending in a colon at the start of a line.
_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z ()/&,-]*[A-Z)])[ \t]*:", re.M)
FINDINGS_HEADINGS = {"FINDINGS", "FINDING", "FINDINGS AND IMPRESSION", "FINDINGS/IMPRESSION",
                     "IMPRESSION AND FINDINGS"}
IMPRESSION_HEADINGS = {"IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS"}


# Markup that some releases carry inside report text (IU X-Ray: "<BR>", "&gt;", "[&lt;"): an HTML
# tag is "<" or "</" directly followed by a letter, so "< 5 mm" and "<5 mm" are left alone.
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")


def _unmarkup(text):
    """HTML entities unescaped (twice-escaped ones too: "&amp;gt;" -> ">"), then tags replaced by
    a space ("<BR>" is a line break; a space never changes which sections a report has)."""
    for _ in range(3):
        unescaped = html.unescape(text)
        if unescaped == text:
            break
        text = unescaped
    return _HTML_TAG.sub(" ", text)


def extract_report_text(report, sections=True):
    """The text every dataset's rows are made of, cleaned the same way for all of them: HTML
    entities unescaped and tags dropped, whitespace collapsed. sections=True (reports): findings +
    impression (the LAST occurrence of each section, since addenda and re-dictations repeat them),
    "" if the report has neither. sections=False (captions): the whole text."""
    report = _unmarkup(report)
    if not sections:
        return " ".join(report.split())
    found = {}
    heads = list(_HEADING.finditer(report))
    for head, nxt in zip(heads, heads[1:] + [None]):
        name = " ".join(head.group(1).split())
        kind = ("findings" if name in FINDINGS_HEADINGS else
                "impression" if name in IMPRESSION_HEADINGS else None)
        if kind:  # a later occurrence overwrites an earlier one
            found[kind] = " ".join(report[head.end(): nxt.start() if nxt else None].split())
    return " ".join(found[k] for k in ("findings", "impression") if found.get(k))


# -----------------------------------------------------------------------------
# 3. Loading images
# Any image file -> 8-bit grayscale, downscaled once; refused before decoding if too large.
# -----------------------------------------------------------------------------

MAX_IMAGE_SIDE = 1024  # larger images are downscaled once, at load (JPEGs decoded at 1/2..1/8 scale)
# Images with more pixels than this, as decoded (a JPEG after its 1/2..1/8 draft scale), are
# refused rather than decoded: the largest chest X-ray detectors give about 4300 x 4300 = 18.5 MP,
# training reads at most MAX_IMAGE_SIDE, and a small PNG of 12000 x 12000 16-bit pixels would
# otherwise take gigabytes to decode. Downscale such images first, or raise this.
MAX_IMAGE_PIXELS = 40_000_000


def _too_many_pixels(width, height):
    """None, or why an image of width x height pixels is refused (MAX_IMAGE_PIXELS)."""
    if width * height <= MAX_IMAGE_PIXELS:
        return None
    return (f"{width} x {height} pixels ({width * height / 1e6:.0f} MP) is more than "
            f"data.MAX_IMAGE_PIXELS ({MAX_IMAGE_PIXELS / 1e6:.0f} MP) and is not decoded; training "
            f"reads at most {MAX_IMAGE_SIDE} px a side: downscale the image first")


def _to_uint8(a):
    """16-bit / float / DICOM pixels -> 8-bit grey, min-max scaled (12-bit data stored in 16 bits
    would otherwise come out nearly black)."""
    a = np.asarray(a, dtype=np.float32)
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6)
    return Image.fromarray((a * 255).round().astype(np.uint8), "L")


def load_image(path, max_side=None):
    """Open an image as 8-bit grayscale (mode "L"): 8/16-bit PNG (16-bit min-max scaled to 0..255),
    JPEG, DICOM (needs pydicom). An image whose longer side exceeds max_side (default
    MAX_IMAGE_SIDE; 0 = never) is downscaled here, once, not by every epoch's transform.
    Raises FileNotFoundError (missing), OSError (a folder, FIFO, device) or ValueError
    (unreadable, truncated), naming the path."""
    path = Path(path)
    require_file(path, "image")
    max_side = MAX_IMAGE_SIDE if max_side is None else max_side
    try:
        if _is_dicom(path):  # DICOM: appendix A
            img = _read_dicom(path)
        else:
            with Image.open(path) as f:  # reads the header only: the size is known, nothing decoded
                if max_side:
                    f.draft("L", (max_side, max_side))  # JPEG only: decode at a reduced scale
                too_many = _too_many_pixels(*f.size)
                if too_many:
                    raise InputError(too_many)
                f.load()  # decode now, so that a truncated file fails here and not later
                img = _to_uint8(f) if f.mode in ("I", "I;16", "I;16B", "I;16L", "F") else f.convert("L")
    except MissingPackageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image {path}: {e}") from e
    if max_side and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return img


# -----------------------------------------------------------------------------
# 4. The word-level tokenizer
# Lower-case words, numbers and punctuation; its vocabulary is built from the training reports.
# -----------------------------------------------------------------------------
# Tokenizer is for the BERT-lite trained from scratch; WordPieceTokenizer (appendix B) is
# BERT's, for text_arch "bert". Both share _TokenizerBase: tok(texts) -> (input_ids,
# attention_mask), encode, decode, vocab_size, pad/cls/sep/unk ids, unk_rate, truncated_share;
# each adds tokenize, to_dict and from_dict. tokenizer_from_dict restores either from a
# checkpoint.

# ids 0..4. [MASK] is never used (no masked-language objective here); it keeps its id so that the
# word ids, and so the initial embedding rows of every word, stay those of earlier vocabularies.
SPECIAL_TOKENS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
_TOKEN = re.compile(r"[a-z]+|\d+(?:\.\d+)?|_+|[^\sa-z\d_]")  # words | numbers (3.5) | ___ | one symbol


def truncated_share(texts, max_len, tokenize=None, keep_empty=False):
    """Fraction of the texts with more than max_len - 2 tokens ([CLS], [SEP]): cut short. tokenize
    defaults to Tokenizer.tokenize. Empty texts are left out, or with keep_empty=True counted as
    fitting. NaN when no text counts."""
    tokenize = tokenize or Tokenizer.tokenize
    lengths = [len(tokenize(t)) + 2 for t in texts if keep_empty or t.strip()]
    return sum(n > max_len for n in lengths) / len(lengths) if lengths else float("nan")


class _TokenizerBase:
    """What both tokenizers share. A subclass's __init__ calls this one and then sets pad_id,
    cls_id, sep_id and unk_id; it defines tokenize(text) -> tokens, to_dict() and from_dict(d)."""

    def __init__(self, vocab, max_len):
        if max_len < 3:
            raise ValueError(f"max_len must be >= 3 ([CLS] token [SEP]), got {max_len}")
        self.vocab, self.max_len = list(vocab), int(max_len)
        self.token_to_id = {t: i for i, t in enumerate(self.vocab)}  # repeated: the last wins

    @property
    def vocab_size(self):
        return len(self.vocab)

    def _ids(self, text):
        """The text's token ids, not yet truncated; a token not in the vocabulary -> unk_id."""
        return [self.token_to_id.get(t, self.unk_id) for t in self.tokenize(text)]

    def encode(self, text):
        """[CLS] token ids [SEP], truncated to max_len."""
        return [self.cls_id] + self._ids(text)[:self.max_len - 2] + [self.sep_id]

    def decode(self, ids):
        """Tokens joined by spaces, without [PAD] [CLS] [SEP]."""
        skip = (self.pad_id, self.cls_id, self.sep_id)
        return " ".join(self.vocab[int(i)] for i in ids if int(i) not in skip)

    def __call__(self, texts):
        """list of B texts -> input_ids (B, max_len), attention_mask (B, max_len), both long;
        encode() already truncated each text to max_len with [CLS] first and [SEP] last."""
        if isinstance(texts, str):
            raise TypeError(f"{type(self).__name__} expects a list of texts, got one string")
        input_ids = torch.full((len(texts), self.max_len), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), self.max_len), dtype=torch.long)
        for b, text in enumerate(texts):
            ids = self.encode(text)
            input_ids[b, :len(ids)] = torch.tensor(ids)
            attention_mask[b, :len(ids)] = 1  # 1 = real token, 0 = padding
        return input_ids, attention_mask

    def unk_rate(self, texts):
        """Fraction of tokens (before truncation) that become [UNK]."""
        ids = [i for text in texts for i in self._ids(text)]
        return sum(i == self.unk_id for i in ids) / max(len(ids), 1)

    def truncated_share(self, texts):
        """Fraction of texts whose tokens, with [CLS] and [SEP], do not fit in max_len (an empty
        text fits)."""
        return truncated_share(texts, self.max_len, self.tokenize, keep_empty=True)


class Tokenizer(_TokenizerBase):
    """Word-level tokenizer. encode() gives [CLS] tokens [SEP], truncated to max_len; __call__
    pads a batch with [PAD] to max_len. Saved as JSON inside checkpoints and restored exactly."""

    def __init__(self, vocab, max_len=64):
        if list(vocab[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS or len(set(vocab)) != len(vocab):
            raise InputError(f"vocab must start with {SPECIAL_TOKENS} and have no duplicates")
        super().__init__(vocab, max_len)
        self.pad_id, self.cls_id, self.sep_id, self.unk_id = range(4)

    @classmethod
    def build(cls, texts, min_freq=2, max_len=64):
        """Vocabulary = tokens seen >= min_freq times, most frequent first (ties alphabetical)."""
        counts = collections.Counter(tok for text in texts for tok in cls.tokenize(text))
        words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        return cls(SPECIAL_TOKENS + words, max_len)

    @staticmethod
    def tokenize(text):
        return _TOKEN.findall(text.lower())

    def to_dict(self):
        return {"kind": "word", "vocab": self.vocab, "max_len": self.max_len}

    @classmethod
    def from_dict(cls, d):
        if d.get("kind", "word") != "word":  # dicts written before "kind" existed are word-level
            raise ValueError(f"a {d['kind']!r} tokenizer dict: restore it with data.tokenizer_from_dict")
        return cls(d["vocab"], d["max_len"])


def tokenizer_from_dict(d):
    """Either tokenizer (WordPieceTokenizer: appendix B) from its to_dict(); a dict without
    "kind" is a word-level one."""
    kinds = {"word": Tokenizer, "wordpiece": WordPieceTokenizer}
    kind = d.get("kind", "word")
    if kind not in kinds:
        raise InputError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(kinds)}")
    return kinds[kind].from_dict(d)


# -----------------------------------------------------------------------------
# 5. Image transforms
# The GLoRIA/MGCA recipe scaled to image_size: 224 <- 256 becomes S <- S*256/224.
# -----------------------------------------------------------------------------

class ImageTransform:
    """PIL image -> normalised float32 tensor (1, S, S).
    Longer side -> round(S*256/224), zero-pad to square; train: small rotation, random resized
    square crop (area fraction in `scale`), brightness/contrast jitter; eval: centre crop.
    No horizontal flip: it swaps left and right, and the reports say which side."""
    scale, rotate, brightness, contrast = (0.8, 1.0), 5.0, 0.1, 0.1   # train-time augmentation
    mean = std = 0.5                                                   # x -> (x - 0.5) / 0.5

    def __init__(self, image_size, train):
        self.image_size, self.train = image_size, train
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
# 6. PairDataset
# (image, report tokens, pair id, labels) from one split of a manifest.
# -----------------------------------------------------------------------------

class PairDataset(torch.utils.data.Dataset):
    """One split of a manifest. Item i -> (image (1,H,W) float32, input_ids (L,) long,
    attention_mask (L,) long, pair_id () long, labels (len(label_names),) float32 with NaN = blank).

    pair_id is the index of the row's study_id among the sorted study_ids of the WHOLE manifest,
    so images of one study share it. Augmentation for item i draws from
    default_rng([seed, epoch, i]): identical with any num_workers. Call set_epoch(e) each epoch
    (with persistent DataLoader workers, recreate the loader for it to take effect).

    check_images=True checks every image of the split once at construction (find_bad_images), so
    a truncated file is reported before training starts rather than at the step that first draws
    it. Every bad row (scan_manifest's, and this split's unreadable images) is reported at once
    in one BadRowsError; skip_bad=True drops them instead, counted on stderr, and keeps them
    (BadRow each) in self.skipped: data.write_skipped(path, dataset.skipped) lists them."""

    def __init__(self, manifest_path, split, tokenizer, transform, seed=0, label_names=LABELS,
                 cache_images=False, skip_bad=False, check_images=True):
        self.manifest_path = Path(manifest_path)
        all_rows, bad = scan_manifest(self.manifest_path)
        pair_of = {s: i for i, s in enumerate(sorted({r["study_id"] for r in all_rows}))}
        self.rows = [r for r in all_rows if r["split"] == split]
        unreadable = [BadRow(r["_row"], r["image"], "unreadable image",
                             f"{self.manifest_path}, row {r['_row']}: {r['_path']}: {problem}")
                      for r, problem in (find_bad_images(self.manifest_path, self.rows)
                                         if check_images else [])]
        if (bad or unreadable) and not skip_bad:
            raise BadRowsError(self.manifest_path, bad + unreadable, len(all_rows) + len(bad))
        self.skipped = []
        note_skipped("read_manifest", self.manifest_path, bad, self.skipped)
        note_skipped("PairDataset", self.manifest_path, unreadable, self.skipped,
                     f" of split {split!r}")
        if not self.rows:
            raise InputError(f"{self.manifest_path}: no rows with split {split!r} "
                             f"(splits present: {sorted({r['split'] for r in all_rows})})")
        dropped = {b.row for b in unreadable}
        self.rows = [r for r in self.rows if r["_row"] not in dropped]
        if not self.rows:
            raise InputError(f"{self.manifest_path}: every image of split {split!r} is unreadable")
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


# =============================================================================
# Part II: appendices (machinery the core calls, and the tools that make manifests)
# =============================================================================

# -----------------------------------------------------------------------------
# A. Files, image checks and DICOM
# Read this when a file is refused or you bring DICOM files. Every file data.py reads is first
# checked to be a regular file and every file it writes goes through atomic_write; then the
# whole-file image check before training and the image hashes of the split check (both cached
# beside the manifest), and DICOM reading.
# -----------------------------------------------------------------------------

NOT_FOUND = "not found"


def file_stamp(path):
    """([size, mtime_ns], None) when path is an existing regular file (links followed), else
    (None, what it is instead): NOT_FOUND, "is a folder, not a file", "is not a regular file (a
    FIFO, socket or device)" (reading a FIFO would wait forever), or why it cannot be looked at."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, NOT_FOUND
    except OSError as e:
        return None, f"cannot be looked at ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        return None, "is a folder, not a file"
    if not stat.S_ISREG(st.st_mode):
        return None, "is not a regular file (a FIFO, socket or device)"
    return [st.st_size, st.st_mtime_ns], None


def file_problem(path):
    """None when path is an existing regular file, else what it is instead (file_stamp)."""
    return file_stamp(path)[1]


def require_file(path, what, hint=""):
    """FileNotFoundError for a path that does not exist, OSError for a folder, FIFO or device."""
    problem = file_problem(path)
    if problem == NOT_FOUND:
        raise FileNotFoundError(f"{what} not found: {path}{hint}")
    if problem:
        raise OSError(f"{what} {path} {problem}")


def check_not_input(out, inputs, option="--out"):
    """InputError when the existing file `out` is one of `inputs` ((what, path) pairs), compared
    by device and inode (a link or another spelling of the path is caught too)."""
    try:
        key = os.stat(out)
    except OSError:  # nothing there yet: it cannot be an input
        return
    for what, path in inputs:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == (key.st_dev, key.st_ino):
                raise InputError(f"{option} {out} is {what}, an input: it is never written over; "
                                 f"choose another {option}")


def read_utf8(path, what, advice, source=None):
    """The text of the file `what` (require_file; gzipped when it ends in .gz). Not UTF-8 (a
    byte-order mark is fine) -> ManifestError naming source (default the path), the byte and the
    line, then `advice`."""
    require_file(path, what)
    with (gzip.open if Path(path).suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ManifestError(f"{source or path}: not UTF-8 text (byte {e.start}, line {line}: "
                            f"{e.reason}); {advice}") from None


def parse_json(text, source):
    """JSON text -> Python, strictly: invalid JSON, a key given twice in one object (json.loads
    would keep the last silently) or too deep nesting is an InputError naming `source`."""
    def no_repeated_keys(pairs):
        counts = collections.Counter(k for k, _ in pairs)
        repeated = [k for k, n in counts.items() if n > 1]
        if repeated:
            raise InputError(f"{source}: key {repeated[0]!r} appears {counts[repeated[0]]} times in "
                             f"one object; keep one")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=no_repeated_keys)
    except json.JSONDecodeError as e:
        raise InputError(f"{source}: not valid JSON ({e})") from None
    except RecursionError:
        raise InputError(f"{source}: JSON nested too deeply to read") from None


def read_json(path, source=None, what="JSON file"):
    """Every JSON file the project reads, by read_utf8 and parse_json; errors name `source`
    (default: the path)."""
    return parse_json(read_utf8(path, what, "save it as UTF-8", source), source or path)


@contextlib.contextmanager
def atomic_write(path):
    """`with atomic_write(path) as tmp:` write tmp (a hidden file beside path); os.replace then
    puts it at path, so a reader sees the old file or the new one, never half of one: the one way
    every file of the project is written. On a failure tmp is removed and path untouched; an
    OSError or RuntimeError (torch.save reports a full disk so) becomes one OSError naming path
    and the free space there (errno kept)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and not isinstance(e, RecursionError)):
            reason = (e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split()))
            error = OSError(f"cannot write {path} ({free_space(path.parent)}): "
                            f"{reason or type(e).__name__}; the file there before, if any, is untouched")
            error.errno = getattr(e, "errno", None)
            raise error from e
        raise


def free_space(folder):
    """'1,234 MB free there', from shutil.disk_usage of the folder (or its nearest parent)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return f"{shutil.disk_usage(folder).free / 2 ** 20:,.0f} MB free there"
    except OSError:
        return "free space unknown"


def write_text(path, text):
    """A text file (UTF-8) written whole or not at all."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path):
    """The SHA-256 of a file's bytes (hex), read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_cache(path, key):
    """The {image path: [size, mtime_ns, ...]} dict under `key` of a cache file, or {}."""
    try:
        found = read_json(path)
    except (OSError, ValueError):
        return {}
    found = found.get(key) if isinstance(found, dict) else None
    return found if isinstance(found, dict) else {}


def _write_cache(path, key, entries):
    """Write a cache file; an unwritable folder, or another file at that path (left alone), only
    costs a note."""
    if os.path.lexists(path) and not _read_cache(path, key):
        print(f"note: {path} is not a cache this project wrote; it is left alone and the work it "
              f"would save is redone next run", file=sys.stderr)
        return
    try:
        write_text(path, json.dumps({key: entries}))
    except OSError as e:
        print(f"note: {e}; the work it saves is redone next run", file=sys.stderr)


def _is_dicom(path):
    """By suffix, or for an unknown suffix by the DICOM magic (RSNA and PACS exports vary)."""
    if path.suffix.lower() in (".dcm", ".dicom", ".png", ".jpg", ".jpeg"):
        return path.suffix.lower() in (".dcm", ".dicom")
    with open(path, "rb") as f:  # DICOM part 10: a 128-byte preamble, then b"DICM"
        f.seek(128)
        return f.read(4) == b"DICM"


def _pydicom(path):
    """The optional pydicom module, or an ImportError naming the file and the way out."""
    try:
        import pydicom
    except ImportError:
        raise MissingPackageError(f"{path}: reading DICOM needs the optional package pydicom "
                                  "(pip install pydicom), or convert the images to PNG first") from None
    return pydicom


def _dicom_too_many_pixels(ds):
    """_too_many_pixels for a DICOM header (pixel_array decodes every frame)."""
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    return _too_many_pixels(int(getattr(ds, "Columns", 0)), int(getattr(ds, "Rows", 0)) * frames)


def _read_dicom(path):
    """DICOM through the optional pydicom; MONOCHROME1 (air bright) is inverted to MONOCHROME2."""
    pydicom = _pydicom(path)
    try:
        ds = pydicom.dcmread(str(path))
        a = np.asarray(ds.pixel_array)  # compressed transfer syntaxes may need pylibjpeg / gdcm
    except Exception as e:  # pydicom's errors do not derive from OSError / ValueError
        raise InputError(f"cannot read DICOM {path}: {e}") from e
    too_many = _dicom_too_many_pixels(ds)
    if too_many:
        raise InputError(too_many)
    if a.ndim == 3:  # colour (rows, cols, 3) or multi-frame (frames, rows, cols)
        a = a.mean(-1) if a.shape[-1] in (3, 4) else a[0]
    img = _to_uint8(a)
    if str(getattr(ds, "PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        img = ImageOps.invert(img)
    return img


def check_image(path):
    """A fast check that an image file is whole, without decoding its pixels -> None, or what is
    wrong: the header must parse, a PNG's chunks and checksums be intact (PIL's verify), a JPEG
    end with its end-of-image marker, no image exceed MAX_IMAGE_PIXELS."""
    path = Path(path)
    try:
        if _is_dicom(path):
            header = _pydicom(path).dcmread(str(path), stop_before_pixels=True)
            return _dicom_too_many_pixels(header)
        with Image.open(path) as f:
            kind = f.format
            f.draft("L", (MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))  # the size load_image would decode
            too_many = _too_many_pixels(*f.size)
            if too_many:
                return too_many
            f.verify()
        if kind == "JPEG":
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 4096))
                if b"\xff\xd9" not in f.read():
                    return "truncated JPEG (no end-of-image marker)"
    except ImportError:
        raise
    except Exception as e:  # PIL and pydicom raise many types for a broken file
        return f"{type(e).__name__}: {e}"
    return None


def find_bad_images(manifest_path, rows):
    """check_image for every row -> [(row, problem)] of the bad ones, all at once. The images
    found whole are remembered in <manifest stem>.image_check.json beside the manifest (with their
    size and modification time), so the check is paid once per image, not once per run."""
    cache_path = Path(manifest_path).with_name(f"{Path(manifest_path).stem}.image_check.json")
    checked, bad, new = _read_cache(cache_path, "ok"), [], 0
    for row in tqdm(rows, desc="checking images", disable=None, leave=False):
        stamp, problem = file_stamp(row["_path"])  # a FIFO is never opened: it would wait forever
        if stamp and checked.get(row["_path"]) != stamp:
            problem = check_image(row["_path"])
            if not problem:
                checked[row["_path"]], new = stamp, new + 1
        if problem:
            bad.append((row, problem))
    if new:
        _write_cache(cache_path, "ok", checked)
    return bad


def image_sha256(manifest_path, rows):
    """SHA-256 of each row's image file -> {image path: hex digest}; a file that cannot be read
    is left out (read_manifest reports it). Remembered in <manifest stem>.image_sha256.json beside
    the manifest, keyed by path with size and modification time, so each file is read once."""
    cache_path = Path(manifest_path).with_name(f"{Path(manifest_path).stem}.image_sha256.json")
    known, digests, new = _read_cache(cache_path, "sha256"), {}, 0
    for path in sorted({image_path(r) for r in rows}):
        stamp, entry = file_stamp(path)[0], known.get(path)
        if stamp is None:
            continue
        if not (isinstance(entry, list) and len(entry) == 3 and entry[:2] == stamp):
            try:
                entry = known[path] = [*stamp, sha256_file(path)]
            except OSError:
                continue
            new += 1
        digests[path] = entry[2]
    if new:
        _write_cache(cache_path, "sha256", known)
    return digests


# -----------------------------------------------------------------------------
# B. WordPiece, BERT's tokenizer
# Read this when you start from a published BERT checkpoint (text_arch "bert"); the word-level
# Tokenizer of section 4 needs none of it.
# -----------------------------------------------------------------------------
# BERT's WordPiece, written from its description (Devlin et al. 2019; Google's tokenization.py,
# which HF's BertTokenizer follows): text cleaning, then "basic" tokenization (lower-casing and
# accent stripping for uncased models, CJK characters as words, whitespace and punctuation
# splits), then greedy longest-match-first word pieces with "##" continuations.

def _is_whitespace(ch):
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch):
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch):
    """Unicode punctuation (P*), and every ASCII symbol that is not a letter, digit or space
    ($ + < = > ^ ` | ~ are symbols in Unicode, but BERT splits on them too)."""
    cp = ord(ch)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
        unicodedata.category(ch).startswith("P")


_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_cjk(ch):
    """CJK Unified Ideographs (and extensions, compatibility ideographs); not Hangul or kana."""
    return any(lo <= ord(ch) <= hi for lo, hi in _CJK_RANGES)


class WordPieceTokenizer(_TokenizerBase):
    """BERT's tokenizer for a published checkpoint: `from_pretrained(folder, max_len)` reads its
    vocab.txt (id = line number) and its lower-casing setting; otherwise like Tokenizer.
    strip_accents: None = strip when lower-casing (BERT's rule), or True / False. A word longer
    than 100 characters, or one no vocabulary pieces cover, becomes one [UNK]."""

    MAX_WORD_CHARS = 100

    def __init__(self, vocab, max_len=64, do_lower_case=True, strip_accents=None,
                 tokenize_chinese_chars=True):
        super().__init__(vocab, max_len)  # a repeated line of vocab.txt: the last wins
        missing = [t for t in ("[PAD]", "[CLS]", "[SEP]", "[UNK]") if t not in self.token_to_id]
        if missing:
            raise InputError(f"the WordPiece vocabulary has no {missing} token")
        self.pad_id, self.cls_id, self.sep_id, self.unk_id = (
            self.token_to_id[t] for t in ("[PAD]", "[CLS]", "[SEP]", "[UNK]"))
        specials = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in self.token_to_id]
        self._special = re.compile("(" + "|".join(re.escape(t) for t in specials) + ")")
        self.do_lower_case = bool(do_lower_case)
        self.strip_accents = None if strip_accents is None else bool(strip_accents)
        self.tokenize_chinese_chars = bool(tokenize_chinese_chars)

    @classmethod
    def from_pretrained(cls, folder, max_len=64):
        """vocab.txt of a BERT-family checkpoint folder. do_lower_case / strip_accents come from
        its tokenizer_config.json, else its config.json, else HF's default (lower-case). Note:
        emilyalsentzer/Bio_ClinicalBERT ships no tokenizer_config.json, so it is lower-cased here
        exactly as by `AutoTokenizer.from_pretrained` (although its vocabulary is cased)."""
        folder = Path(folder)
        vocab_file = folder / "vocab.txt"
        if not vocab_file.is_file():
            raise FileNotFoundError(f"no vocab.txt in {folder} (a BERT checkpoint folder needs "
                                    f"config.json, vocab.txt and model.safetensors or pytorch_model.bin)")
        # one piece per "\n"-ended line, trailing whitespace dropped (a Windows "\r" too), as
        # HF's fast BertTokenizer reads it; a piece never ends in whitespace
        with open(vocab_file, encoding="utf-8", newline="\n") as f:
            vocab = [line.rstrip() for line in f]
        settings, source = {}, "the default of HF's BertTokenizer"
        for name in ("tokenizer_config.json", "config.json"):
            path = folder / name
            if path.is_file():
                found = read_json(path)
                if not isinstance(found, dict):
                    raise InputError(f"{path}: expected a JSON object, found {type(found).__name__}")
                keys = ("do_lower_case", "strip_accents", "tokenize_chinese_chars")
                if any(k in found for k in keys):
                    settings, source = {k: found[k] for k in keys if k in found}, str(path)
                    break
        try:
            tok = cls(vocab, max_len, **settings)
        except ValueError as e:
            raise InputError(f"{vocab_file}: {e}") from None
        print(f"tokenizer: WordPiece, {tok.vocab_size} pieces from {vocab_file}; "
              f"do_lower_case={tok.do_lower_case} (from {source})")
        return tok

    def basic_tokenize(self, text):
        """Words and punctuation marks, as BERT's BasicTokenizer splits them."""
        text = "".join(" " if _is_whitespace(ch) else ch for ch in text
                       if not (ch in "\x00\ufffd" or _is_control(ch)))   # clean
        if self.tokenize_chinese_chars:
            text = "".join(f" {ch} " if _is_cjk(ch) else ch for ch in text)
        text = unicodedata.normalize("NFC", text)
        strip = self.do_lower_case if self.strip_accents is None else self.strip_accents
        words = []
        for word in text.split():
            if self.do_lower_case:
                word = word.lower()
            if strip:  # "é" -> "e" + U+0301, then drop the combining mark (category Mn)
                word = "".join(c for c in unicodedata.normalize("NFD", word)
                               if unicodedata.category(c) != "Mn")
            start = 0  # split off every punctuation character as a word of its own
            for i, ch in enumerate(word):
                if _is_punctuation(ch):
                    words += [word[start:i], ch]
                    start = i + 1
            words.append(word[start:])
        return [w for w in words if w]

    def wordpiece(self, word):
        """Greedy longest-match-first: "effusions" -> ["effusion", "##s"]; no cover -> [UNK]."""
        if len(word) > self.MAX_WORD_CHARS:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.token_to_id:
                    break
            else:  # not even one character matched: the whole word is unknown
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text):
        pieces = []
        for i, part in enumerate(self._special.split(text)):
            if i % 2:  # "[MASK]", "[SEP]", ... written in the text are those tokens, as in HF's
                pieces.append(part)
            else:
                pieces += [p for word in self.basic_tokenize(part) for p in self.wordpiece(word)]
        return pieces

    def decode(self, ids):
        """Pieces joined back into words ("##" glued on), without [PAD] [CLS] [SEP]."""
        return super().decode(ids).replace(" ##", "")

    def to_dict(self):
        return {"kind": "wordpiece", "vocab": self.vocab, "max_len": self.max_len,
                "do_lower_case": self.do_lower_case, "strip_accents": self.strip_accents,
                "tokenize_chinese_chars": self.tokenize_chinese_chars}

    @classmethod
    def from_dict(cls, d):
        return cls(d["vocab"], d["max_len"], d["do_lower_case"], d["strip_accents"],
                   d["tokenize_chinese_chars"])


# -----------------------------------------------------------------------------
# C. SynthCXR: procedurally drawn PA chest radiographs with reports and labels
# Read this when you want to know what the synthetic images and reports hold; training only
# calls ensure_synthetic, and reads the result like any other manifest.
# -----------------------------------------------------------------------------
# Conventions: coordinates are fractions of the image, x to the right, y down, so (0, 0) is the
# top-left corner and (1, 1) the bottom-right. The patient faces us, so the patient's RIGHT is on
# the IMAGE LEFT. Brightness = attenuation: air and lung dark, soft tissue, fluid and bone bright.
# A finding's side and severity come from one parameter dict that both the renderer and the
# report writer read, so the picture and the words cannot disagree.

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
    """One patient's body: fixed across that patient's studies. Lengths are fractions of the
    image; a horizontal length is measured from the midline outwards (the same on both sides)."""
    u = rng.uniform  # the draws happen in this order; reordering them changes every image
    return dict(top=u(0.12, 0.17),              # y of the lung apices
                base=u(0.70, 0.75),             # y where the right hemidiaphragm meets the chest wall
                left_drop=u(0.015, 0.04),       # the left hemidiaphragm sits this much lower
                lung_centre=u(0.175, 0.2),      # midline -> centre of each lung field
                lung_half_width=u(0.115, 0.135),
                dome=u(0.035, 0.06),            # how far each dome rises above its `base`
                body_margin=u(0.05, 0.09),      # soft tissue beyond the lateral chest wall
                ctr=u(*CTR["normal"]),          # cardiothoracic ratio without cardiomegaly
                heart_half_height=u(0.10, 0.12),
                lung_brightness=u(0.12, 0.2),   # aerated lung (dark)
                soft_tissue=u(0.55, 0.68),      # soft-tissue brightness; fluid and opacities approach it
                rib_gap=u(0.06, 0.075), rib_phase=u(0, 1),  # rib spacing; where the first rib falls
                vessel_angles=u(-1.9, 1.9, size=(2, 9)))   # (right, left) x 9 branch angles, radians


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
    coarse = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32))
    return np.asarray(coarse.resize((size, size), Image.BICUBIC))


def _line(x, y, points, width):
    """Soft polyline through `points` (x, y pairs): exp(-(distance / width)^2), vectorised."""
    out = np.zeros_like(x)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy + 1e-12), 0, 1)
        out = np.maximum(out, np.exp(-((x - x0 - t * dx) ** 2 + (y - y0 - t * dy) ** 2) / width ** 2))
    return out


def _lung_field(x, y, sign, anatomy, base, gap=0.0):
    """One lung field -> (approximate signed distance to its border, > 0 inside; d = distance
    from the midline outwards), both (size, size); sign = SIDE[side]. A rounded apex over walls
    that widen towards the base; the bottom is the hemidiaphragm, a dome rising anatomy["dome"]
    above y = base, so the costophrenic angle is sharp. gap > 0 pulls the apex and the lateral
    edge in (the collapsed lung of a pneumothorax)."""
    d = sign * (x - 0.5)
    lung_centre, lung_half_width = anatomy["lung_centre"], anatomy["lung_half_width"]
    top, centre, half_width = anatomy["top"] + gap, lung_centre - 0.3 * gap, lung_half_width - 0.3 * gap
    t = np.clip((y - top) / (base - top), 0, 1)  # 0 at the apex, 1 at the base
    across = np.abs(d - centre) / (half_width * (0.9 + 0.2 * t))  # 1 on the wall
    y_round = top + 0.45 * (base - top)
    down = np.clip((y_round - y) / (y_round - top), 0, None)  # only the upper part is rounded
    wall = (1 - (across ** 2.5 + down ** 2.5) ** 0.4) * half_width
    lateral = (d - lung_centre + 0.2 * lung_half_width) / (1.2 * lung_half_width)  # 0 under the dome's top
    dome = base - anatomy["dome"] * (1 - lateral ** 2)  # the dome is not pulled in by the gap
    return np.minimum(wall, dome - y), d


def _vessels(angles, sign, anatomy, base, size):
    """Vessel texture of one lung (float32 (size, size), 0..1): tapering wavy branches radiating
    from the hilum at `angles` (radians, 0 = outwards, > 0 = down), one side branch each, fading
    towards the periphery. PIL draws the lines (fast)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    hilum_d = anatomy["lung_centre"] - 0.6 * anatomy["lung_half_width"]  # from the midline
    hilum_y = anatomy["top"] + 0.5 * (base - anatomy["top"])
    for k, phi in enumerate(angles):
        for phi0, r0, length in ((phi, 0.0, 0.22), (phi + (0.45 if k % 2 else -0.45), 0.08, 0.12)):
            d0 = hilum_d + r0 * math.cos(phi)  # a side branch starts on its parent, r0 from the hilum
            y0 = hilum_y + r0 * math.sin(phi)
            pts = []  # 7 (x, y) points along the branch, in pixels
            for j in range(7):
                r = length * j / 6
                wavy = phi0 + 0.12 * math.sin(30 * r + k)
                pts.append(((0.5 + sign * (d0 + r * math.cos(wavy))) * size,
                            (y0 + r * math.sin(wavy)) * size))
            for part, fade in ((pts[:4], 1.0), (pts[3:], 0.5)):  # thick, bright near the hilum
                draw.line(part, fill=int(255 * fade * math.exp(-r0 / 0.14)),
                          width=max(1, round(size * 0.016 * fade * (1 - r0 / 0.3))), joint="curve")
    canvas = canvas.filter(ImageFilter.GaussianBlur(0.5 * size / 128))
    return np.asarray(canvas, dtype=np.float32) / 255


# The finding drawers. Each takes `geom` (the pixel grid and the lungs; built and described in
# render_study), the finding's `params` and its own random stream, and returns a (size, size)
# map >= 0: an opacity (render_study clips their sum), the fluid mask (_effusion, 0..1) or the
# metal (_devices, 0..1).

def _consolidation(geom, params, rng):
    """Ill-defined patchy opacity centred in each involved lobe."""
    anatomy, noise, out = geom.anatomy, _smooth_noise(rng, geom.size, 14), 0
    centre, half_width = anatomy["lung_centre"], anatomy["lung_half_width"]
    for lobe in params["lobes"]:
        side, (across, down) = lobe.split()[0], LOBES[lobe]
        r0 = rng.uniform(0.045, 0.075)
        blob = np.exp(-((geom.from_midline[side] - centre - across * half_width) ** 2
                        + ((geom.y - anatomy["top"] - down * geom.lung_height[side]) / 1.3) ** 2) / r0 ** 2)
        out = out + np.clip(blob * (0.9 + 0.5 * noise) - 0.15, 0, 0.8) * geom.lung_mask[side]
    return out


def _edema(geom, params, rng):
    """Bilateral perihilar haze fading outwards; Kerley B lines at the lateral bases (moderate+)."""
    anatomy, out = geom.anatomy, 0
    centre, half_width = anatomy["lung_centre"], anatomy["lung_half_width"]
    severity = SEVERITY["edema"].index(params["severity"])  # 0 mild, 1 moderate, 2 severe
    for side, sign in SIDE.items():
        hilum = ((geom.from_midline[side] - centre + 0.45 * half_width) / 0.11,
                 (geom.y - anatomy["top"] - 0.55 * geom.lung_height[side]) / 0.16)
        out = out + (0.3 + 0.15 * severity) * np.exp(-hilum[0] ** 2 - hilum[1] ** 2) * geom.lung_mask[side]
        wall = centre + 1.05 * half_width  # the lateral chest wall at the base
        for _ in range(2 * severity + (1 if severity else 0)):
            y_line = geom.base[side] - rng.uniform(0.03, 0.14)
            pts = [(0.5 + sign * (wall - 0.004), y_line), (0.5 + sign * (wall - 0.035), y_line)]
            out = out + 0.7 * _line(geom.x, geom.y, pts, 0.004) * geom.lung_mask[side]
    return out


def _atelectasis(geom, params, rng):
    """Thin plate-like bands just above the dome (moderate also raises it: see render_study)."""
    anatomy, out = geom.anatomy, 0
    severity = SEVERITY["atelectasis"].index(params["severity"])  # 0 minimal, 1 mild, 2 moderate
    for side in _sides(params["side"]):
        for _ in range(severity + 1):
            y_band = geom.base[side] - anatomy["dome"] - rng.uniform(0.015, 0.06)
            d0 = anatomy["lung_centre"] + rng.uniform(-0.35, 0.35) * anatomy["lung_half_width"]
            half_length, tilt = rng.uniform(0.04, 0.07), rng.uniform(-0.15, 0.15)
            pts = [(0.5 + SIDE[side] * (d0 + e * half_length), y_band + e * tilt * half_length)
                   for e in (-1, 1)]  # the band's two ends
            out = out + 0.8 * _line(geom.x, geom.y, pts, 0.007 + 0.0025 * severity) * geom.lung_mask[side]
    return out


def _nodule(geom, params, rng):
    """A round well-defined opacity in the given lobe."""
    anatomy = geom.anatomy
    side, (across, down) = params["lobe"].split()[0], LOBES[params["lobe"]]
    nodule_d = anatomy["lung_centre"] + across * anatomy["lung_half_width"] + rng.uniform(-0.03, 0.03)
    nodule_y = anatomy["top"] + down * geom.lung_height[side] + rng.uniform(-0.03, 0.03)
    r = params["mm"] / 700  # the image is about 35 cm wide; radius = diameter / 2
    dist = np.sqrt((geom.from_midline[side] - nodule_d) ** 2 + (geom.y - nodule_y) ** 2)
    return 0.75 * geom.soft_edge(r - dist) * geom.lung_mask[side]


def _effusion(geom, params, rng):
    """Fluid mask: from the base up to a meniscus that climbs the lateral wall (concave up), so
    a small effusion only fills, i.e. blunts, the costophrenic angle."""
    centre, half_width, fluid = geom.anatomy["lung_centre"], geom.anatomy["lung_half_width"], 0
    for side in _sides(params["side"]):
        lateral = np.clip((geom.from_midline[side] - centre + half_width) / (2.2 * half_width), 0, 1)
        # lateral: 0 medial, 1 lateral; level: y of the fluid's surface, higher at the wall
        level = geom.base[side] - (params["height"] * rng.uniform(0.9, 1.1) * geom.lung_height[side]
                                   * (0.55 + 0.45 * lateral ** 2))
        below = np.clip(0.5 + (geom.y - level) / (2 * geom.eps), 0, 1)
        fluid = np.maximum(fluid, geom.lung_mask[side] * below)
    return fluid


def _devices(geom, params, midline_x, heart_bottom):
    """Radiopaque tubes, lines and a pacemaker (1 = metal)."""
    x, y, top, out = geom.x, geom.y, geom.anatomy["top"], 0
    mx, diaphragm = midline_x, geom.base["left"]
    paths = {  # (x, y) points of each device, tip last
        "ett": [(mx, 0.0), (mx, top + 0.16 - params["ett_cm"] / 35)],  # tip this far above the carina
        "ngt": [(mx - 0.005, 0.0), (mx + 0.01, diaphragm), (mx + 0.12, diaphragm + 0.07)],  # into the stomach
        "cvc": [(mx - 0.09, 0.02), (mx - 0.05, top + 0.1), (mx - 0.025, top + 0.24)],  # right IJ -> SVC
        "pacemaker": [(mx + 0.2, top), (mx + 0.03, top + 0.25), (mx + 0.05, heart_bottom)]}
    for item in params["items"]:
        out = np.maximum(out, _line(x, y, paths[item], 0.006 if item == "ett" else 0.004))
        if item == "pacemaker":  # generator box below the left clavicle
            box = np.minimum(0.04 - np.abs(x - mx - 0.23), 0.028 - np.abs(y - top + 0.01))
            out = np.maximum(out, geom.soft_edge(box))
    return out


OPACITIES = {"consolidation": _consolidation, "edema": _edema, "atelectasis": _atelectasis, "nodule": _nodule}


def render_study(anatomy_seed, findings, size=128, study_seed=0):
    """Draw one PA radiograph -> uint8 array (size, size). anatomy_seed fixes the body,
    study_seed the pose, noise and the finding-specific randomness; `findings` is
    {name: params} as from sample_findings / _finding_params. Each finding draws from its own
    random stream, so adding one finding leaves every other pixel source unchanged."""
    anatomy = sample_anatomy(np.random.default_rng([anatomy_seed, 0]))
    study_rng = np.random.default_rng([anatomy_seed, study_seed, 1])
    finding_rng = {name: np.random.default_rng([anatomy_seed, study_seed, 2 + k])
                   for k, name in enumerate(FINDINGS)}  # one stream per finding
    # anatomical coordinates: fractions of the image, x to the right, y down (pose comes last)
    t = (np.arange(size, dtype=np.float32) + 0.5) / size  # pixel centres
    y, x = np.meshgrid(t, t, indexing="ij")  # (size, size) each: y[row, col], x[row, col]
    eps = 1.2 / size  # edge softness: about one pixel
    # geom: what the finding drawers need. x, y: the grid of pixel centres; soft_edge: signed
    # distance (> 0 inside) -> 0..1 over about a pixel; per side ("right", "left"): base = y where
    # the hemidiaphragm meets the chest wall, lung_height = apex to base,
    # from_midline = distance from the midline outwards, lung_mask = 1 inside the lung field.
    geom = types.SimpleNamespace(x=x, y=y, anatomy=anatomy, size=size, eps=eps,
                                 soft_edge=lambda dist: np.clip(0.5 + dist / eps, 0, 1))

    # 1. hemidiaphragms (lobar volume loss raises one), lung fields, vessels, pneumothorax, ribs
    geom.base = {"right": anatomy["base"], "left": anatomy["base"] + anatomy["left_drop"]}
    if "atelectasis" in findings and findings["atelectasis"]["severity"] == "moderate":
        for side in _sides(findings["atelectasis"]["side"]):
            geom.base[side] -= 0.025
    geom.lung_height = {side: geom.base[side] - anatomy["top"] for side in SIDE}
    dist, geom.from_midline = {}, {}  # dist: signed distance to the lung border, > 0 inside
    for side in SIDE:
        dist[side], geom.from_midline[side] = _lung_field(x, y, SIDE[side], anatomy, geom.base[side])
    geom.lung_mask = {side: geom.soft_edge(dist[side]) for side in SIDE}
    lung = np.maximum(geom.lung_mask["right"], geom.lung_mask["left"])
    parenchyma = anatomy["lung_brightness"] + 0.02 * _smooth_noise(study_rng, size, 12)
    for k, side in enumerate(SIDE):
        vessels = _vessels(anatomy["vessel_angles"][k], SIDE[side], anatomy, geom.base[side], size)
        if "pneumothorax" in findings and findings["pneumothorax"]["side"] == side:
            gap = findings["pneumothorax"]["gap"]
            inner = _lung_field(x, y, SIDE[side], anatomy, geom.base[side], gap=gap)[0]
            # air beyond the pleural line: dark, no vessels; the line itself where lung and wall have parted
            outside = geom.lung_mask[side] * (1 - geom.soft_edge(inner))
            vessels = vessels * (1 - outside)
            line = np.exp(-(inner / (0.7 * eps)) ** 2) * geom.soft_edge(dist[side] - 2 * eps)
            parenchyma = parenchyma - outside * 0.5 * anatomy["lung_brightness"] + 0.25 * line
        parenchyma = parenchyma + 0.2 * vessels * geom.lung_mask[side]
    # posterior ribs: periodic curved bands; rib_cycle counts rib spacings from the top
    rib_cycle = (y + 0.6 * (np.abs(x - 0.5) - 0.15) ** 2) / anatomy["rib_gap"] - anatomy["rib_phase"]
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * rib_cycle)) ** 8

    # 2. body soft tissue, spine, clavicles; then the dark lungs; then opacities inside them
    half = anatomy["lung_centre"] + 1.1 * anatomy["lung_half_width"] + anatomy["body_margin"]  # of the body
    body = np.clip(0.5 + (1 - np.abs((x - 0.5) / half) ** 4 - np.abs((y - 0.75) / 0.8) ** 4) / 0.15, 0, 1)
    midline_x = 0.5  # mediastinal midline; a large pneumothorax pushes it to the other side
    if "pneumothorax" in findings and findings["pneumothorax"]["severity"] == "large":
        midline_x -= 0.025 * SIDE[findings["pneumothorax"]["side"]]
    spine = np.exp(-((x - midline_x) / 0.028) ** 4) * (1 + 0.3 * np.cos(2 * np.pi * y / 0.045))
    img = body * (anatomy["soft_tissue"] * (0.85 + 0.15 * (1 - ((x - 0.5) / half) ** 2)) + 0.1 * spine)
    for sign in (-1, 1):  # clavicles, rising laterally
        clavicle = [(0.5 + sign * 0.04, anatomy["top"] + 0.01), (0.5 + sign * 0.3, anatomy["top"] - 0.05)]
        img += 0.12 * _line(x, y, clavicle, 0.012)
    img = img * (1 - lung) + (parenchyma + 0.08 * ribs) * lung
    opacity = sum(draw(geom, findings[name], finding_rng[name]) for name, draw in OPACITIES.items()
                  if name in findings)
    img += np.clip(opacity, 0, 0.9) * (0.95 * anatomy["soft_tissue"] - img)  # towards soft-tissue brightness

    # 3. heart (CTR = heart width / thoracic width; a third right of the midline, two thirds left),
    #    mediastinum, aortic knob, trachea
    ctr = findings["cardiomegaly"]["ctr"] if "cardiomegaly" in findings else anatomy["ctr"]
    heart_width = ctr * 2 * (anatomy["lung_centre"] + 1.1 * anatomy["lung_half_width"])
    heart_half_height = anatomy["heart_half_height"] * (1 + 0.5 * (ctr - 0.44))  # a big heart is also taller
    heart_x = midline_x + heart_width / 6
    heart_y = geom.base["left"] - anatomy["dome"] - 0.15 * heart_half_height  # widest near the dome
    heart = geom.soft_edge((1 - np.sqrt(((x - heart_x) / (heart_width / 2)) ** 2
                                        + ((y - heart_y) / heart_half_height) ** 2)) * heart_half_height)
    mediastinum_half_width = anatomy["lung_centre"] - anatomy["lung_half_width"] + 0.01
    mediastinum = geom.soft_edge(mediastinum_half_width - np.abs(x - midline_x)) * (y < heart_y)
    knob = geom.soft_edge(0.025 - np.sqrt((x - midline_x - mediastinum_half_width) ** 2
                                          + (y - anatomy["top"] - 0.12) ** 2))
    heart = np.maximum(heart, np.maximum(mediastinum, knob))
    trachea = np.exp(-((x - midline_x) / 0.011) ** 2) * (y < anatomy["top"] + 0.16)
    img = img * (1 - heart) + heart * (0.95 * anatomy["soft_tissue"] + 0.1 * spine - 0.25 * trachea)

    # 4. pleural fluid over everything but the devices; devices last
    if "effusion" in findings:
        fluid = _effusion(geom, findings["effusion"], finding_rng["effusion"])
        img = img * (1 - fluid) + fluid * 0.92 * anatomy["soft_tissue"]
    if "devices" in findings:
        heart_bottom = heart_y + 0.6 * heart_half_height
        img += 0.8 * _devices(geom, findings["devices"], midline_x, heart_bottom) * (1 - img)

    # 5. pose (rotation, scale, shift about the centre), exposure (gamma), quantum noise
    angle, scale = math.radians(study_rng.uniform(-3, 3)), study_rng.uniform(0.93, 1.04)
    shift_x, shift_y = (float(v) * size for v in study_rng.uniform(-0.025, 0.025, size=2))  # pixels
    centre, cos, sin = size / 2, math.cos(angle) / scale, math.sin(angle) / scale  # inverse rotation-scale
    affine = (cos, sin, centre - cos * (centre + shift_x) - sin * (centre + shift_y),  # output pixel ->
              -sin, cos, centre + sin * (centre + shift_x) - cos * (centre + shift_y))  # input pixel
    img = np.asarray(Image.fromarray(np.clip(img, 0, 1).astype(np.float32)).transform(
        (size, size), Image.AFFINE, affine, resample=Image.BILINEAR, fillcolor=0))
    img = img ** study_rng.uniform(0.8, 1.25)
    img = img + study_rng.uniform(0.01, 0.025) * study_rng.standard_normal(img.shape, dtype=np.float32)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


# Sentence banks. Each entry is (template, labels it asserts); the {slots} are filled by _words
# from the finding's parameters. Entry 0 of "pos" is the canonical certain phrasing used for the
# 5xN set.
# CheXpert convention: positive mention 1, hedged ("possible", "cannot be excluded") -1, negated 0.
BANK = {
    "cardiomegaly": {
        "pos": [("{severity} cardiomegaly.", {"Cardiomegaly": 1}),
                ("The heart is {severity_adverb} enlarged.", {"Cardiomegaly": 1}),
                ("{severity} enlargement of the cardiac silhouette.", {"Cardiomegaly": 1})],
        "hedge": [("Borderline heart size, possibly mild cardiomegaly.", {"Cardiomegaly": -1}),
                  ("The heart is top normal in size; cardiomegaly cannot be excluded.", {"Cardiomegaly": -1})],
        "neg": [("Heart size is normal.", {"Cardiomegaly": 0}), ("Normal heart size.", {"Cardiomegaly": 0}),
                ("No cardiomegaly.", {"Cardiomegaly": 0})]},
    "effusion": {
        "pos": [("{severity} {side} pleural effusion{plural_s}.", {"Pleural Effusion": 1}),
                ("There {is_a} {severity} {side} pleural effusion{plural_s}.", {"Pleural Effusion": 1}),
                ("{severity} {side} pleural effusion{plural_s} with blunting of the costophrenic "
                 "angle{plural_s}.", {"Pleural Effusion": 1})],
        "hedge": [("Possible {severity} {side} pleural effusion{plural_s}.", {"Pleural Effusion": -1}),
                  ("{severity} {side} pleural effusion{plural_s} cannot be excluded.",
                   {"Pleural Effusion": -1})],
        "neg": [("No pleural effusion.", {"Pleural Effusion": 0}),
                ("There is no pleural effusion.", {"Pleural Effusion": 0})]},
    "pneumothorax": {
        "pos": [("{severity} {side} apical pneumothorax.", {"Pneumothorax": 1}),
                ("There is a {severity} {side} pneumothorax.", {"Pneumothorax": 1}),
                ("{side}-sided pneumothorax, {severity} in size.", {"Pneumothorax": 1})],
        "hedge": [("Possible {severity} {side} apical pneumothorax.", {"Pneumothorax": -1}),
                  ("A {severity} {side} pneumothorax cannot be excluded.", {"Pneumothorax": -1})],
        "neg": [("No pneumothorax.", {"Pneumothorax": 0}), ("There is no pneumothorax.", {"Pneumothorax": 0})]},
    "consolidation": {
        "pos": [("Consolidation in the {location}.", {"Consolidation": 1}),
                ("{location} pneumonia.", {"Pneumonia": 1}),
                ("Patchy opacity in the {location}.", {"Lung Opacity": 1}),
                ("Consolidation in the {location} consistent with pneumonia.",
                 {"Consolidation": 1, "Pneumonia": 1})],
        "hedge": [("Opacity in the {location}, possibly pneumonia.", {"Lung Opacity": 1, "Pneumonia": -1}),
                  ("Possible consolidation in the {location}.", {"Consolidation": -1}),
                  ("{location} opacity concerning for pneumonia.", {"Lung Opacity": 1, "Pneumonia": -1})],
        "neg": [("No focal consolidation.", {"Consolidation": 0}),
                ("No consolidation to suggest pneumonia.", {"Consolidation": 0, "Pneumonia": 0})]},
    "edema": {
        "pos": [("{severity} pulmonary edema.", {"Edema": 1}),
                ("{severity} interstitial edema with perihilar haziness{kerley_lines}.", {"Edema": 1}),
                ("Findings consistent with {severity} pulmonary edema.", {"Edema": 1})],
        "hedge": [("Possible {severity} pulmonary edema.", {"Edema": -1}),
                  ("Perihilar haziness may reflect {severity} pulmonary edema.", {"Edema": -1})],
        "neg": [("No pulmonary edema.", {"Edema": 0}), ("There is no pulmonary edema.", {"Edema": 0})]},
    "atelectasis": {
        "pos": [("{severity} {basilar} atelectasis.", {"Atelectasis": 1}),
                ("Plate-like atelectasis at the {lung_base}.", {"Atelectasis": 1}),
                ("{severity} {basilar} linear atelectasis.", {"Atelectasis": 1})],
        "hedge": [("{basilar} opacities may reflect atelectasis.", {"Lung Opacity": 1, "Atelectasis": -1}),
                  ("Possible {severity} {basilar} atelectasis.", {"Atelectasis": -1})],
        "neg": [("No atelectasis.", {"Atelectasis": 0})]},
    "nodule": {
        "pos": [("{mm} mm nodule in the {location}.", {"Lung Lesion": 1}),
                ("{mm} mm pulmonary nodule projecting over the {location}.", {"Lung Lesion": 1})],
        "hedge": [("Possible {mm} mm nodule in the {location}.", {"Lung Lesion": -1})],
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


def _words(params):
    """Template slot values for one finding, from its parameters (a slot a finding lacks is "")."""
    side, severity = params.get("side", ""), params.get("severity", "")
    bilateral = side == "bilateral"
    lobes = params.get("lobes", [])
    if len(lobes) > 1:
        location = f"{', '.join(lobes[:-1])} and {lobes[-1]} lobes"  # "right upper and left lower lobes"
    else:
        location = f"{(lobes or [params.get('lobe')])[0]} lobe"  # "right upper lobe"
    adverbs = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}
    return {"severity": severity,                             # "moderate"
            "severity_adverb": adverbs.get(severity, severity),  # "moderately" (enlarged)
            "side": side,                                     # "left", "right", "bilateral"
            "plural_s": "s" if bilateral else "",             # effusion{plural_s}
            "is_a": "are" if bilateral else "is a",           # there {is_a} ... effusion{plural_s}
            "location": location,
            "basilar": {"left": "left basilar", "right": "right basilar", "bilateral": "bibasilar"}.get(side, ""),
            "lung_base": {"left": "left lung base", "right": "right lung base",
                          "bilateral": "lung bases"}.get(side, ""),
            "kerley_lines": "" if severity == "mild" else " and Kerley B lines",
            "mm": params.get("mm"), "ett_cm": params.get("ett_cm")}


def _fill(entry, words):
    """(template, labels) -> (sentence with the slots filled and a capital first letter, labels)."""
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
    for name, params in findings.items():
        if name == "devices":
            found += [_fill(DEVICE_SENTENCES[item], _words(params)) for item in params["items"]]
            impression.append(DEVICES_IMPRESSION)
            continue
        # a borderline heart is always hedged; other findings sometimes (never in the 5xN set)
        if name == "cardiomegaly":
            hedged = params["severity"] == "borderline"
        else:
            hedged = not strict and rng.random() < 0.12
        bank, words = BANK[name]["hedge" if hedged else "pos"], _words(params)
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
    for rank, patient in enumerate(order):
        frac = rank / len(counts)
        split_of[int(patient)] = "train" if frac < 0.8 else "valid" if frac < 0.9 else "test"
    return [(patient, split_of[patient]) for patient, count in enumerate(counts) for _ in range(count)]


def _caption(findings):
    """Short human-readable summary of a findings spec, e.g. 'effusion small left; devices ett'."""
    parts = []
    for name, params in findings.items():
        bits = [str(params[k]) for k in ("severity", "side", "lobe") if k in params]
        bits += params.get("lobes", []) + params.get("items", [])
        parts.append(" ".join([name] + bits))
    return "; ".join(parts) or "normal"


# Bounds of a SynthCXR request, checked before anything is drawn or allocated. The estimate is
# (studies + SYNTH_RENDER_BYTES_PER_PIXEL) * size^2 bytes: every image's 8-bit pixels (the PNGs
# take at most about that on disk) plus the float32 planes of the one image being drawn (its
# peak is about 110 bytes a pixel, measured with tracemalloc at 128 and 256 px). The default set
# (4,500 images of 128 px) needs about 76 MB.
MAX_SYNTH_BYTES = 16 * 2**30
SYNTH_RENDER_BYTES_PER_PIXEL = 128
MIN_SYNTH_SIZE = 8
# What SynthCXR writes into its folder, and what reading it adds there: everything else makes a
# folder without meta.json someone else's (check_synthetic_folder).
SYNTH_OWN = {"images": re.compile(r"s\d+\.png"), "reports": re.compile(r"s\d+\.txt")}
SYNTH_OWN_FILES = re.compile(r"manifest\.csv|meta\.json|preview\.png|manifest\.[\w]+\.json"
                             r"|\.?[^/]+\.\d+\.tmp")  # the last: temporary files of a killed run
SYNTH_HEADER = ",".join([*REQUIRED_COLUMNS, "report", "findings", *LABELS])


def synth_bytes(n, size, n_per_class_5x):
    """The estimate of what SynthCXR with these settings takes (see MAX_SYNTH_BYTES)."""
    return (n + len(FIVE_CLASSES) * n_per_class_5x + SYNTH_RENDER_BYTES_PER_PIXEL) * size * size


def check_synth_settings(n, size, n_per_class_5x, max_bytes=None):
    """InputError unless n >= 1, size >= MIN_SYNTH_SIZE, n_per_class_5x >= 0 and synth_bytes <=
    max_bytes (default MAX_SYNTH_BYTES)."""
    for name, value, least, where in (("n", n, 1, "--n, config key synth_n"),
                                      ("size", size, MIN_SYNTH_SIZE, "--size, config key synth_size"),
                                      ("n_per_class_5x", n_per_class_5x, 0,
                                       "--n-5x, config key synth_per_class_5x")):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
            raise InputError(f"SynthCXR {name}={value!r}: expected a whole number of at least "
                             f"{least} ({where})")
    max_bytes = MAX_SYNTH_BYTES if max_bytes is None else max_bytes
    need = synth_bytes(n, size, n_per_class_5x)
    if need > max_bytes:
        raise InputError(f"SynthCXR n={n}, size={size}, n_per_class_5x={n_per_class_5x} would take "
                         f"about {need / 2**30:,.1f} GiB ({need:,} bytes: every image's pixels and "
                         f"the drawing of one), more than the limit of {max_bytes / 2**30:,.1f} GiB "
                         f"(data.MAX_SYNTH_BYTES): lower --size or --n, or raise the limit with "
                         f"data.py synth --max-bytes")


def synth_folder(out_dir):
    """The SynthCXR folder as a Path; "" (never the current folder) or a file is refused."""
    if not str(out_dir).strip():
        raise InputError("the SynthCXR folder is empty (\"\"): give a folder to write into (config "
                         "key synth_dir, or data.py synth --out); it is never the current folder")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"SynthCXR folder {out} is a file, not a folder: give a new or empty "
                              f"folder (config key synth_dir, or data.py synth --out)")
    return out


def generate_synthetic(out_dir, n=4000, size=128, seed=0, n_per_class_5x=100, progress=None,
                       max_bytes=None):
    """Write SynthCXR to out_dir: images/*.png, reports/*.txt, manifest.csv, meta.json (last, so
    an interrupted run is redone). Splits train/valid/test (by patient) of n studies plus
    test_5x: n_per_class_5x studies per FIVE_CLASSES class, each with exactly that one finding,
    certain phrasing, all other observations 0, on patients of their own. Same arguments ->
    byte-identical files. Bad settings (check_synth_settings) or a folder that is not ours
    (check_synthetic_folder) are refused before anything is drawn. Returns the manifest path."""
    out = synth_folder(out_dir)
    check_synth_settings(n, size, n_per_class_5x, max_bytes)
    meta = _synth_meta(n, size, seed, n_per_class_5x)
    check_synthetic_folder(out, meta)
    for sub in ("images", "reports"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    studies = _assign_splits(np.random.default_rng([seed, 0]), n)
    n_patients = studies[-1][0] + 1 if studies else 0
    for k in range(len(FIVE_CLASSES)):  # the zero-shot set: one study per new patient
        studies += [(n_patients + k * n_per_class_5x + j, "test_5x") for j in range(n_per_class_5x)]
    rows = []
    print(f"generating SynthCXR in {out}: {len(studies)} studies of {size} px (seed {seed})",
          file=sys.stderr)
    for i, (patient, split) in enumerate(tqdm(studies, desc="SynthCXR", unit="study", leave=False,
                                              disable=None if progress is None else not progress)):
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
        with atomic_write(out / "images" / f"{study_id}.png") as tmp:
            Image.fromarray(pixels).save(tmp, format="PNG")
        report, labels = write_report(findings, np.random.default_rng([seed, 2, i]),
                                      strict=split == "test_5x")
        write_text(out / "reports" / f"{study_id}.txt", report)
        if split == "test_5x":
            labels = {c: labels.get(c, 0) for c in LABELS if c != "No Finding"}
        rows.append({"image": f"images/{study_id}.png", "text": extract_report_text(report),
                     "split": split, "study_id": study_id, "patient_id": patient_id, "view": "PA",
                     "report": f"reports/{study_id}.txt", "findings": _caption(findings), **labels})
    write_manifest(out / "manifest.csv", rows)
    write_text(out / "meta.json", json.dumps(meta, sort_keys=True) + "\n")
    return out / "manifest.csv"


def _synth_meta(n, size, seed, n_per_class_5x):
    return {"version": SYNTH_VERSION, "n": n, "size": size, "seed": seed, "n_per_class_5x": n_per_class_5x}


def check_synthetic_folder(out, meta):
    """FileExistsError for a folder whose meta.json records other settings (or is unreadable):
    another run may be reading it, so it is never regenerated in place. A folder without
    meta.json is an unfinished generation, redone, when everything in it is SynthCXR's own
    (SYNTH_OWN, SYNTH_OWN_FILES, SynthCXR's manifest header); else a few other files are named."""
    meta_path = Path(out) / "meta.json"
    if not meta_path.is_file():
        foreign = _not_synthcxr(Path(out)) if Path(out).is_dir() else []
        if foreign:
            raise FileExistsError(f"{out} holds files SynthCXR did not write ({', '.join(foreign)}) "
                                  f"and no SynthCXR meta.json: SynthCXR writes only into a new or "
                                  f"empty folder, or one it made. Use another folder (config key "
                                  f"synth_dir, or data.py synth --out)")
        return
    try:
        found = read_json(meta_path)
    except (OSError, ValueError) as e:
        found = {"meta.json": f"unreadable ({e})"}
    found = found if isinstance(found, dict) else {"meta.json": repr(found)[:100]}
    differ = sorted(k for k in meta.keys() | found.keys() if found.get(k) != meta.get(k))
    if differ:
        made = ", ".join(f"{k}={found.get(k)}" for k in differ)
        asked = ", ".join(f"{k}={meta.get(k)}" for k in differ)
        raise FileExistsError(f"{out} holds a SynthCXR set made with {made}; this run "
                              f"asks for {asked}. It is not regenerated in place "
                              f"(another run may be training on it): use another folder (config "
                              f"key synth_dir, or data.py synth --out), or delete {out} to "
                              f"regenerate it there")


def _not_synthcxr(out, most=3):
    """Up to `most` entries of the folder out (relative names) that SynthCXR did not write."""
    found = []
    for entry in sorted(os.scandir(out), key=lambda e: e.name):
        if entry.name in SYNTH_OWN and entry.is_dir(follow_symlinks=False):
            own = SYNTH_OWN[entry.name]
            found += [f"{entry.name}/{e.name}" for e in sorted(os.scandir(entry.path), key=lambda e: e.name)
                      if not e.is_file(follow_symlinks=False)
                      or not (own.fullmatch(e.name) or SYNTH_OWN_FILES.fullmatch(e.name))]
        elif entry.name == "manifest.csv":
            if file_problem(entry.path) or _first_line(entry.path) != SYNTH_HEADER:
                found.append(entry.name)
        elif not (SYNTH_OWN_FILES.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)):
            found.append(entry.name)
        if len(found) >= most:
            break
    return found[:most]


def _first_line(path, limit=4096):
    """The first line of a text file, without its line end (at most `limit` bytes read)."""
    with open(path, "rb") as f:
        return f.readline(limit).decode("utf-8-sig", errors="replace").rstrip("\r\n")


def ensure_synthetic(out_dir, n=4000, size=128, seed=0, n_per_class_5x=100, progress=None,
                     max_bytes=None):
    """generate_synthetic unless out_dir/meta.json already records the same arguments; a set
    made with other arguments is refused (check_synthetic_folder), never regenerated."""
    out = synth_folder(out_dir)
    if (out / "meta.json").is_file():
        check_synthetic_folder(out, _synth_meta(n, size, seed, n_per_class_5x))
        return out / "manifest.csv"
    return generate_synthetic(out, n, size, seed, n_per_class_5x, progress, max_bytes)


def wrap_caption(caption, font, width):
    """A caption -> lines no wider than `width` pixels in `font`, every word kept (one wider than
    a line gets its own)."""
    lines = []
    for word in caption.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def preview(data_dir, out=None, n=30, cols=6, tile=160):
    """Contact sheet of the first train images and the first test_5x image of each class, each
    captioned with its findings (another manifest: its label or text), to check that pictures
    and words match. `out` (default data_dir/preview.png) is never the manifest or an image."""
    manifest = Path(data_dir) / "manifest.csv"
    rows = read_manifest(manifest)
    caption_of = lambda r: r.get("findings") or r.get("label") or r["text"]  # noqa: E731
    shown = [r for r in rows if r["split"] == "train"][:n - cols]
    shown += list({caption_of(r).split()[0] if caption_of(r).split() else "": r
                   for r in reversed(rows) if r["split"] == "test_5x"}.values())
    if not shown:
        raise InputError(f"{manifest}: no 'train' or 'test_5x' rows to show")
    out = Path(out) if out else Path(data_dir) / "preview.png"
    check_not_input(out, [("the manifest", manifest)]
                    + [(f"the image of row {r['_row']}", r["_path"]) for r in rows], "preview --out")
    font = ImageFont.load_default()
    captions = ["\n".join(wrap_caption(f"[{r['split']}] {caption_of(r)}", font, tile - 6)) for r in shown]
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    cap_h = 6 + max((measure.multiline_textbbox((0, 0), c, font=font)[3] for c in captions), default=0)
    sheet = Image.new("L", (cols * tile, math.ceil(len(shown) / cols) * (tile + cap_h)), 255)
    draw = ImageDraw.Draw(sheet)
    for k, (row, caption) in enumerate(zip(shown, captions)):
        x0, y0 = (k % cols) * tile, (k // cols) * (tile + cap_h)
        sheet.paste(load_image(row["_path"]).resize((tile - 4, tile - 4), Image.BILINEAR), (x0 + 2, y0 + 2))
        draw.multiline_text((x0 + 3, y0 + tile), caption, fill=0, font=font)
    with atomic_write(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out


# -----------------------------------------------------------------------------
# D. Real datasets and image folders: prepare
# Read this when you bring a dataset of your own; training never calls it directly.
# MIMIC-CXR, CheXpert, RSNA, IU X-Ray, ROCO, a folder of your own images or a metadata table of
# your own -> the manifest.
# -----------------------------------------------------------------------------
# One small function per public release turns its files into manifest rows and counts what it
# skipped and why; `prepare` then (optionally) writes resized PNG copies, the manifest and a
# summary. Training and evaluation never special-case a dataset. Each preparer's docstring
# gives the release's file layout; docs/data.md, "What prepare does, per dataset", explains the
# choices.

TRUNCATION_LENGTHS = (48, 64, 96, 128)  # max_len of configs/tiny, the default, small, mimic
FRONTAL = ("PA", "AP")
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones", "chexpert")
# GLoRIA / MGCA per-label map for uncertain (-1) CheXpert labels; other labels are masked.
CHEXPERT_UNCERTAIN = {"Atelectasis": "1", "Edema": "1", "Pleural Effusion": "1",
                      "Cardiomegaly": "0", "Consolidation": "0"}


def _expect(root, dataset, *names):
    """The first of root/names that exists, else an error naming what a DATASET root holds."""
    for name in names:
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(f"{root} does not look like a {dataset} folder: expected "
                            f"{' or '.join(repr(n) for n in names)} in it (not found)")


def _read_csv(path, columns=()):
    """Rows of a CSV (plain or gzipped) as dicts; errors name the file and the missing column."""
    text = read_utf8(path, "CSV", "save it as UTF-8 CSV")
    header, records = read_csv_records(path, io.StringIO(text, newline=""))
    missing = [c for c in columns if c not in header]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {missing}; found {header}")
    return [record_dict(path, i, line, header, fields) for i, (line, fields) in enumerate(records, 1)]


def _labels(src, uncertain=None):
    """Manifest label values of one source row, or None if any value is unreadable.
    uncertain=None keeps the release's 1 / 0 / -1 / blank. Any policy maps blank (= not
    mentioned) to 0 and -1 to: '' (ignore: masked), 0 (zeros), 1 (ones) or CHEXPERT_UNCERTAIN
    (chexpert: GLoRIA/MGCA's map for its five labels, the other labels masked)."""
    out = {}
    for name in LABELS:
        v = LABEL_VALUES.get((src.get(name) or "").strip())
        if v is None:
            return None
        if uncertain and v == "":
            v = "0"
        elif uncertain and v == "-1":
            v = (CHEXPERT_UNCERTAIN.get(name, "") if uncertain == "chexpert"
                 else {"ignore": "", "zeros": "0", "ones": "1"}[uncertain])
        out[name] = v
    return out


def _row(image, text, split, study_id, patient_id, view, labels=None):
    return {"image": str(image), "text": text, "split": split, "study_id": str(study_id),
            "patient_id": str(patient_id), "view": view, **(labels or {})}


# A de-identified span with whatever is glued to it ("4XXXX", "XXXXPM", "x-XXXX", "___-year-old").
_DEID_WORD = re.compile(r"[\w-]*(?:_{2,}|X{2,})[\w-]*")


def _deid(text, remove):
    """MIMIC writes de-identified spans as '___', OpenI as 'XXXX': keep them, or remove each with
    the word it is glued to (no '4', 'PM' or 'x-' left behind) and no space before punctuation."""
    if not remove:
        return text
    text = " ".join(_DEID_WORD.sub(" ", text).split())
    return re.sub(r" ([.,;:!?)\]])", r"\1", text)


def check_split_fractions(valid_frac, test_frac):
    """--valid-frac / --test-frac: each at least 0, together below 1 (a ValueError otherwise)."""
    if not (0 <= valid_frac and 0 <= test_frac and valid_frac + test_frac < 1):
        raise InputError(f"--valid-frac {valid_frac} and --test-frac {test_frac}: each at least 0 "
                         f"and together below 1, so that some patients are left for 'train'")


def _split_patients(patients, valid_frac, test_frac, seed):
    """Patient -> 'train' / 'valid' / 'test', disjoint by patient, reproducible by seed."""
    check_split_fractions(valid_frac, test_frac)
    ids = sorted(set(patients))
    ids = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    n_test, n_valid = round(test_frac * len(ids)), round(valid_frac * len(ids))
    return {p: "test" if i < n_test else "valid" if i < n_test + n_valid else "train"
            for i, p in enumerate(ids)}


def _five_by_n(rows, n, seed):
    """The 5xN rule: exactly one of FIVE_CLASSES is 1 and all 12 other observations (not
    No Finding) are exactly 0; n images per class drawn with a seed, as split 'test_5x'."""
    others = [name for name in LABELS if name != "No Finding"]
    pools = {c: [] for c in FIVE_CLASSES}
    for r in rows:
        r = {**r, **{name: r.get(name) or "0" for name in LABELS}}   # blank -> 0; -1 stays -1
        positive = [name for name in others if r[name] == "1"]
        if (len(positive) == 1 and positive[0] in pools
                and all(r[name] == "0" for name in others if name != positive[0])):
            pools[positive[0]].append(r)
    rng, chosen = np.random.default_rng(seed), []
    for c in FIVE_CLASSES:
        pool = sorted(pools[c], key=lambda r: r["image"])
        if len(pool) < n:
            print(f"warning: only {len(pool)} images qualify for {c} (asked {n}): taking all",
                  file=sys.stderr)
        picked = np.sort(rng.choice(len(pool), size=min(n, len(pool)), replace=False))
        chosen += [{**pool[i], "split": "test_5x"} for i in picked]
    return chosen


def prepare_mimic_cxr(root, reports=None, all_views=False, one_per_study="valid,test",
                      deid="keep", uncertain=None, five_x=0, seed=0):
    """MIMIC-CXR-JPG 2.0.0 + the MIMIC-CXR reports. root: mimic-cxr-2.0.0-{split,metadata,
    chexpert}.csv[.gz] and files/pXX/pSSSSSSSS/sTTTTTTTT/<dicom_id>.jpg; reports (default root):
    files/pXX/pSSSSSSSS/sTTTTTTTT.txt. PA/AP views only (all_views=False); text = findings +
    impression, '___' kept or removed (deid); labels per study from the CheXpert CSV (blank when
    absent); official splits, 'validate' -> 'valid'; in the splits of one_per_study one image
    per study (PA before AP, then dicom_id); five_x > 0 adds a 5 x five_x set from 'test'."""
    files = [_expect(root, "MIMIC-CXR-JPG", f"mimic-cxr-2.0.0-{k}.csv.gz", f"mimic-cxr-2.0.0-{k}.csv")
             for k in ("split", "metadata", "chexpert")]   # as downloaded (gzipped) or unpacked
    reports = Path(reports) if reports else root
    view_of = {r["dicom_id"]: r["ViewPosition"].strip().upper()
               for r in _read_csv(files[1], ("dicom_id", "ViewPosition"))}
    labels_of = {r["study_id"]: r for r in _read_csv(files[2], ("study_id", *LABELS))}
    texts, rows, skipped = {}, [], collections.Counter()
    for r in tqdm(_read_csv(files[0], ("dicom_id", "study_id", "subject_id", "split")),
                  desc="mimic-cxr", disable=None):
        subject, study, view = r["subject_id"], r["study_id"], view_of.get(r["dicom_id"], "")
        labels = _labels(labels_of[study], uncertain) if study in labels_of else {}
        rel = Path("files", f"p{subject[:2]}", f"p{subject}", f"s{study}")
        if view not in FRONTAL and not all_views:
            skipped["lateral view" if "LAT" in view or view in ("LL", "RL") else "other view"] += 1
        elif labels is None:
            skipped["unreadable label"] += 1
        elif study not in texts and not (reports / rel.with_suffix(".txt")).is_file():
            skipped["missing report"] += 1
        else:
            if study not in texts:
                report = (reports / rel.with_suffix(".txt")).read_text(encoding="utf-8")
                texts[study] = _deid(extract_report_text(report), deid == "remove")
            image = root / rel / f"{r['dicom_id']}.jpg"
            if not texts[study]:
                skipped["no findings/impression"] += 1
            elif not image.is_file():
                skipped["missing image"] += 1
            else:
                split = {"validate": "valid"}.get(r["split"], r["split"])
                rows.append(_row(image, texts[study], split, study, subject, view or "UNKNOWN", labels))
    # one image per study where a report is a retrieval target (PA before AP, then file name)
    keep_one, best = {s.strip() for s in one_per_study.split(",")} - {""}, {}
    rank = {view: i for i, view in enumerate(FRONTAL)}
    for r in sorted(rows, key=lambda r: (rank.get(r["view"], 2), r["image"])):
        best.setdefault((r["split"], r["study_id"]), r)
    kept = [r for r in rows if r["split"] not in keep_one or best[(r["split"], r["study_id"])] is r]
    skipped["extra image of a study (one per study)"] += len(rows) - len(kept)
    if five_x:
        kept += _five_by_n([r for r in kept if r["split"] == "test"], five_x, seed)
    return kept, skipped


def _chexpert_rows(root, csv_name, uncertain, all_views, skipped):
    """Rows of CheXpert's train.csv / valid.csv; Path's first folder (CheXpert-v1.0[-small]) is
    replaced by root. Study = patientNNNNN/studyN, patient = patientNNNNN, empty text."""
    columns = ("Path", "Frontal/Lateral", "AP/PA", *LABELS)
    rows, patients = [], set()
    for r in tqdm(_read_csv(_expect(root, "CheXpert", csv_name), columns), desc=csv_name, disable=None):
        rel = Path(r["Path"])
        rel = rel if rel.parts[0] in ("train", "valid", "test") else Path(*rel.parts[1:])
        labels = _labels(r, uncertain)
        patients.add(rel.parts[1])
        if r["Frontal/Lateral"].strip() != "Frontal" and not all_views:
            skipped["lateral view"] += 1
        elif labels is None:
            skipped["unreadable label"] += 1
        elif not (root / rel).is_file():
            skipped["missing image"] += 1
        else:
            view = r["AP/PA"].strip().upper() or r["Frontal/Lateral"].strip().upper()
            rows.append(_row(root / rel, "", "", "/".join(rel.parts[1:3]), rel.parts[1], view, labels))
    return rows, patients


def prepare_chexpert(root, uncertain=None, valid_frac=0.05, seed=0, all_views=False, exclude=None):
    """CheXpert v1.0 (or -small), for linear probing: root holds train.csv, valid.csv, train/,
    valid/. Frontal only (all_views=False); uncertain (required): the -1 policy of _labels. The
    official valid.csv becomes 'test'; 'valid' is valid_frac of the train.csv patients. exclude:
    a file of patient ids (e.g. from chexpert-5x200) dropped from train/valid. CheXpert has no
    reports: `text` is left EMPTY (a caption made from the labels would leak them), a
    labels-only manifest for image-label evaluation."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise InputError(f"chexpert needs an explicit --uncertain policy: one of {UNCERTAIN_POLICIES}")
    skipped = collections.Counter()
    excluded = set(Path(exclude).read_text().split()) if exclude else set()
    train, patients = _chexpert_rows(root, "train.csv", uncertain, all_views, skipped)
    test, _ = _chexpert_rows(root, "valid.csv", uncertain, all_views, skipped)
    skipped["patient in the exclude list"] += sum(r["patient_id"] in excluded for r in train)
    train = [r for r in train if r["patient_id"] not in excluded]
    split_of = _split_patients(patients, valid_frac, 0.0, seed)  # over ALL listed patients: stable
    rows = [{**r, "split": split_of[r["patient_id"]]} for r in train]
    return rows + [{**r, "split": "test"} for r in test], skipped


def prepare_chexpert_5x200(root, per_class=200, seed=0):
    """CheXpert 5x200 (zero-shot set) from train.csv: frontal, the 5xN rule of _five_by_n,
    split 'test_5x', empty text. prepare also writes <out>_exclude_patients.txt: pass it to
    `prepare chexpert --exclude` so no 5x200 patient is ever trained on."""
    skipped = collections.Counter()
    rows, _ = _chexpert_rows(root, "train.csv", None, False, skipped)
    chosen = _five_by_n(rows, per_class, seed)
    skipped["not drawn for 5x200 (rule or sampling)"] += len(rows) - len(chosen)
    return chosen, skipped


# RSNA patient splits: (valid fraction, test fraction, whose). Of stage 2's 26684 patients,
# classification gives 4003 valid and 4003 test, detection 5337 and 5337, as theirs do.
RSNA_SPLITS = {"classification": (0.15, 0.15, "GLoRIA's and MGCA's classification split"),
               "detection": (0.2, 0.2, "MGCA's detection split")}


def prepare_rsna(root, split_protocol=None, valid_frac=None, test_frac=None, seed=0):
    """RSNA Pneumonia Detection (Kaggle stage 2): stage_2_train_labels.csv (patientId, Target;
    one row per box, one empty row for a negative) and stage_2_train_images/<patientId>.dcm (or
    .png / .jpg). One image per patient; 'Pneumonia' = 1 if any of its rows has Target 1, other
    labels blank. Patient splits: split_protocol (RSNA_SPLITS, default classification) or
    valid_frac / test_frac of your own, not both. DICOM needs the optional pydicom."""
    if valid_frac is None and test_frac is None:
        name = split_protocol or "classification"
        if name not in RSNA_SPLITS:
            raise InputError(f"--split-protocol {name!r}: one of {sorted(RSNA_SPLITS)}")
        valid_frac, test_frac, whose = RSNA_SPLITS[name]
        what = f"--split-protocol {name}, {whose}"
    elif split_protocol is not None:
        raise InputError(f"--split-protocol {split_protocol} fixes the fractions: give it or "
                         f"--valid-frac / --test-frac, not both")
    else:
        default_valid, default_test, _ = RSNA_SPLITS["classification"]
        valid_frac = default_valid if valid_frac is None else valid_frac
        test_frac = default_test if test_frac is None else test_frac
        check_split_fractions(valid_frac, test_frac)
        what = "your own fractions"
    images = _expect(root, "RSNA Pneumonia", "stage_2_train_images")
    target, skipped, rows = {}, collections.Counter(), []
    labels_csv = _expect(root, "RSNA Pneumonia", "stage_2_train_labels.csv")
    print(f"rsna: patients split {1 - valid_frac - test_frac:.0%} / {valid_frac:.0%} / "
          f"{test_frac:.0%} (train / valid / test), {what}")
    for r in _read_csv(labels_csv, ("patientId", "Target")):
        t, old = LABEL_VALUES.get(r["Target"].strip()), target.get(r["patientId"], "0")
        # positive if any of the patient's box rows is; one unreadable row spoils the patient
        target[r["patientId"]] = max(old, t) if t in ("0", "1") and old is not None else None
    split_of = _split_patients(target, valid_frac, test_frac, seed)  # over ALL listed patients
    for patient, t in tqdm(sorted(target.items()), desc="rsna", disable=None):
        image = next((images / f"{patient}{ext}" for ext in (".dcm", ".png", ".jpg")
                      if (images / f"{patient}{ext}").is_file()), None)
        if t is None:
            skipped["unreadable label"] += 1
        elif image is None:
            skipped["missing image"] += 1
        else:
            rows.append(_row(image, "", split_of[patient], patient, patient, "FRONTAL", {"Pneumonia": t}))
    return rows, skipped


def _image_folder(root, images, *candidates):
    """--images, else the first of candidates (folders under root) that exists, else root."""
    if images:
        return Path(images).absolute()
    return next((root / f for f in candidates if (root / f).is_dir()), root)


def prepare_iu_xray(root, images=None, valid_frac=0.1, test_frac=0.2, seed=0, deid="keep"):
    """IU X-Ray (OpenI), either release:
    - XML: ecgen-radiology/<uid>.xml with <AbstractText Label="FINDINGS|IMPRESSION"> and
      <parentImage id="CXR<uid>_IM-...">, images <id>.png in NLMCXR_png/ (or images/, or root).
      With indiana_projections.csv beside it only a frontal image is used (the literature's
      choice), otherwise the first listed image (view 'UNKNOWN', counted in the summary).
    - Kaggle: indiana_reports.csv (uid, findings, impression, ...) + indiana_projections.csv
      (uid, filename, projection), images in images/images_normalized/.
    One row per report (uid = study = patient: OpenI gives no patient ids); text = findings +
    impression; 'XXXX' kept or removed (deid); no labels; splits 70/10/20 by uid, seeded."""
    def key(uid, name):  # XML 'CXR1_1_IM-0001-3001', Kaggle '1_IM-0001-3001.dcm.png': same key
        return uid, (re.search(r"IM-[\d-]*\d", name) or [name])[0]

    projections = {}
    if (root / "indiana_projections.csv").is_file():
        for r in _read_csv(root / "indiana_projections.csv", ("uid", "filename", "projection")):
            projections[key(r["uid"], r["filename"])] = r["projection"].strip().upper()
    if (root / "ecgen-radiology").is_dir():
        folder = _image_folder(root, images, "NLMCXR_png", "images")
        reports = []
        for path in sorted((root / "ecgen-radiology").glob("*.xml"), key=lambda p: (len(p.stem), p.stem)):
            require_file(path, "IU X-Ray report")
            try:  # expat refuses entity bombs ("limit on input amplification factor") as well
                tree = ET.parse(path)
            except ET.ParseError as e:
                raise InputError(f"{path}: not well-formed XML ({e}); fix or remove this report "
                                 f"file") from None
            sections = {a.get("Label", "").upper(): " ".join(a.itertext()).strip()
                        for a in tree.iter("AbstractText")}   # itertext: markup elements too
            ids = [p.get("id") for p in tree.iter("parentImage")]
            reports.append((path.stem, sections.get("FINDINGS", ""), sections.get("IMPRESSION", ""),
                            [(folder / f"{i}.png", projections.get(key(path.stem, i), "UNKNOWN"))
                             for i in ids]))
    elif (root / "indiana_reports.csv").is_file():
        folder = _image_folder(root, images, "images/images_normalized", "images")
        by_uid = collections.defaultdict(list)
        _expect(root, "IU X-Ray (Kaggle)", "indiana_projections.csv")
        for r in _read_csv(root / "indiana_projections.csv", ("uid", "filename")):
            by_uid[r["uid"]].append((folder / r["filename"], projections[key(r["uid"], r["filename"])]))
        reports = [(r["uid"], r["findings"], r["impression"], by_uid[r["uid"]])
                   for r in _read_csv(root / "indiana_reports.csv", ("uid", "findings", "impression"))]
    else:
        raise FileNotFoundError(f"{root} does not look like an IU X-Ray folder: expected 'ecgen-radiology/' "
                                "(OpenI XML release) or 'indiana_reports.csv' (Kaggle CSV packaging) in it")
    split_of = _split_patients([uid for uid, *_ in reports], valid_frac, test_frac, seed)
    rows, skipped = [], collections.Counter()
    for uid, findings, impression, candidates in tqdm(reports, desc="iu-xray", disable=None):
        text = extract_report_text(f"FINDINGS: {findings.strip()}\nIMPRESSION: {impression.strip()}")
        # with view information only a frontal image is taken; without it, the first listed one
        usable = [(p, v) for p, v in candidates if v == "FRONTAL"] if projections else candidates
        if not text:
            skipped["no findings/impression"] += 1
        elif not candidates:
            skipped["no image listed"] += 1
        elif not usable:
            unknown = any(v == "UNKNOWN" for _, v in candidates)
            skipped["no frontal view (view unknown: not in indiana_projections.csv)" if unknown
                    else "lateral view"] += 1
        elif not any(p.is_file() for p, _ in usable):
            skipped["missing image"] += 1
        else:
            image, view = next((p, v) for p, v in usable if p.is_file())
            rows.append(_row(image, _deid(text, deid == "remove"), split_of[uid], uid, uid, view))
    return rows, skipped


def prepare_roco(root):
    """ROCO: data/{train,validation,test}/radiology/captions.txt, one 'ROCO_xxxxx<TAB> caption'
    line per image (the leading space is stripped), images in the same folder's images/
    ROCO_xxxxx.jpg. All modalities; official splits ('validation' -> 'valid'); no labels."""
    rows, skipped = [], collections.Counter()
    for folder, split in (("train", "train"), ("validation", "valid"), ("test", "test")):
        captions = _expect(root, "ROCO", f"data/{folder}/radiology/captions.txt")
        lines = captions.read_text(encoding="utf-8").splitlines()
        for line in tqdm(lines, desc=f"roco {folder}", disable=None):
            if not line.strip():
                continue
            roco_id, _, caption = line.partition("\t")
            image = captions.parent / "images" / f"{roco_id.strip()}.jpg"
            if not caption.strip():
                skipped["empty caption"] += 1
            elif not image.is_file():
                skipped["missing image"] += 1
            else:
                rows.append(_row(image, extract_report_text(caption, sections=False), split,
                                 roco_id.strip(), roco_id.strip(), ""))
    return rows, skipped


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".dcm")
SPLIT_FOLDERS = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid",
                 "test": "test"}


def prepare_image_folder(root, valid_frac=0.1, test_frac=0.2, seed=0):
    """Your own images, one sub-folder per class, in either layout:
        root/<class>/<image>           splits drawn per class: valid_frac / test_frac, seeded
        root/<split>/<class>/<image>   split folders train, valid (or val, validation), test
    and optionally a caption <image stem>.txt beside an image: its text. The class name goes to
    a column `label`. Each image is its own study and patient (a folder has no patient ids: use
    split folders to keep one person's images in one split). Without any caption the manifest
    is labels-only; with captions, an image without one is skipped and counted."""
    def subfolders(folder):
        return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))

    folders = subfolders(root)
    split_folders = [d for d in folders if d.name.lower() in SPLIT_FOLDERS]
    if split_folders and len(split_folders) != len(folders):
        raise InputError(f"{root}: mixes split folders {[d.name for d in split_folders]} with other "
                         f"folders {[d.name for d in folders if d not in split_folders]}; use "
                         f"either <class>/ or <split>/<class>/ folders")
    layout = ([(SPLIT_FOLDERS[d.name.lower()], c) for d in split_folders for c in subfolders(d)]
              if split_folders else [(None, d) for d in folders])
    if not layout:
        raise FileNotFoundError(f"{root} does not look like an image folder: expected one "
                                f"sub-folder per class (<class>/<image>, or <split>/<class>/<image>)")
    skipped, items = collections.Counter(), []
    for split, class_dir in layout:
        files = sorted(f for f in class_dir.iterdir() if not f.name.startswith("."))
        images = [f for f in files if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        stems = {f.stem for f in images}
        for f in files:
            if f.is_dir():
                skipped["folder inside a class folder (not read)"] += 1
            elif f.suffix.lower() == ".txt" and f.stem not in stems:
                skipped["caption without an image"] += 1
            elif f.suffix.lower() not in IMAGE_SUFFIXES + (".txt",):
                skipped["not an image file"] += 1
        for image in images:
            caption, text = image.with_suffix(".txt"), ""
            if caption.is_file():
                text = read_utf8(caption, "caption", "save the caption as UTF-8")
                text = extract_report_text(text, sections=False)
            items.append((split, class_dir.name, image, text))
    if any(text for *_, text in items):
        skipped["no caption"] += sum(not text for *_, text in items)
        items = [item for item in items if item[3]]
    rows = []
    for name in sorted({c for _, c, _, _ in items}):
        ids = [image.relative_to(root).with_suffix("").as_posix()
               for split, c, image, _ in items if c == name]
        split_of = _split_patients(ids, valid_frac, test_frac, seed)   # per class: every class in every split
        for (split, c, image, text), uid in zip([i for i in items if i[1] == name], ids):
            rows.append({**_row(image, text, split or split_of[uid], uid, uid, ""), "label": c})
    return rows, skipped


def metadata_path(root, metadata=None):
    """prepare csv's metadata table: --metadata, else ROOT/metadata.csv."""
    return Path(metadata).absolute() if metadata else root / "metadata.csv"


def prepare_csv(root, metadata=None, images=None, image_column="image", text_column="text",
                patient_column="patient_id", study_column=None, label_column=None,
                view_column=None, keep=(), valid_frac=0.1, test_frac=0.2, seed=0, skip_bad=False,
                bad_rows=None):
    """A metadata table of your own: a UTF-8 CSV (default root/metadata.csv), one row per image,
    whose columns give the image file (relative to `images`, default root), its text, its
    patient, and optionally its study (default: each row its own), a class name (written as
    `label`; a row without one is kept as an image-text pair) and the view. keep: "COLUMN=VALUE"
    filters (a column given twice allows either value). Splits by patient, seeded. Every bad row
    is found in one pass and raises one BadRowsError; skip_bad skips and counts them and appends
    them to bad_rows (prepare lists them in <out stem>_skipped.csv)."""
    check_split_fractions(valid_frac, test_frac)
    metadata, folder = metadata_path(root, metadata), Path(images).absolute() if images else root
    text = read_utf8(metadata, "metadata CSV", "save the metadata table as UTF-8 CSV")
    header, records = read_csv_records(metadata, io.StringIO(text, newline=""))
    filters = collections.defaultdict(set)
    for item in keep or ():
        column, sep, value = item.partition("=")
        if not sep or not column.strip():
            raise InputError(f"--keep {item!r}: expected COLUMN=VALUE, e.g. --keep modality=X-ray "
                             f"(repeat it for several values: --keep view=PA --keep view=AP)")
        filters[column.strip()].add(value.strip())
    options = {"--image-column": image_column, "--text-column": text_column,
               "--patient-column": patient_column, "--study-column": study_column,
               "--label-column": label_column, "--view-column": view_column,
               **{f"--keep {c}=...": c for c in filters}}
    missing = [f"{option} {column!r}" for option, column in options.items()
               if column is not None and column not in header]
    if missing:
        raise ManifestError(f"{metadata}: no column {', '.join(missing)}; the header is {header}")
    skipped, checked = collections.Counter(), {}  # checked: image -> check_image's verdict

    def keep_row(r):
        if all(r[c].strip() in values for c, values in filters.items()):
            return True
        skipped["left out by --keep"] += 1
        return False

    def make_row(i, r):
        for column, what, reason in ((patient_column, "patient id", "empty patient id"),
                                     (study_column, "study id", "empty study id"),
                                     (image_column, "file name", "missing image")):
            if column and not r[column].strip():
                raise ManifestError(f"{metadata}, row {i}, column '{column}': empty {what}", reason)
        image = folder / r[image_column].strip()
        check_row_image(metadata, i, image_column, image)
        if image not in checked:
            checked[image] = check_image(image)
        if checked[image]:
            raise ManifestError(f"{metadata}, row {i}, column '{image_column}': {image}: "
                                f"{checked[image]}", "unreadable image")
        patient = r[patient_column].strip()
        study = f"{patient}/{r[study_column].strip()}" if study_column else f"row{i}"
        text = extract_report_text(r[text_column], sections=False)
        view = r[view_column].strip() if view_column else ""
        return {**_row(image, text, "", study, patient, view),
                **({"label": r[label_column].strip()} if label_column else {}),
                "_row": i, "_source": metadata.name, "_file": r[image_column].strip()}

    rows, bad = scan_records(metadata, header, records, image_column, make_row, keep_row)
    bad = [b._replace(image=b.image.strip()) for b in bad]
    if any(r["text"] for r in rows):  # an empty text is bad, unless no row has one: labels-only
        bad = sorted(bad + [BadRow(r["_row"], r["_file"], "empty text", f"{metadata}, row "
                                   f"{r['_row']}, column '{text_column}': empty text")
                            for r in rows if not r["text"]], key=lambda b: b.row)
        rows = [r for r in rows if r["text"]]
    if bad and not skip_bad:
        raise BadRowsError(metadata, bad, len(rows) + len(bad),
                           f"or pass --skip-bad to write the {len(rows)} good rows and list the "
                           f"skipped ones in <out>_skipped.csv")
    skipped.update(b.reason for b in bad)
    if bad_rows is not None:
        bad_rows.extend(bad)
    split_of = _split_patients([r["patient_id"] for r in rows], valid_frac, test_frac, seed)
    return [{**r, "split": split_of[r["patient_id"]]} for r in rows], skipped


PREPARERS = {"mimic-cxr": prepare_mimic_cxr, "chexpert": prepare_chexpert,
             "chexpert-5x200": prepare_chexpert_5x200, "rsna": prepare_rsna,
             "iu-xray": prepare_iu_xray, "roco": prepare_roco, "image-folder": prepare_image_folder,
             "csv": prepare_csv}
WITHOUT_CHEXPERT_LABELS = {"image-folder", "csv"}  # a `label` column (or none) instead of the 14
# Datasets whose rows come from a user's own table: their bad rows are listed (bad_rows), and the
# split check compares image bytes too, since one picture may sit under two patient ids there.
USER_TABLES = {"csv"}
VIEW_ADVICE = {"iu-xray": "put indiana_projections.csv (uid, filename, projection; from the Kaggle "
                          "packaging of the same release) in --root: then only frontal images are "
                          "taken, as in the literature"}


def _cache_one(job):
    """Write one resized 8-bit PNG copy (once: an existing copy is kept); None or the error."""
    src, dst, size = job
    if dst.is_file():
        return None
    try:
        img = load_image(src, max_side=size)
    except MissingPackageError:
        raise  # not a bad image: every DICOM would fail the same way
    except (OSError, ValueError) as e:
        return str(e)
    with atomic_write(dst) as tmp:   # a run killed mid-write leaves no half file
        img.save(tmp, format="PNG")
    return None


def write_resized_copies(rows, root, cache_dir, size=256, workers=1, skipped=None):
    """Decode every image once into cache_dir/<its path under root>.png, longest side <= size,
    so that epochs are not bound by decoding multi-megapixel JPEGs; rows then point at the
    copies. Unreadable images are dropped and counted in skipped."""
    jobs = []
    for r in rows:
        src = Path(r["image"])
        rel = src.relative_to(root) if src.is_relative_to(root) else Path(src.name)
        jobs.append((src, Path(cache_dir) / rel.with_suffix(".png"), size))
    with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        mapper = (lambda f, xs: pool.imap(f, xs, chunksize=16)) if pool else map
        results = list(tqdm(mapper(_cache_one, jobs), total=len(jobs), desc="cache", disable=None))
    for e in filter(None, results):
        print(f"skipped unreadable image: {e}", file=sys.stderr)
    if skipped is not None:
        skipped["unreadable image"] += sum(e is not None for e in results)
    return [{**r, "image": str(dst)} for r, (_, dst, _), e in zip(rows, jobs, results) if e is None]


def _summary(dataset, out, rows, skipped, notes):
    lines = [f"{dataset}: {len(rows)} rows written to {out}"]
    lines += [f"  skipped {n:7d}  {reason}" for reason, n in skipped.most_common() if n]
    for split in sorted({r["split"] for r in rows}):
        part = [r for r in rows if r["split"] == split]
        counts = [f"{name} {sum(r.get(name) == '1' for r in part)}"
                  + (f" (-1: {k})" if (k := sum(r.get(name) == "-1" for r in part)) else "")
                  for name in LABELS if any(r.get(name) in ("1", "-1") for r in part)]
        if any("label" in r for r in part):
            counts = [f"{c} {n}" for c, n in
                      sorted(collections.Counter(r["label"] or "(no label)" for r in part).items())]
        patients = len({r["patient_id"] for r in part})
        lines.append(f"  {split:8s} {len(part):7d} rows, {patients} patients"
                     + (f"; {'classes' if any('label' in r for r in part) else 'positives'}: "
                        f"{', '.join(counts)}" if counts else ""))
    views = collections.Counter(r["view"] or "(none)" for r in rows)
    lines.append("  views: " + ", ".join(f"{v} {n}" for v, n in views.most_common()))
    lines += [f"  note: {note}" for note in notes]
    return "\n".join(lines)


def _notes(dataset, rows):
    """What a user should know about the rows written: unknown views, class balance, and how
    many texts a tokenizer cuts short at the usual max_len."""
    notes = []
    unknown = sum(r["view"] == "UNKNOWN" for r in rows)
    if unknown:
        notes.append(f"{unknown} of {len(rows)} rows have view UNKNOWN (no view information), "
                     f"so laterals may be among them" + (f"; {VIEW_ADVICE[dataset]}" if dataset in VIEW_ADVICE else ""))
    labels = collections.Counter(r["label"] for r in rows if r.get("label"))
    if labels:
        (top, count), = labels.most_common(1)
        unlabelled = sum("label" in r and not r["label"] for r in rows)
        notes.append(f"{len(labels)} classes in {sum(labels.values())} labelled rows; the most "
                     f"frequent, {top!r}, is {count / sum(labels.values()):.0%} of them (the "
                     f"accuracy of always answering it)"
                     + (f"; {unlabelled} rows without a label are kept as image-text pairs"
                        if unlabelled else ""))
    texts = [r["text"] for r in rows]
    if any(t.strip() for t in texts):
        shares = ", ".join(f"{n}: {truncated_share(texts, n):.1%}" for n in TRUNCATION_LENGTHS)
        notes.append(f"texts longer than max_len tokens (word tokens + [CLS] + [SEP]), cut short "
                     f"in training: {shares}")
    return notes


def prepare_side_files(out):
    """The files prepare writes beside the manifest out: its record <out stem>.prepare.json (what
    was run, and the manifest's SHA-256), the skipped rows <out stem>_skipped.csv and the test_5x
    patients to keep out of training <out stem>_exclude_patients.txt."""
    out = Path(out)
    return [out.with_name(out.stem + end)
            for end in (".prepare.json", "_skipped.csv", "_exclude_patients.txt")]


def written_by_prepare(out):
    """Whether the file `out` is a manifest that prepare wrote and nobody changed since: its
    record (prepare_side_files) holds the SHA-256 of exactly these bytes."""
    try:
        record = read_json(prepare_side_files(out)[0])
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("manifest_sha256") == sha256_file(out)


def check_output(out, force=False, inputs=()):
    """The rule for the manifest prepare writes (docs/data.md, "Where prepare writes"): an empty
    path, a folder or device, one of the inputs ((what, path) pairs), or an existing file that
    prepare did not write is refused; a manifest prepare wrote is replaced only with force. The
    side files follow the manifest: replaced only where it may be. Returns out as a Path."""
    if not str(out).strip():
        raise InputError("--out is empty: give the path of the manifest CSV to write")
    out = Path(out)
    if not os.path.lexists(out):
        for other in prepare_side_files(out)[1:]:
            if os.path.lexists(other):
                raise FileExistsError(f"{other} exists beside --out {out}, which data.py prepare has "
                                      f"not written: it is never replaced; choose another --out, or "
                                      f"move that file away first")
        return out
    problem = file_problem(out)
    if problem:
        what = "is a link to nothing" if problem == NOT_FOUND else problem
        raise FileExistsError(f"--out {out} {what}: give the path of the manifest CSV to write")
    check_not_input(out, inputs)
    if not written_by_prepare(out):
        raise FileExistsError(f"--out {out} exists and was not written by data.py prepare (no "
                              f"{prepare_side_files(out)[0].name} recording these bytes): it is "
                              f"never replaced; choose another --out, or move the file away first")
    if not force:
        raise FileExistsError(f"--out {out} is a manifest an earlier prepare wrote: pass --force "
                              f"to replace it, or choose another --out")
    return out


def prepare(dataset, root, out, cache=None, cache_size=256, workers=1, force=False,
            allow_split_overlap=False, **options):
    """Convert the dataset at root into the manifest out (see PREPARERS), print a summary and
    return it: {"rows", "skipped", "splits", "views", "truncated", "notes"}. With cache, images
    are first written as resized PNG copies (write_resized_copies) and the manifest points at
    those. out follows check_output; beside it go prepare_side_files. A user's table whose
    images repeat across the splits is refused unless allow_split_overlap (then warned)."""
    if dataset not in PREPARERS:
        raise InputError(f"unknown dataset {dataset!r}; one of {sorted(PREPARERS)}")
    root = Path(root).absolute()  # absolute: write_manifest stores paths relative to out
    if not root.is_dir():
        raise (NotADirectoryError(f"--root {root} is a file, not a folder") if root.exists()
               else FileNotFoundError(f"--root {root}: no such folder"))
    inputs = []  # files prepare reads, which --out must not be
    if dataset == "csv":
        inputs.append(("the metadata CSV", metadata_path(root, options.get("metadata"))))
    out = check_output(out, force, inputs)
    bad_rows = []
    if dataset in USER_TABLES:
        options["bad_rows"] = bad_rows
    rows, skipped = PREPARERS[dataset](root, **options)
    if cache:
        rows = write_resized_copies(rows, root, Path(cache).absolute(), cache_size, workers, skipped)
    if not rows:
        raise InputError(f"{dataset}: no rows left from {root}; skipped {dict(skipped)}")
    if dataset in USER_TABLES:
        check_split_overlap(rows, out, allow_split_overlap, contents=True,
                            way_out="data.py prepare --allow-split-overlap (then also when training "
                                    "and evaluating), or another --seed")
    write_manifest(out, rows, [] if dataset in WITHOUT_CHEXPERT_LABELS else LABELS)
    notes = _notes(dataset, rows)
    record, skipped_csv, exclude_txt = prepare_side_files(out)
    for stale in (skipped_csv, exclude_txt):  # of an earlier prepare of this manifest (--force)
        stale.unlink(missing_ok=True)
    if any(r["split"] == "test_5x" for r in rows):
        patients = sorted({r["patient_id"] for r in rows if r["split"] == "test_5x"})
        write_text(exclude_txt, "\n".join(patients) + "\n")
    if bad_rows:
        write_skipped(skipped_csv, bad_rows)
        notes.append(f"the {len(bad_rows)} bad rows skipped (--skip-bad) are listed in {skipped_csv}")
    write_text(record, json.dumps(
        {"written_by": "data.py prepare", "dataset": dataset, "root": str(root), "rows": len(rows),
         "options": {k: v for k, v in options.items() if k != "bad_rows"},
         "manifest_sha256": sha256_file(out)}, indent=1, default=str) + "\n")
    print(_summary(dataset, out, rows, skipped, notes))
    texts = [r["text"] for r in rows]
    return {"rows": len(rows), "skipped": {k: n for k, n in skipped.items() if n},
            "splits": dict(collections.Counter(r["split"] for r in rows)),
            "views": dict(collections.Counter(r["view"] for r in rows)),
            "truncated": {n: truncated_share(texts, n) for n in TRUNCATION_LENGTHS}, "notes": notes}


# -----------------------------------------------------------------------------
# E. Command line
# Read this when you run `python data.py synth | preview | prepare`; importing runs none of it.
# -----------------------------------------------------------------------------

def add_prepare_parser(subparsers):
    p = subparsers.add_parser("prepare", help="convert a public dataset, or your own image folder, "
                                              "into a manifest")
    p.add_argument("dataset", choices=sorted(PREPARERS))
    p.add_argument("root_arg", nargs="?", metavar="ROOT", help="the dataset's folder (or --root)")
    p.add_argument("--root", help="the dataset's folder, as downloaded (image-folder: "
                                  "<class>/<image> or <split>/<class>/<image>; csv: the folder the "
                                  "image paths start from)")
    p.add_argument("--out", required=True, help="manifest CSV to write (docs/data.md, \"Where "
                                                "prepare writes\")")
    p.add_argument("--force", action="store_true", help="replace a manifest an earlier prepare wrote")
    p.add_argument("--cache", help="write resized PNG copies here; the manifest points at them")
    p.add_argument("--cache-size", type=int, default=256, help="longest side of cached copies")
    p.add_argument("--workers", type=int, default=1, help="processes decoding images for --cache")
    p.add_argument("--uncertain", choices=UNCERTAIN_POLICIES, help="-1 label policy (chexpert: required)")
    p.add_argument("--seed", type=int, help="seed of patient splits and 5xN sampling")
    p.add_argument("--valid-frac", type=float, help="fraction of patients (image-folder: of each "
                                                    "class's images) for 'valid'")
    p.add_argument("--test-frac", type=float, help="fraction of patients (image-folder: of each "
                                                   "class's images) for 'test'")
    p.add_argument("--split-protocol", choices=sorted(RSNA_SPLITS),
                   help="rsna: classification = 70/15/15 patients (GLoRIA, MGCA; the default), "
                        "detection = 60/20/20 (MGCA's detection split)")
    p.add_argument("--all-views", action="store_true", default=None, help="keep lateral views too")
    p.add_argument("--deid", choices=("keep", "remove"), help="keep or remove '___' / 'XXXX'")
    p.add_argument("--one-per-study", help="mimic-cxr: splits with one image per study "
                                           "(default valid,test; '' for none)")
    p.add_argument("--five-x", type=int, help="mimic-cxr: also draw a 5xN set from 'test'")
    p.add_argument("--per-class", type=int, help="chexpert-5x200: images per class (default 200)")
    p.add_argument("--exclude", help="chexpert: file of patient ids to leave out (from chexpert-5x200)")
    p.add_argument("--reports", help="mimic-cxr: folder holding files/pXX/.../sNNN.txt (default --root)")
    p.add_argument("--images", help="iu-xray: image folder (default: searched under --root); "
                                    "csv: the folder image paths are relative to (default --root)")
    p.add_argument("--metadata", help="csv: the metadata table (default ROOT/metadata.csv)")
    for name, default in (("image", "image"), ("text", "text"), ("patient", "patient_id"),
                          ("study", None), ("label", None), ("view", None)):
        p.add_argument(f"--{name}-column", help=f"csv: the column of the {name}" + (
            f" (default {default})" if default else " (optional)"))
    p.add_argument("--keep", action="append", metavar="COLUMN=VALUE",
                   help="csv: keep only rows whose COLUMN is VALUE (repeat for several values or columns)")
    p.add_argument("--skip-bad", action="store_true", default=None,
                   help="csv: write the good rows and list the bad ones in <out>_skipped.csv")
    p.add_argument("--allow-split-overlap", action="store_true",
                   help="csv: write the manifest although an image's bytes are in train and in "
                        "another split (warned; training and evaluation then need the same option)")


def _prepare_cli(args):
    common = ("command", "dataset", "root_arg", "root", "out", "force", "cache", "cache_size", "workers",
              "allow_split_overlap")
    options = {k: v for k, v in vars(args).items() if k not in common and v is not None}
    accepted = inspect.signature(PREPARERS[args.dataset]).parameters
    wrong = [f"--{k.replace('_', '-')}" for k in options if k not in accepted]
    if wrong:
        raise SystemExit(f"prepare {args.dataset}: {', '.join(wrong)} does not apply to this dataset")
    if (args.root is None) == (args.root_arg is None):
        raise SystemExit(f"prepare {args.dataset}: give the dataset's folder once, as ROOT or as --root")
    if args.allow_split_overlap and args.dataset not in USER_TABLES:
        raise SystemExit(f"prepare {args.dataset}: --allow-split-overlap applies to prepare csv only "
                         f"(the other preparers split by patient themselves)")
    try:
        prepare(args.dataset, args.root or args.root_arg, args.out, args.cache, args.cache_size,
                args.workers, args.force, args.allow_split_overlap, **options)
    except USER_ERRORS as e:  # a wrong root, column, option: one clear line
        raise SystemExit(f"prepare {args.dataset}: {e}") from e


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="write the SynthCXR dataset")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=4000, help="studies in train/valid/test")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-5x", type=int, default=100, help="studies per class in the test_5x set")
    p.add_argument("--max-bytes", type=int, help=f"refuse settings estimated above this many bytes "
                                                 f"(default data.MAX_SYNTH_BYTES, {MAX_SYNTH_BYTES})")
    p = sub.add_parser("preview", help="contact sheet PNG of a dataset folder with a manifest.csv")
    p.add_argument("dir")
    p.add_argument("--out", default=None, help="PNG path (default DIR/preview.png)")
    add_prepare_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        return _prepare_cli(args)
    try:  # a folder of someone else's, a bound, a missing manifest: one clear line
        if args.command == "synth":
            t0 = time.time()
            path = generate_synthetic(args.out, args.n, args.size, args.seed, args.n_5x,
                                      max_bytes=args.max_bytes)
            print(f"wrote {path}: {args.n + 5 * args.n_5x} studies of {args.size}px in "
                  f"{time.time() - t0:.1f} s")
        else:
            print(f"wrote {preview(args.dir, args.out)}")
    except USER_ERRORS as e:
        raise SystemExit(f"{args.command}: {e}") from e


if __name__ == "__main__":
    main()
