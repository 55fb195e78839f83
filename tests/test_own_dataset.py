"""Bring your own dataset, end to end, on a dataset that is not chest X-rays: a folder of
drawn shapes, one sub-folder per class, a caption .txt beside each image. The commands of
docs/data.md, "Bring your own dataset", in the same order: prepare image-folder -> train with configs/tiny.json and --data -> evaluate
with --label-column and prompts of our own (N-way zero-shot, multi-class probe, retrieval).

Run as a script, this file writes such a folder (and a prompt file for it), for trying those
commands by hand:
    python tests/test_own_dataset.py DIR [--classes 10] [--per-class 60] [--size 64] [--prompts FILE]
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import data          # noqa: E402
import evaluate as ev  # noqa: E402
import msd           # noqa: E402

SHAPES = ["circle", "square", "triangle", "cross", "diamond", "ring", "star", "horizontal bar",
          "vertical bar", "hexagon"]


def draw_shape(draw, shape, cx, cy, r, fill):
    """One bright shape of radius r around (cx, cy)."""
    polygon = lambda k, phase=0.0, radii=(1.0,): [  # noqa: E731
        (cx + r * radii[i % len(radii)] * math.cos(phase + 2 * math.pi * i / k),
         cy + r * radii[i % len(radii)] * math.sin(phase + 2 * math.pi * i / k)) for i in range(k)]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r / 3)))
    elif shape == "square":
        draw.rectangle([cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r], fill=fill)
    elif shape == "triangle":
        draw.polygon(polygon(3, -math.pi / 2), fill=fill)
    elif shape == "diamond":
        draw.polygon(polygon(4), fill=fill)
    elif shape == "hexagon":
        draw.polygon(polygon(6), fill=fill)
    elif shape == "star":
        draw.polygon(polygon(10, -math.pi / 2, (1.0, 0.4)), fill=fill)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif shape == "horizontal bar":
        draw.rectangle([cx - r, cy - r / 4, cx + r, cy + r / 4], fill=fill)
    elif shape == "vertical bar":
        draw.rectangle([cx - r / 4, cy - r, cx + r / 4, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def make_shapes(root, classes=4, per_class=16, size=32, seed=0):
    """root/<shape>/<shape>_NNN.png and a caption <shape>_NNN.txt beside each, e.g. "a small
    triangle on the left, bright on a dark background." Seeded: the same files every time."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for shape in SHAPES[:classes]:
        folder = root / shape.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.new("L", (size, size), int(rng.integers(0, 50)))
            r = rng.uniform(0.2, 0.4) * size
            cx, cy = rng.uniform(r, size - r, size=2)
            draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, int(rng.integers(170, 256)))
            img.save(folder / f"{folder.name}_{i:03d}.png")
            where = "on the left" if cx < size / 2 else "on the right"
            (folder / f"{folder.name}_{i:03d}.txt").write_text(
                f"a {'small' if r < 0.3 * size else 'large'} {shape} {where}, bright on a dark background.\n")
    return root


def test_own_image_folder_end_to_end(tmp_path, capsys):
    # 1. an image folder -> a manifest
    make_shapes(tmp_path / "shapes", classes=4, per_class=16)
    (tmp_path / "shapes" / "circle" / "notes.md").write_text("not an image")
    data.main(["prepare", "image-folder", "--root", str(tmp_path / "shapes"),
               "--out", str(tmp_path / "shapes.csv"), "--seed", "0"])
    out = capsys.readouterr().out
    assert "64 rows written" in out and "not an image file" in out
    rows = data.read_manifest(tmp_path / "shapes.csv")
    assert {r["label"] for r in rows} == {"circle", "square", "triangle", "cross"}
    assert not set(data.LABELS) & set(rows[0])                    # no CheXpert columns
    for split in ("train", "valid", "test"):                      # every class in every split
        assert {r["label"] for r in rows if r["split"] == split} == {"circle", "square", "triangle", "cross"}
    assert "test_5x" not in {r["split"] for r in rows}

    # 2. train on it: configs/tiny.json with --data (any manifest trains)
    cfg = msd.load_config(ROOT / "configs" / "tiny.json", [
        f"--data={tmp_path / 'shapes.csv'}", f"--out_dir={tmp_path / 'run'}", "--max_steps=12",
        "--min_freq=1", "--queue_size=16", "--progress=false"])
    summary = msd.pretrain(cfg)
    assert summary["steps"] == 12 and math.isfinite(summary["final_loss"])

    # 3. zero-shot with prompts of our own, a multi-class probe, retrieval with class P@K
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({c: [f"a small {c}", f"a large {c}"]
                                   for c in ["circle", "square", "triangle", "cross"]}))
    capsys.readouterr()
    ev.main(["--task", "all", "--checkpoint", str(tmp_path / "run" / "ckpt.pt"),
             "--data", str(tmp_path / "shapes.csv"), "--label-column", "label",
             "--prompts", str(prompts), "--out", str(tmp_path / "r.json"),
             "--shots", "1,4", "--fractions", "1", "--seeds", "2", "--weight-decays", "0.01,1"])
    printed = capsys.readouterr().out
    r = json.loads((tmp_path / "r.json").read_text())
    n_test = sum(row["split"] == "test" for row in rows)
    mc = r["zeroshot"]["multiclass"]
    assert mc["classes"] == ["circle", "cross", "square", "triangle"] and mc["split"] == "test"
    assert mc["n"] == n_test and sum(map(sum, mc["confusion_matrix"])) == n_test
    assert mc["n_prompts"] == {c: 2 for c in mc["classes"]} and mc["chance_accuracy"] == 0.25
    assert f"zero-shot 4-way on test (n={n_test}" in printed
    fs = r["fewshot"]
    assert fs["kind"] == "multi-class" and fs["classes"] == mc["classes"]
    assert set(fs["results"]) == {"1-shot", "4-shot", "100%"}
    assert fs["results"]["1-shot"]["train_rows_per_seed"] == [4, 4]          # one per class
    assert fs["results"]["4-shot"]["train_rows_per_seed"] == [16, 16]
    for res in fs["results"].values():
        assert 0 <= res["accuracy_mean"] <= 1 and 0 <= res["macro_f1_mean"] <= 1
    assert "linear probe, 4 classes of column 'label'" in printed
    rt = r["retrieval"]["test"]
    assert {"P@1", "R@1"} <= set(rt["i2t"]) and rt["n_images"] == n_test


def main():
    p = argparse.ArgumentParser(description="Write a folder of drawn shapes (a toy dataset).")
    p.add_argument("out")
    p.add_argument("--classes", type=int, default=10, help=f"at most {len(SHAPES)}")
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", help="also write a prompt file keyed by the class folder names")
    args = p.parse_args()
    make_shapes(args.out, args.classes, args.per_class, args.size, args.seed)
    print(f"wrote {args.classes} x {args.per_class} images to {args.out}")
    if args.prompts:
        prompts = {s.replace(" ", "_"): [f"a {s}", f"a small {s}", f"a large {s}"] for s in SHAPES[:args.classes]}
        Path(args.prompts).write_text(json.dumps(prompts, indent=1) + "\n")
        print(f"wrote {args.prompts}")


if __name__ == "__main__":
    main()
