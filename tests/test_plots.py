"""Tests of evaluate.py's pictures (appendix D): the SVG parses as XML, has one mark per value,
maps a bigger value to a taller bar or a higher point, skips missing values with a note, and
`python evaluate.py --task plots` draws what is in results/ even when one input is missing."""
import json
import math
import xml.etree.ElementTree as ET

import pytest

import evaluate

NS = "{http://www.w3.org/2000/svg}"


def parse(path):
    root = ET.parse(path).getroot()  # raises if the file is not well-formed XML
    assert root.tag == NS + "svg"
    assert {"width", "height", "viewBox"} <= set(root.attrib)
    return root


def marks(root, tag, cls):
    return [e for e in root.iter(NS + tag) if e.get("class") == cls]


def points(polyline):
    return [tuple(float(v) for v in p.split(",")) for p in polyline.get("points").split()]


def texts(root):
    return " ".join(e.text or "" for e in root.iter(NS + "text"))


def efficiency_file(path, clip=(80, 200, 460), msd=(90, 110, 120)):
    rows = [{"name": "CLIP end-to-end B=32", "effective_batch": 32, "step_memory_mb": 999.0}]  # not growth
    for k, (c, m) in enumerate(zip(clip, msd)):
        B = 32 * 2 ** k
        rows += [{"name": f"growth: CLIP end-to-end B={B}", "effective_batch": B, "step_memory_mb": c},
                 {"name": f"growth: MSD {2 ** k}x32 (B={B})", "effective_batch": B, "step_memory_mb": m}]
    path.write_text(json.dumps({"device": "cpu", "machine": "x86_64", "threads": 2, "config": "c.json",
                                "memory": "process peak RSS", "rows": rows}))
    return path


def ablation_file(path, table=None):
    table = table or {"random": {"seeds": [0, 1], "zs_acc": [0.2, 0.02], "i2t_R@10": [0.02, 0.01]},
                      "clip": {"seeds": [0, 1], "zs_acc": [0.6, 0.05], "i2t_R@10": [0.25, 0.03]},
                      "msd": {"seeds": [0, 1], "zs_acc": [0.5, None], "i2t_R@10": [0.15, 0.02]}}
    path.write_text(json.dumps({"ablation": "a.json", "table": table}))
    return path


def log_file(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_memory_plot_one_point_per_row_bigger_memory_higher(tmp_path):
    out = tmp_path / "m.svg"
    notes = evaluate.plot_memory(efficiency_file(tmp_path / "e.json"), out)
    root = parse(out)
    assert notes == []
    lines = marks(root, "polyline", "series")
    assert len(lines) == 2 and len(marks(root, "circle", "point")) == 6  # the non-growth row is not drawn
    clip, msd = (points(p) for p in lines)  # series in name order: CLIP, MSD
    assert [x for x, _ in clip] == sorted(x for x, _ in clip)  # B grows to the right
    assert clip[0][1] > clip[1][1] > clip[2][1]  # 80 < 200 < 460 MB: higher and higher
    assert clip[0][1] > msd[0][1]  # at B=32: MSD 90 MB is above CLIP 80 MB
    assert clip[2][1] < msd[2][1]  # at B=128: CLIP 460 MB is above MSD 120 MB
    assert "process peak RSS" in texts(root) and "cpu" in texts(root)


def test_memory_plot_skips_missing_value_with_note(tmp_path):
    path = efficiency_file(tmp_path / "e.json")
    res = json.loads(path.read_text())
    res["rows"][3]["step_memory_mb"] = None  # growth: CLIP B=64
    path.write_text(json.dumps(res))
    notes = evaluate.plot_memory(path, tmp_path / "m.svg")
    root = parse(tmp_path / "m.svg")
    assert len(marks(root, "circle", "point")) == 5
    assert len(notes) == 1 and "growth: CLIP end-to-end B=64" in notes[0]
    assert "B=64" in texts(root)  # the note is in the picture too


def test_memory_plot_without_growth_rows_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"rows": [{"name": "MSD 4x32", "effective_batch": 128, "step_memory_mb": 1}]}))
    with pytest.raises(ValueError, match="e.json"):
        evaluate.plot_memory(path, tmp_path / "m.svg")


