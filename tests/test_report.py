import numpy as np
import pandas as pd
import pytest

from pipeline import report
from pipeline.results import results_path, upsert


def _results():
    rows = [
        ("efficientnet_lite0", "finetune", "image", 0.900, 400.0, 0.0),
        ("efficientnet_lite0", "logreg", "image", 0.875, 2.0, 2.0),
        ("efficientnet_lite0", "linear_svm", "image", 0.910, 0.5, 2.0),
        ("efficientnet_lite0", "logreg", "image+meta", 0.880, 80.0, 2.0),
        ("resnet50", "logreg", "image", 0.800, 1.0, 9.0),
    ]
    return pd.DataFrame(
        [
            dict(
                dataset="d",
                backbone=b,
                method=m,
                features=f,
                test_accuracy=a,
                val_accuracy=a,
                train_seconds=t,
                extract_seconds=e,
                params="{}",
            )
            for b, m, f, a, t, e in rows
        ]
    )


def test_deltas_and_time_ratios_against_the_fine_tuned_baseline():
    t = report.comparison_table(_results()).set_index(["backbone", "method", "features"])
    logreg = t.loc[("efficientnet_lite0", "logreg", "image")]
    assert logreg["total_seconds"] == 4.0
    assert logreg["delta_pt"] == pytest.approx(-2.5)
    assert logreg["time_ratio"] == pytest.approx(100.0)
    assert logreg["vs_finetune"] == "-2.5 pt, 100× faster"
    svm = t.loc[("efficientnet_lite0", "linear_svm", "image")]
    assert svm["vs_finetune"] == "+1.0 pt, 160× faster"
    meta = t.loc[("efficientnet_lite0", "logreg", "image+meta")]
    assert meta["time_ratio"] == pytest.approx(400 / 82) and meta["vs_finetune"].endswith("4.9× faster")
    assert t.loc[("efficientnet_lite0", "finetune", "image"), "vs_finetune"] == ""
    # missing methods are listed as not run, never as errors; no baseline -> no delta
    assert t.loc[("efficientnet_lite0", "rbf_svm", "image"), "status"] == "not run"
    assert t.loc[("efficientnet_lite0", "rbf_svm", "image+meta_norm"), "status"] == "not run"
    assert t.loc[("resnet50", "finetune", "image"), "status"] == "not run"
    assert np.isnan(t.loc[("resnet50", "logreg", "image"), "delta_pt"])


def test_ratio_text_and_pareto_front():
    assert report.ratio_text(412.3) == "412× faster"
    assert report.ratio_text(2.04) == "2.0× faster"
    assert report.ratio_text(0.25) == "4.0× slower"
    front = report.pareto_front(report.comparison_table(_results()))
    assert list(front["method"]) == ["linear_svm"]  # fastest and most accurate dominates all


def test_subgroup_accuracy_matches_a_hand_count():
    pred = pd.DataFrame(
        {"id": list("abcdefgh"), "y_true": [0, 0, 1, 1, 0, 1, 0, 1], "y_pred": [0, 1, 1, 1, 0, 0, 0, 1]}
    )  # wrong: b and f -> overall 6/8
    glasses = {"a": -1, "b": 1, "c": -1, "d": 1, "e": -1, "f": 1, "g": -1, "h": 1}
    order = list("hdbfaceg")  # metadata rows in another order: joined by id
    meta = pd.DataFrame(
        {"Eyeglasses": [glasses[i] for i in order], "hat": ["y" if i == "h" else "n" for i in order], "age": range(8)},
        index=pd.Index(order, name="id"),
    )
    sub = report.subgroup_accuracy(pred, meta, max_values=4)
    assert "age" not in set(sub["column"])  # 8 distinct values: not a subgroup column
    got = {(r.column, r.value): (r.n, r.correct, r.wrong, round(r.accuracy, 4)) for r in sub.itertuples()}
    assert got[("Eyeglasses", 1)] == (4, 2, 2, 0.5)  # b(wrong) d f(wrong) h
    assert got[("Eyeglasses", -1)] == (4, 4, 0, 1.0)  # a c e g
    assert got[("hat", "y")] == (1, 1, 0, 1.0)  # h
    assert got[("hat", "n")] == (7, 5, 2, round(5 / 7, 4))
    first = sub.iloc[0]
    assert (first["column"], first["value"]) == ("Eyeglasses", 1)  # worst subgroup first
    assert first["vs_overall_pt"] == pytest.approx(-25.0)


def test_report_builds_from_a_results_table_alone(tmp_path, capsys):
    from pipeline.config import Config

    cfg = Config()
    cfg.artifacts = str(tmp_path / "artifacts")
    (tmp_path / "data" / "d").mkdir(parents=True)
    cfg.data.dataset = str(tmp_path / "data" / "d")
    for row in _results().to_dict("records"):
        upsert(results_path(cfg.artifacts, "d"), row)
    out = report.run(cfg)
    d = out.parent
    assert (d / "report.md").exists() and (d / "summary.csv").exists()
    png = (d / "accuracy_vs_time.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    html = out.read_text()
    assert "data:image/png;base64," in html and "100× faster" in html and "not run" in html
    assert "-2.5 pt, 100× faster" in (d / "report.md").read_text()
    assert "report.html" in capsys.readouterr().out


def test_layer_sets_are_rows_of_their_own_and_the_per_layer_chart_is_shown(tmp_path):
    import json

    from pipeline.config import Config

    cfg = Config()
    cfg.artifacts = str(tmp_path / "artifacts")
    (tmp_path / "data" / "d").mkdir(parents=True)
    cfg.data.dataset = str(tmp_path / "data" / "d")
    rows = _results().to_dict("records")
    rows.append({**rows[1], "layers": "all", "test_accuracy": 0.93, "val_accuracy": 0.93})
    for row in rows:
        upsert(results_path(cfg.artifacts, "d"), row)
    heads_dir = tmp_path / "artifacts" / "heads" / "d" / "efficientnet_lite0"
    heads_dir.mkdir(parents=True)
    per_layer = [
        {"layer": "last", "width": 1280, "val_accuracy": 0.86, "test_accuracy": 0.85},
        {"layer": "block11", "width": 672, "val_accuracy": 0.88, "test_accuracy": 0.87},
    ]
    steps = [{"layers": ["block11"], "val_accuracy": 0.88}, {"layers": ["block11", "last"], "val_accuracy": 0.89}]
    sel = {"chosen": ["last", "block11"], "per_layer": per_layer, "steps": steps, "seconds": 1.5}
    (heads_dir / "layers.json").write_text(json.dumps(sel))
    out = report.run(cfg)
    summary = pd.read_csv(out.parent / "summary.csv").set_index(["backbone", "method", "features", "layers"])
    assert summary.loc[("efficientnet_lite0", "logreg", "image", "all"), "delta_pt"] == pytest.approx(3.0)
    assert summary.loc[("efficientnet_lite0", "logreg", "image", "last"), "delta_pt"] == pytest.approx(-2.5)
    assert (out.parent / "layers_efficientnet_lite0.png").read_bytes()[:4] == b"\x89PNG"
    html = out.read_text()
    assert "(what --layers auto uses) picks last, block11" in html and "block11 + last (0.8900)" in html
