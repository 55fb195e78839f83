"""The statistics every study table uses (evaluate.py, appendix B): Student's t written by hand,
Welch contrasts, Holm's adjustment, the smallest detectable difference, the bootstrap interval,
and the registered contrasts of a study file, sealed test split included."""
import math

import numpy as np
import pytest

import evaluate


@pytest.mark.parametrize("t, df, p", [
    (12.706, 1, 0.05), (4.303, 2, 0.05), (2.228, 10, 0.05), (2.042, 30, 0.05),   # t tables, 5 %
    (63.657, 1, 0.01), (3.169, 10, 0.01), (1.960, 1e9, 0.05), (0.0, 7, 1.0),
])
def test_two_sided_p_matches_published_t_tables(t, df, p):
    assert evaluate.t_two_sided_p(t, df) == pytest.approx(p, abs=2e-4)
    assert evaluate.t_two_sided_p(-t, df) == evaluate.t_two_sided_p(t, df)


@pytest.mark.parametrize("t, df", [(2.0, 2.5), (0.7, 3.3), (3.06, 2.5)])
def test_two_sided_p_at_fractional_df_equals_the_integrated_density(t, df):
    """Welch's df is rarely whole: compare with the density integrated numerically."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    x = np.linspace(abs(t), abs(t) + 4000.0, 2_000_001)
    tail = np.trapezoid(c * (1 + x * x / df) ** (-(df + 1) / 2), x)
    assert evaluate.t_two_sided_p(t, df) == pytest.approx(2 * tail, abs=1e-4)


@pytest.mark.parametrize("q, df, t", [(0.975, 10, 2.228), (0.975, 2, 4.303), (0.8, 10, 0.879),
                                      (0.95, 5, 2.015)])
def test_t_quantile_inverts_the_tables(q, df, t):
    assert evaluate.t_quantile(q, df) == pytest.approx(t, abs=1e-3)


def test_welch_two_rows_equals_the_textbook_formula():
    a, b = [0.21, 0.25, 0.23, 0.19, 0.24], [0.28, 0.30, 0.25, 0.31]
    c = evaluate.welch_contrast([a], [b])
    va, vb = np.var(a, ddof=1) / 5, np.var(b, ddof=1) / 4
    assert c["estimate"] == pytest.approx(np.mean(a) - np.mean(b))
    assert c["t"] == pytest.approx((np.mean(a) - np.mean(b)) / math.sqrt(va + vb))
    assert c["df"] == pytest.approx((va + vb) ** 2 / (va ** 2 / 4 + vb ** 2 / 3))
    assert c["t"] == pytest.approx(evaluate.welch_t(a, b))          # the runner's older helper
    assert c["p"] == pytest.approx(evaluate.t_two_sided_p(c["t"], c["df"]))
    assert c["smallest_detectable"] == pytest.approx(
        (evaluate.t_quantile(0.975, c["df"]) + evaluate.t_quantile(0.8, c["df"])) * c["se"])


def test_contrast_of_averaged_rows_weights_each_row_equally():
    rows_plus = [[1.0, 1.2, 1.1], [2.0, 2.4, 2.2]]
    rows_minus = [[0.0, 0.1, 0.2], [0.5, 0.4, 0.6]]
    c = evaluate.welch_contrast(rows_plus, rows_minus)
    means = [np.mean(r) for r in rows_plus + rows_minus]
    assert c["estimate"] == pytest.approx((means[0] + means[1]) / 2 - (means[2] + means[3]) / 2)
    var = sum(0.25 * np.var(r, ddof=1) / 3 for r in rows_plus + rows_minus)
    assert c["se"] == pytest.approx(math.sqrt(var))
    assert evaluate.welch_contrast([[1.0]], [[0.0, 1.0]]) is None      # one seed: no spread


def test_holm_adjustment_and_a_family_with_a_missing_contrast():
    assert evaluate.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    # a contrast not computed yet still counts in the family's size
    assert evaluate.holm([0.01, None]) == [0.02, None]


def test_verdict_follows_the_registered_rule():
    c = {"estimate": -0.03, "smallest_detectable": 0.021}
    assert evaluate.verdict(c, 0.01) == "negative"
    assert evaluate.verdict({**c, "estimate": 0.03}, 0.049) == "positive"
    assert evaluate.verdict(c, 0.2) == "not decided at this power (smallest detectable 0.021)"


def test_bootstrap_interval_is_deterministic_and_brackets_the_mean():
    rng = np.random.default_rng(1)
    seeds = [{"i2t": rng.integers(1, 40, 300).tolist(), "t2i": rng.integers(1, 40, 250).tolist()}
             for _ in range(3)]
    lo, hi = evaluate.bootstrap_mean_recall(seeds)
    mean = np.mean([(np.mean(np.array(s["i2t"]) <= 10) + np.mean(np.array(s["t2i"]) <= 10)) / 2
                    for s in seeds])
    assert lo < mean < hi and hi - lo < 0.1
    assert evaluate.bootstrap_mean_recall(seeds) == (lo, hi)


def _record(value, test_value, ranks=None):
    m = {"i2t_R@10": value, "t2i_R@10": value}
    return {"config": {}, "metrics": m,
            "sealed_test": {"metrics": {"i2t_R@10": test_value, "t2i_R@10": test_value},
                            "ranks": ranks or {"i2t": [1, 20, 3], "t2i": [2, 30]}}}


def test_study_contrasts_choose_on_valid_and_unseal_test_only_when_complete():
    spec = {"seeds": [0, 1, 2], "runs": {"msd_a": {}, "msd_b": {}, "clip_x": {}},
            "contrasts": {"metric": "mean_R@10",
                          "table": {"a_vs_b": {"plus": ["msd_a"], "minus": ["msd_b"]}},
                          "sealed_test": {"best": {"plus": ["best of msd_*"], "minus": ["clip_x"]}}}}
    valid = {"msd_a": [0.30, 0.31, 0.32], "msd_b": [0.20, 0.22, 0.21], "clip_x": [0.25, 0.26, 0.24]}
    test = {"msd_a": [0.10, 0.11, 0.12], "msd_b": [0.50, 0.52, 0.51], "clip_x": [0.20, 0.21, 0.22]}
    recorded = {n: {str(s): _record(valid[n][s], test[n][s]) for s in (0, 1)} for n in valid}
    table = evaluate.ablation_table(recorded, spec, "random")
    out = evaluate.study_contrasts(spec, recorded, table)
    assert "sealed" in out["sealed_test"]                    # a seed still to record: test stays sealed
    assert out["table"]["a_vs_b"]["estimate"] == pytest.approx(0.095)
    for n in valid:
        recorded[n]["2"] = _record(valid[n][2], test[n][2])
    table = evaluate.ablation_table(recorded, spec, "random")
    out = evaluate.study_contrasts(spec, recorded, table)
    best = out["sealed_test"]["best"]
    assert best["plus"] == ["msd_a"]                  # chosen on valid, although msd_b wins on test
    assert best["estimate"] == pytest.approx(0.11 - 0.21)
    assert best["verdict"] == "negative" and best["holm_p"] == best["p"] < 0.05
    assert set(out["test_rows"]) == {"msd_a", "clip_x"}


def test_sealed_contrast_naming_a_row_not_yet_in_the_file_keeps_the_seal_shut():
    """A study registers contrasts on rows added after a choice on valid (report-level
    positives of the best cell): while such a row is not in the file, the test stays sealed."""
    spec = {"seeds": [0, 1], "runs": {"msd_a": {}, "clip_x": {}},
            "contrasts": {"metric": "mean_R@10",
                          "sealed_test": {"later": {"plus": ["msd_later"], "minus": ["best of msd_*"]}}}}
    recorded = {n: {str(s): _record(0.3 + s / 100, 0.2 + s / 100) for s in (0, 1)} for n in spec["runs"]}
    out = evaluate.study_contrasts(spec, recorded, evaluate.ablation_table(recorded, spec, "random"))
    assert out["sealed_test"] == {"sealed": "0 (run, seed) pairs still to record; rows not yet in the file: msd_later"}