def test_ablation_plot_one_bar_per_value_taller_for_bigger(tmp_path):
    out = tmp_path / "a.svg"
    notes = evaluate.plot_ablation(ablation_file(tmp_path / "a.json"), out, metrics=("zs_acc", "i2t_R@10"))
    root = parse(out)
    bars = marks(root, "rect", "bar")
    assert notes == [] and len(bars) == 6  # 2 metrics x 3 runs
    heights = [float(b.get("height")) for b in bars]  # order: metric, then run
    values = [0.2, 0.6, 0.5, 0.02, 0.25, 0.15]
    order = sorted(range(6), key=lambda i: values[i])
    assert [heights[i] for i in order] == sorted(heights)  # a bigger mean is a taller bar
    bottoms = {round(float(b.get("y")) + float(b.get("height")), 3) for b in bars}
    assert len(bottoms) == 1  # all bars stand on the same zero line
    # whiskers: 3 lines for each bar with a std (the msd zs_acc std is null: no whisker)
    whiskers = [e for e in root.iter(NS + "line") if e.get("stroke") == "#000"]
    assert len(whiskers) == 5 * 3


def test_ablation_plot_skips_null_and_nan_with_note(tmp_path):
    table = {"a": {"zs_acc": [0.5, 0.1], "i2t_R@10": [None, None]},
             "b": {"zs_acc": [float("nan"), 0.1], "i2t_R@10": [0.3, 0.0]}}
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"table": table}))  # json writes NaN; the plot must still cope
    notes = evaluate.plot_ablation(path, tmp_path / "a.svg", metrics=("zs_acc", "i2t_R@10", "absent"))
    root = parse(tmp_path / "a.svg")
    assert len(marks(root, "rect", "bar")) == 2
    assert len(notes) == 4  # a i2t_R@10, b zs_acc, and "absent" for both runs
    assert any("b zs_acc" in n for n in notes) and any("a i2t_R@10" in n for n in notes)


def test_ablation_plot_escapes_names(tmp_path):
    path = ablation_file(tmp_path / "a.json", {"<b>&\"x\"": {"zs_acc": [0.4, 0.1]}})
    evaluate.plot_ablation(path, tmp_path / "a.svg", metrics=("zs_acc",))
    assert '<b>&"x"' in texts(parse(tmp_path / "a.svg"))


def test_curves_one_point_per_record_bigger_value_higher(tmp_path):
    records = [{"step": s, "loss": 10.0 - s / 10, "tau": 0.07, "alpha": min(0.4, s / 100)}
               for s in range(10, 60, 10)]
    records[2]["valid_zs_acc"] = 0.5  # logged at one step only: a dot, no note
    out = tmp_path / "c.svg"
    notes = evaluate.plot_curves(log_file(tmp_path / "log.jsonl", records), out)
    root = parse(out)
    assert notes == []
    loss, tau, alpha = marks(root, "polyline", "series")
    assert len(points(loss)) == len(points(tau)) == len(points(alpha)) == 5
    ys = [y for _, y in points(loss)]
    assert ys == sorted(ys)  # the loss falls: each point lower on the picture than the one before
    assert len({y for _, y in points(tau)}) == 1  # a constant is a flat line
    assert len(marks(root, "circle", "point")) == 1  # the one valid_zs_acc value
    assert "valid_zs_acc" in texts(root)


def test_curves_nan_and_null_leave_a_gap_with_note(tmp_path):
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 8)]
    records[3]["loss"] = float("nan")
    records[5]["loss"] = None
    notes = evaluate.plot_curves(log_file(tmp_path / "log.jsonl", records), tmp_path / "c.svg", keys=["loss"])
    root = parse(tmp_path / "c.svg")
    lines, dots = marks(root, "polyline", "series"), marks(root, "circle", "point")
    assert [len(points(p)) for p in lines] == [3] and len(dots) == 2  # 1-3 | 5 | 7
    assert len(notes) == 1 and "2 value(s)" in notes[0]


