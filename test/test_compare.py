"""training.compare: the Table-3 rows and the paired comparison of two evaluations of the same images."""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from training import compare as C
from training import metrics as M

H, W = 64, 64


def disc(cy: int, cx: int, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


def shifted(mask: np.ndarray, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    out[:, dx:] = mask[:, :W - dx] if dx else mask
    return out


def make_cases(shift: dict[str, int], seed: int = 0, p_malignant_shift: float = 0.0) -> list[M.Case]:
    """24 images (20 lesions of very different sizes, 4 normal); each lesion's prediction is the truth
    moved by shift[id] pixels (default 4), so Dice varies a lot between images and little between two models
    whose shifts differ by one pixel on every image."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(24):
        cid = f"PACE_{i:05d}_00{i % 3}_BUS"
        if i < 4:
            label, gt, pred = "normal", np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8)
        else:
            label = "malignant" if i % 2 else "benign"
            gt = disc(32, 28, 2 + (i % 10) * 2.6)
            pred = shifted(gt, shift.get(cid, 4))
        p_mal = float(np.clip(rng.uniform(0.0, 0.5) + (0.4 if label == "malignant" else 0.0) + p_malignant_shift, 0, 1))
        p = np.array([0.1 if label != "normal" else 0.8, 0.5, p_mal])
        cases.append(M.Case(image_id=cid, label=label, gt=gt, pred=pred, probabilities=(p / p.sum()).tolist()))
    return cases


def evaluation(cases, n_boot=300) -> dict:
    return M.to_jsonable(M.evaluate_cases(cases, n_boot=n_boot, seed=0))


def write_eval(root: Path, name: str, res: dict) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(res))
    return d


LESION_IDS = [f"PACE_{i:05d}_00{i % 3}_BUS" for i in range(4, 24)]


def test_a_model_against_itself_differs_by_nothing():
    a = evaluation(make_cases({}))
    res = M.paired_difference(a["cases"], a["cases"], n_boot=200)
    for key, value in res["diff"].items():
        if value == value:  # defined (seg_bce is not: no probability maps)
            assert value == 0, key
            assert res["ci"][key] == [0.0, 0.0], key
    assert res["dice"] == {"b_higher": 0, "b_lower": 0, "equal": 20}
    assert res["n_images"] == 24 and res["n_lesion_images"] == 20


def test_pairing_resolves_a_small_consistent_gain_that_the_two_intervals_do_not():
    a = evaluation(make_cases({cid: 4 for cid in LESION_IDS}))
    b = evaluation(make_cases({cid: 3 for cid in LESION_IDS}))
    res = M.paired_difference(a["cases"], b["cases"], n_boot=500, seed=1)
    assert res["a"]["dsc"] == pytest.approx(a["dsc"]) and res["b"]["dsc"] == pytest.approx(b["dsc"])
    assert res["diff"]["dsc"] == pytest.approx(b["dsc"] - a["dsc"])
    assert res["diff"]["dsc"] > 0
    # side by side, each model's own interval contains the other's mean: they look alike ...
    assert a["ci"]["dsc"][1] > b["dsc"] and b["ci"]["dsc"][0] < a["dsc"]
    # ... but B is better on every lesion image, and the paired interval says so
    assert res["dice"] == {"b_higher": 20, "b_lower": 0, "equal": 0}
    assert res["ci"]["dsc"][0] > 0
    # the class probabilities are the same: no difference there, exactly
    assert res["diff"]["auc_malignant"] == 0 and res["ci"]["auc_malignant"] == [0.0, 0.0]


def test_the_order_of_the_images_does_not_matter():
    a = evaluation(make_cases({}))
    b = evaluation(make_cases({cid: 1 for cid in LESION_IDS[::2]}))
    defined = (lambda d: {k: v for k, v in d.items() if v == v})  # NaN != NaN (seg_bce: no maps)
    direct = M.paired_difference(a["cases"], b["cases"], n_boot=100)
    shuffled = M.paired_difference(a["cases"], b["cases"][::-1], n_boot=100)
    assert defined(direct["diff"]) == defined(shuffled["diff"]) and direct["ci"] == shuffled["ci"]
    assert direct["dice"] == {"b_higher": 10, "b_lower": 0, "equal": 10}


def test_other_images_or_other_labels_are_refused():
    a = evaluation(make_cases({}), n_boot=0)["cases"]
    with pytest.raises(ValueError, match=r"not the same images: 1 only in A \['PACE_00000_000_BUS'\], 0 only in B"):
        M.paired_difference(a, a[1:], n_boot=0)
    relabelled = [dict(c, label="malignant") if c["image_id"] == LESION_IDS[0] else c for c in a]
    with pytest.raises(ValueError, match=f"1 images have other true labels.*{LESION_IDS[0]}"):
        M.paired_difference(a, relabelled, n_boot=0)
    with pytest.raises(ValueError, match="occurs twice"):
        M.paired_difference(a, a + a[:1], n_boot=0)


def test_cli_table_and_paired_report(tmp_path):
    a = write_eval(tmp_path, "before", evaluation(make_cases({cid: 4 for cid in LESION_IDS})))
    b = write_eval(tmp_path, "after", evaluation(make_cases({cid: 3 for cid in LESION_IDS})))
    out = tmp_path / "cmp.md"
    r = CliRunner().invoke(C.main, [str(a), str(b), "--paired", "--n-boot", "200", "--out", str(out)])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert f"| before | {ma['accuracy']:.3f} |" in text and f"| after | {mb['accuracy']:.3f} |" in text
    assert "A = before, B = after" in text
    dsc_row = next(line for line in text.splitlines() if line.startswith("| DSC |"))
    cells = [c.strip() for c in dsc_row.strip("|").split("|")]
    assert cells[1:4] == [f"{ma['dsc']:.3f}", f"{mb['dsc']:.3f}", f"{mb['dsc'] - ma['dsc']:+.3f}"]
    low, high = (float(x) for x in cells[4].split(" … "))
    assert 0 < low <= mb["dsc"] - ma["dsc"] <= high
    assert "B higher on 20, lower on 0, equal on 0" in text
    assert text in r.output


def test_cli_without_paired_writes_one_row_per_evaluation(tmp_path):
    dirs = [write_eval(tmp_path, f"m{i}", evaluation(make_cases({}, seed=i), n_boot=0)) for i in range(3)]
    out = tmp_path / "t.md"
    r = CliRunner().invoke(C.main, [*map(str, dirs), "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = [line for line in out.read_text().splitlines() if line.startswith("| m") and not line.startswith("| model")]
    assert [row.split("|")[1].strip() for row in rows] == ["m0", "m1", "m2"]
    assert "Paired" not in out.read_text()


def test_models_in_folders_of_the_same_name_are_told_apart(tmp_path):
    cases = make_cases({})
    a = write_eval(tmp_path / "runs" / "default", "eval", evaluation(cases, n_boot=0))
    b = write_eval(tmp_path / "runs" / "repro", "eval", evaluation(cases, n_boot=0))
    c = write_eval(tmp_path / "other" / "repro", "eval", evaluation(cases, n_boot=0))
    assert C.labels([a, b]) == ["default/eval", "repro/eval"]
    assert C.labels([a, b, c]) == ["runs/default/eval", "runs/repro/eval", "other/repro/eval"]
    assert C.labels([a, tmp_path / "runs" / "default" / ".." / "default" / "eval"]) == ["eval", "eval"]
    assert C.labels([Path("/eval"), Path("/runs/eval")]) == ["/eval", "runs/eval"]  # not "//eval"
    text = C.paired(a, b, n_boot=10) + C.table([a, b])
    assert "A = default/eval, B = repro/eval" in text
    assert "| default/eval |" in text and "| repro/eval |" in text


def test_cli_errors_name_the_problem(tmp_path):
    a = write_eval(tmp_path, "a", evaluation(make_cases({}), n_boot=0))
    b = write_eval(tmp_path, "b", evaluation(make_cases({})[2:], n_boot=0))
    empty = tmp_path / "empty"
    empty.mkdir()
    run = (lambda *args: CliRunner().invoke(C.main, [*map(str, args), "--out", str(tmp_path / "o.md")]))
    r = run(a, b, a, "--paired")
    assert r.exit_code == 2 and "--paired compares two evaluations (A B), not 3" in r.output
    r = run(a, empty, "--paired")
    assert r.exit_code == 1 and f"{empty}: no metrics.json" in r.output
    r = run(a, b, "--paired")
    assert r.exit_code == 1 and f"{a} and {b}: not the same images: 2 only in A" in r.output
    in_mm = evaluation(make_cases({}), n_boot=0)
    in_mm["units"]["distance"] = "mm"  # a Grand Challenge evaluation (mha spacing) against a PACE one
    r = run(a, write_eval(tmp_path, "gc", in_mm), "--paired")
    assert r.exit_code == 1 and f"distances in px in {a} but in mm in {tmp_path / 'gc'}: not comparable" in r.output
    r = run(a, write_eval(tmp_path, "gc2", in_mm))  # the table's HD95 column too
    assert r.exit_code == 1 and f"distances in px in {a} but in mm in {tmp_path / 'gc2'}: not comparable" in r.output
    tau4 = evaluation(make_cases({}), n_boot=0)
    tau4["units"]["tau"] = 4.0  # the same predictions, NSD at 4 px: a "gain" that is only the tolerance
    for paired in (["--paired"], []):
        r = run(a, write_eval(tmp_path, f"tau4{len(paired)}", tau4), *paired)
        assert r.exit_code == 1 and "NSD at a tolerance of 2.0 px in" in r.output and "of 4.0 px in" in r.output
    assert not (tmp_path / "o.md").exists()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_a_malformed_metrics_json_is_a_clear_error_naming_it(tmp_path, text):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    (good / "metrics.json").write_text(json.dumps({"dsc": 0.8, "units": {"distance": "px", "tau": 2.0}}))
    (bad / "metrics.json").write_text(text)
    res = CliRunner().invoke(C.main, [str(good), str(bad), "--out", str(tmp_path / "t.md")])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert f"{bad / 'metrics.json'}: not" in res.output
    assert not (tmp_path / "t.md").exists()


def _rows(markdown: str) -> list[list[str]]:
    """The cells of a Markdown table's rows (header first, the |---| line left out)."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("|") and not line.startswith("|---")]


def test_every_table_cell_is_the_figure_its_column_names(tmp_path):
    """Each column of the table holds the metric its header names, to 3 decimals, "–" where it is
    undefined (no probability maps: no BCE)."""
    a = write_eval(tmp_path, "a", evaluation(make_cases({}), n_boot=0))
    b = write_eval(tmp_path, "b", evaluation(make_cases({cid: 2 for cid in LESION_IDS}, p_malignant_shift=0.3),
                                             n_boot=0))
    rows = _rows(C.table([a, b]))
    assert rows[0] == ["model", "Accuracy", "CE", "AUC", "BCE", "DSC", "HD95", "NSD"]
    keys = {"Accuracy": "accuracy", "CE": "cross_entropy", "AUC": "auc_macro", "BCE": "seg_bce", "DSC": "dsc",
            "HD95": "hd95", "NSD": "nsd"}
    for d, row in zip((a, b), rows[1:]):
        m = json.loads((d / "metrics.json").read_text())
        cells = dict(zip(rows[0], row))
        assert cells["model"] == d.name
        for column, key in keys.items():
            assert cells[column] == ("–" if m.get(key) is None else f"{m[key]:.3f}"), (d.name, column)
    assert len({cells[c] for c in ("DSC", "HD95", "NSD")}) == 3  # a column swap would show


def test_a_table_of_evaluations_of_different_images_says_so(tmp_path):
    """A --limit evaluation beside a full one (or another split) was put in the table as if comparable:
    a note under the table now says that the rows scored different images, with each one's count; none
    where every evaluation scored the same images (in any order)."""
    cases = make_cases({})
    a = write_eval(tmp_path, "full", evaluation(cases, n_boot=0))
    b = write_eval(tmp_path, "limit", evaluation(cases[:6] + cases[10:], n_boot=0))
    c = write_eval(tmp_path, "again", evaluation(cases[::-1], n_boot=0))
    text = C.table([a, b, c])
    assert ("Note: these evaluations scored different images (images scored: full: 24, limit: 20, again: 24); "
            "their rows are not comparable figure for figure.") in text
    assert "Note:" not in C.table([a, c])
    older = json.loads((a / "metrics.json").read_text())  # a metrics.json without per-image cases
    del older["cases"]
    d = write_eval(tmp_path, "older", older)
    assert "Note:" not in C.table([d, d]) and "Note:" in C.table([d, b])


def test_the_paired_report_gives_every_headline_figure_with_the_interval_asked_for(tmp_path):
    """The paired table: every headline figure of A and B (HD95 in the evaluations' unit, distances to
    2 decimals), B - A and its interval from the paired bootstrap with the resamples and seed asked
    for; a figure neither model has (BCE without probability maps) is "–" throughout."""
    ra = evaluation(make_cases({cid: 4 for cid in LESION_IDS}), n_boot=0)
    rb = evaluation(make_cases({cid: 3 for cid in LESION_IDS}, p_malignant_shift=0.2), n_boot=0)
    for r in (ra, rb):
        r["units"]["distance"] = "mm"  # both Grand Challenge evaluations: comparable
    a, b = write_eval(tmp_path, "a", ra), write_eval(tmp_path, "b", rb)
    texts = {}
    for seed in (0, 5):
        texts[seed] = text = C.paired(a, b, n_boot=40, seed=seed)
        assert "40 paired bootstrap resamples, seed %d" % seed in text
        res = M.paired_difference(ra["cases"], rb["cases"], n_boot=40, seed=seed)
        rows = {row[0]: row[1:] for row in _rows(text)[1:]}
        assert list(rows) == ["DSC", "IoU", "HD95 (mm)", "NSD", "accuracy", "macro-F1", "macro AUC",
                              "malignant AUC", "CE", "BCE", "normal images with an empty mask",
                              "false-positive area on normal images"]
        assert rows["HD95 (mm)"] == ["4.00", "3.00", "-1.00", "-1.00 … -1.00"]
        assert rows["BCE"] == ["–", "–", "–", "–"]
        for name, key in (("DSC", "dsc"), ("IoU", "iou"), ("NSD", "nsd"), ("macro AUC", "auc_macro"),
                          ("CE", "cross_entropy")):
            low, high = res["ci"][key]
            assert rows[name] == [f"{res['a'][key]:.3f}", f"{res['b'][key]:.3f}", f"{res['diff'][key]:+.3f}",
                                  f"{low:+.3f} … {high:+.3f}"], name
    assert texts[0].split("seed 0")[1] != texts[5].split("seed 5")[1]  # the seed moves the intervals


def test_a_paired_comparison_that_cannot_be_made_is_refused_naming_why(tmp_path):
    """Without per-image cases (an older metrics.json), in other units, or with one evaluation only:
    a clear error, also through the Python function, not a KeyError or an IndexError."""
    a = write_eval(tmp_path, "a", evaluation(make_cases({}), n_boot=0))
    no_cases = evaluation(make_cases({}), n_boot=0)
    del no_cases["cases"]
    old = write_eval(tmp_path, "old", no_cases)
    with pytest.raises(click.ClickException, match=r"old/metrics.json has no per-image cases"):
        C.paired(a, old, n_boot=10)
    in_mm = evaluation(make_cases({}), n_boot=0)
    in_mm["units"]["distance"] = "mm"
    with pytest.raises(click.ClickException, match=r"distances in px in .* but in mm in .*: not comparable"):
        C.paired(a, write_eval(tmp_path, "mm", in_mm), n_boot=10)
    r = CliRunner().invoke(C.main, [str(a), "--paired", "--out", str(tmp_path / "o.md")])
    assert r.exit_code == 2 and "--paired compares two evaluations (A B), not 1" in r.output
    assert not (tmp_path / "o.md").exists()