def test_curves_keep_the_later_record_of_a_resumed_step_and_note_absent_keys(tmp_path):
    records = [{"step": 10, "loss": 5.0}, {"step": 20, "loss": 4.0}, {"step": 20, "loss": 1.0},
               {"step": 30, "loss": 3.0}]
    path = log_file(tmp_path / "log.jsonl", records)
    assert [r["loss"] for r in evaluate.read_log(path)] == [5.0, 1.0, 3.0]
    notes = evaluate.plot_curves(path, tmp_path / "c.svg", keys=["loss", "valid_auroc"])
    assert notes == ["'valid_auroc' is not in the log, no panel"]
    ys = [y for _, y in points(marks(parse(tmp_path / "c.svg"), "polyline", "series")[0])]
    assert ys[1] > ys[2] > ys[0]  # 1.0 lowest, then 3.0, 5.0 highest


def test_bad_log_line_names_file_and_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 2}\n{"step": 2, "loss": \n')
    with pytest.raises(ValueError, match=r"log.jsonl line 2"):
        evaluate.read_log(path)
    path.write_text('{"loss": 2}\n')
    with pytest.raises(ValueError, match=r"line 1: a record needs a numeric 'step'"):
        evaluate.read_log(path)


@pytest.mark.parametrize("lo,hi", [(0, 885.4), (0.052, 0.0695), (0.17, 0.4), (10, 10), (0, 1), (-3, 7)])
def test_nice_ticks_cover_the_range_with_round_steps(lo, hi):
    ticks = evaluate.nice_ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi and 2 <= len(ticks) <= 12
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
    assert len(steps) == 1
    mantissa = steps.pop() / 10 ** math.floor(math.log10(ticks[1] - ticks[0]))
    assert round(mantissa, 6) in (1, 2, 5)


def test_task_plots_draws_every_input_and_reports_the_missing_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    efficiency_file(tmp_path / "results" / "efficiency.json")
    ablation_file(tmp_path / "results" / "ablation.json")
    ablation_file(tmp_path / "results" / "ablation_warm.json")  # a second ablation file: its own picture
    res = evaluate.main(["--task", "plots", "--readme-pictures", "--out", str(tmp_path / "plots.json")])
    drawn = sorted(p.name for p in (tmp_path / "results" / "plots").iterdir())
    assert drawn == ["ablation.svg", "ablation_warm.svg", "efficiency.svg"]
    for name in drawn:
        parse(tmp_path / "results" / "plots" / name)
    out = capsys.readouterr().out
    assert "results/*log.jsonl: no such file" in out  # the training curves: no log, said so
    assert list(res["missing"]) == ["results/*log.jsonl"]
    log_file(tmp_path / "results" / "small_log.jsonl", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}])
    res = evaluate.main(["--task", "plots", "--readme-pictures", "--out", str(tmp_path / "plots.json")])
    assert (tmp_path / "results" / "plots" / "small_log.svg").is_file() and res["missing"] == {}


def test_task_plots_unreadable_input_is_an_error_after_the_others_are_drawn(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "efficiency.json").write_text("{not json")  # drawn first
    ablation_file(tmp_path / "results" / "ablation.json")
    with pytest.raises(ValueError, match=r"efficiency.json: not valid JSON"):
        evaluate.main(["--task", "plots", "--readme-pictures", "--out", str(tmp_path / "plots.json")])
    assert (tmp_path / "results" / "plots" / "ablation.svg").is_file()


def run_fills(root):
    """run name -> the set of colours its bars and legend swatch have in one picture."""
    fills = {}
    for e in root.iter(NS + "rect"):
        if e.get("data-run") is not None:
            fills.setdefault(e.get("data-run"), set()).add(e.get("fill"))
    return fills


def test_a_run_has_one_colour_in_every_ablation_picture(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    cell = {"seeds": [0], "zs_acc": [0.5, 0.1]}
    ablation_file(tmp_path / "results" / "ablation.json", {n: cell for n in ("random", "a", "b", "c")})
    ablation_file(tmp_path / "results" / "ablation_warm.json", {n: cell for n in ("warm_start", "c", "a", "b")})
    evaluate.main(["--task", "plots", "--readme-pictures", "--out", str(tmp_path / "plots.json")])
    cold, warm = (run_fills(parse(tmp_path / "results" / "plots" / f"{n}.svg")) for n in ("ablation", "ablation_warm"))
    assert all(len(colours) == 1 for colours in [*cold.values(), *warm.values()])  # bar = swatch
    assert all(cold[run] == warm[run] for run in ("a", "b", "c"))
    assert len({c for colours in cold.values() for c in colours}) == 4  # distinct within a picture
    assert cold["random"] == warm["warm_start"]  # the floor rows: the same grey


def test_the_batch_size_study_is_drawn_with_the_same_colours_when_it_is_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    cell = {"seeds": [0, 1], "zs_acc": [0.5, 0.1], "mean_R@10": [0.3, 0.02]}
    ablation_file(tmp_path / "results" / "ablation.json", {n: cell for n in ("random", "a", "b")})
    res = evaluate.main(["--task", "plots", "--readme-pictures", "--out", str(tmp_path / "plots.json")])
    assert not (tmp_path / "results" / "plots" / "batch_search.svg").exists()
    assert "results/batch_*.json" not in res["missing"]              # optional: never "missing"
    ablation_file(tmp_path / "results" / "batch_search.json", {n: cell for n in ("warm_start", "c", "b")})
    evaluate.main(["--task", "plots", "--readme-pictures", "--out", str(tmp_path / "plots.json")])
    cold, batch = (run_fills(parse(tmp_path / "results" / "plots" / f"{n}.svg")) for n in ("ablation", "batch_search"))
    assert batch["b"] == cold["b"] and batch["c"] != cold["a"]        # shared names, one colour
    labels = [e.text for e in parse(tmp_path / "results" / "plots" / "batch_search.svg").iter(NS + "text")]
    assert "mean R@10 (both directions)" in " ".join(t or "" for t in labels)


def test_ablation_picture_has_a_y_axis_label(tmp_path):
    evaluate.plot_ablation(ablation_file(tmp_path / "a.json"), tmp_path / "a.svg", metrics=("zs_acc",))
    rotated = [e.text for e in parse(tmp_path / "a.svg").iter(NS + "text") if "rotate(-90" in (e.get("transform") or "")]
    assert rotated == ["mean over seeds (1 = perfect)"]


def test_memory_labels_stay_inside_the_frame_and_the_caption_says_what_it_shows(tmp_path):
    # 490 MB: just under a round 500, where a frame ending at 500 cuts through the label above it
    evaluate.plot_memory(efficiency_file(tmp_path / "e.json", clip=(80, 200, 490)), tmp_path / "m.svg")
    root = parse(tmp_path / "m.svg")
    frame = next(e for e in root.iter(NS + "rect") if e.get("fill") == "none")
    labels = [e for e in root.iter(NS + "text") if (e.text or "").endswith(" MB")]
    assert len(labels) == 2 and all(float(e.get("y")) - 11 >= float(frame.get("y")) for e in labels)
    caption = "B = 32 → 128: CLIP 80 → 490 MB (6.1×), MSD 90 → 120 MB (1.3×)"
    assert caption in texts(root) and caption in root.find(NS + "title").text


def test_curves_alpha_axis_starts_at_zero_and_the_step_axis_ends_at_the_last_step(tmp_path):
    records = [{"step": s, "loss": 7 - s / 100, "alpha": min(0.4, 0.15 * s / 10)} for s in range(10, 370, 10)]
    evaluate.plot_curves(log_file(tmp_path / "log.jsonl", records), tmp_path / "c.svg")
    root = parse(tmp_path / "c.svg")
    labels = [e.text for e in root.iter(NS + "text") if e.get("text-anchor") in ("end", "middle")]
    x_labels = [t for t in labels if t in {"0", "100", "200", "300", "360", "400"}]
    assert x_labels[-2:] == ["300", "360"] and "400" not in labels  # the axis ends at step 360
    alpha_ticks = [e.text for e in root.iter(NS + "text") if e.get("text-anchor") == "end"][-3:]
    assert alpha_ticks[0] == "0"  # the lowest tick of the last panel (alpha): the ramp starts at 0
    assert "over 360 optimizer steps" in root.find(NS + "title").text
