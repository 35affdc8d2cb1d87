import json

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


def _report_cfg(tmp_path):
    """A config whose dataset is an empty folder 'd': the report reads only the results table."""
    from pipeline.config import Config

    cfg = Config()
    cfg.artifacts = str(tmp_path / "artifacts")
    (tmp_path / "data" / "d").mkdir(parents=True)
    cfg.data.dataset = str(tmp_path / "data" / "d")
    return cfg


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
        {
            "Eyeglasses": [glasses[i] for i in order],
            "hat": ["y" if i == "h" else "n" for i in order],
            "name": [f"person {i}" for i in order],
        },
        index=pd.Index(order, name="id"),
    )
    sub = report.subgroup_accuracy(pred, meta, max_values=4)
    assert "name" not in set(sub["column"])  # 8 distinct labels > max_values: not a subgroup column
    got = {(r.column, r.value): (r.n, r.correct, r.wrong, round(r.accuracy, 4)) for r in sub.itertuples()}
    assert got[("Eyeglasses", 1)] == (4, 2, 2, 0.5)  # b(wrong) d f(wrong) h
    assert got[("Eyeglasses", -1)] == (4, 4, 0, 1.0)  # a c e g
    assert got[("hat", "y")] == (1, 1, 0, 1.0)  # h
    assert sub.set_index(["column", "value"]).loc[("hat", "y"), "note"] == "small (n < 20)"
    assert got[("hat", "n")] == (7, 5, 2, round(5 / 7, 4))
    first = sub.iloc[0]
    assert (first["column"], first["value"]) == ("Eyeglasses", 1)  # worst subgroup first
    assert first["vs_overall_pt"] == pytest.approx(-25.0)


def test_report_builds_from_a_results_table_alone(tmp_path, capsys):
    cfg = _report_cfg(tmp_path)
    for row in _results().to_dict("records"):
        upsert(results_path(cfg.artifacts, "d"), row)
    out = report.run(cfg)
    d = out.parent
    assert (d / "report.md").exists() and (d / "summary.csv").exists()
    png = (d / "accuracy_vs_time.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    html = out.read_text()
    assert "data:image/png;base64," in html and "100× faster" in html and "not run" in html
    md = (d / "report.md").read_text()
    assert "| efficientnet_lite0 | logreg | 0.8750 |  | -2.50 |  | 4.0 | 100× faster |" in md
    assert md.index("Best frozen head") < md.index("## Comparison")  # the verdict comes first
    assert "report.html" in capsys.readouterr().out


def test_layer_sets_are_rows_of_their_own_and_the_per_layer_chart_is_shown(tmp_path):
    cfg = _report_cfg(tmp_path)
    rows = _results().to_dict("records")
    rows.append({**rows[1], "layers": "all", "test_accuracy": 0.93, "val_accuracy": 0.93})
    for row in rows:
        upsert(results_path(cfg.artifacts, "d"), row)
    heads_dir = tmp_path / "artifacts" / "heads" / "d" / "efficientnet_lite0"
    heads_dir.mkdir(parents=True)
    per_layer = [
        {"layer": "last", "width": 1280, "val_accuracy": 0.86, "test_accuracy": 0.85},
        {"layer": "_blocks__11___bn0__relu6", "label": "tap 4: block 11 (672 ch, 7×7)", "width": 672}
        | {"val_accuracy": 0.88, "test_accuracy": 0.87},
    ]
    raw = "_blocks__11___bn0__relu6"
    steps = [{"layers": [raw], "val_accuracy": 0.88}, {"layers": [raw, "last"], "val_accuracy": 0.89}]
    sel = {"chosen": ["last", raw], "per_layer": per_layer, "steps": steps, "seconds": 1.5}
    (heads_dir / "layers.json").write_text(json.dumps(sel))
    out = report.run(cfg)
    summary = pd.read_csv(out.parent / "summary.csv").set_index(["backbone", "method", "features", "layers"])
    assert summary.loc[("efficientnet_lite0", "logreg", "image", "all"), "delta_pt"] == pytest.approx(3.0)
    assert summary.loc[("efficientnet_lite0", "logreg", "image", "last"), "delta_pt"] == pytest.approx(-2.5)
    assert (out.parent / "layers_efficientnet_lite0.png").read_bytes()[:4] == b"\x89PNG"
    html = out.read_text()
    assert "(what --layers auto uses) picks last, tap 4: block 11 (672 ch, 7×7)" in html
    assert "tap 4: block 11 (672 ch, 7×7) + last (0.8900)" in html


def test_numeric_columns_are_quartile_bins_and_missing_values_a_subgroup_of_their_own():
    rng = np.random.default_rng(0)
    ids = [f"img{i:03d}" for i in range(200)]
    pred = pd.DataFrame({"id": ids, "y_true": rng.integers(0, 2, 200), "y_pred": rng.integers(0, 2, 200)})
    age = rng.uniform(18, 80, 200)
    smiling = np.where(rng.random(200) < 0.5, 1.0, -1.0)
    smiling[:30] = np.nan  # 30 images without the attribute
    meta = pd.DataFrame({"age": age, "Smiling": smiling}, index=pd.Index(ids, name="id"))
    sub = report.subgroup_accuracy(pred, meta)
    bins = sub[sub["column"] == "age"]
    assert len(bins) == 4 and bins["n"].sum() == 200 and bins["n"].min() >= 49
    smile = sub[sub["column"] == "Smiling"].set_index("value")
    assert set(smile.index) == {-1.0, 1.0, "(missing)"} and smile.loc["(missing)", "n"] == 30
    wrong = (pred["y_true"] != pred["y_pred"]).to_numpy()[:30].sum()
    assert smile.loc["(missing)", "wrong"] == wrong
    assert (sub["ci_low"] <= sub["accuracy"]).all() and (sub["accuracy"] <= sub["ci_high"]).all()


def test_bootstrap_interval_matches_the_closed_form_binomial_interval():
    from pipeline.report import stats

    correct = np.zeros(2000, dtype=bool)
    correct[:1750] = True  # 87.5% of 2,000 test images
    lo, hi = stats.accuracy_ci(correct)
    half = 1.96 * np.sqrt(0.875 * 0.125 / 2000)  # normal approximation to the binomial
    assert abs(lo - (0.875 - half)) < 0.01 and abs(hi - (0.875 + half)) < 0.01
    wl, wh = stats.wilson(1750, 2000)
    assert abs(lo - wl) < 0.01 and abs(hi - wh) < 0.01
    # paired: two methods that agree everywhere but on 30 images (20 won by A, 10 by B)
    a = correct.copy()
    b = correct.copy()
    a[1750:1770] = True
    b[:10] = False
    d, dlo, dhi = stats.paired_delta_ci(a, b)
    assert d == pytest.approx((20 + 10) / 2000)  # A gained 20 images, B lost 10: A - B = 30 / 2000
    sd = np.sqrt((20 + 10) / 2000 - d**2) / np.sqrt(2000)  # sd of the mean paired difference
    assert abs(dlo - (d - 1.96 * sd)) < 0.005 and abs(dhi - (d + 1.96 * sd)) < 0.005


def test_mcnemar_is_the_exact_binomial_on_the_discordant_pairs():
    from scipy.stats import binomtest

    from pipeline.report import stats

    a = np.array([1] * 50 + [1] * 12 + [0] * 3 + [0] * 35, dtype=bool)  # 12 won by A, 3 by B
    b = np.array([1] * 50 + [0] * 12 + [1] * 3 + [0] * 35, dtype=bool)
    only_a, only_b, p = stats.mcnemar(a, b)
    assert (only_a, only_b) == (12, 3)
    assert p == pytest.approx(binomtest(12, 15, 0.5).pvalue) and p < 0.05
    assert stats.mcnemar(a, a)[2] == 1.0


def _write_preds(path, correct: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(correct)
    y = np.arange(n) % 3
    pd.DataFrame(
        {
            "id": [f"t{i}" for i in range(n)],
            "y_true": y,
            "y_pred": np.where(correct, y, (y + 1) % 3),
            "true": "c",
            "pred": "c",
        }
    ).to_csv(path, index=False)


@pytest.mark.parametrize("stop", ["early_stopping", "epoch_cap"])
def test_verdict_states_ci_mcnemar_and_the_baseline(tmp_path, stop):
    cfg = _report_cfg(tmp_path)
    art = tmp_path / "artifacts"
    base = np.arange(400) % 10 != 0  # 90% right
    head = base.copy()
    head[[1, 2, 3, 4]] = False  # the fine-tune alone gets 4 images right, the head alone 2
    head[[10, 20]] = True
    rows = [
        dict(
            method="finetune",
            test_accuracy=base.mean(),
            val_accuracy=0.9,
            train_seconds=400.0,
            extract_seconds=0.0,
            predictions="ft.csv",
            params=json.dumps(
                {
                    "epochs": [2, 30],
                    "epochs_run": [2, 3],
                    "best_epochs": [2, 1],
                    "unfreeze_layers": -1,
                    "stop": stop,
                    "learning_rate_finetune": 1e-4,
                    "lr_search": {"1e-05": 0.84, "0.0001": 0.85, "0.001": 0.82},
                    "lr_search_rung2": {"1e-05": 0.84, "0.0001": 0.87},
                    "lr_search_within_noise": stop == "epoch_cap",  # both ways, once each (a row's older layout)
                    "search_seconds": 150.0,
                }
            ),
        ),
        dict(
            method="logreg",
            test_accuracy=head.mean(),
            val_accuracy=0.95,
            train_seconds=10.0,
            extract_seconds=30.0,
            predictions="lr.csv",
            params="{}",
        ),
    ]
    _write_preds(art / "ft.csv", base)
    _write_preds(art / "lr.csv", head)
    for r in rows:
        upsert(
            results_path(cfg.artifacts, "d"),
            dict(dataset="d", backbone="b0", features="image", n_train=300, n_test=400, **r),
        )
    out = report.run(cfg)
    text = (out.parent / "report.md").read_text()
    first = text.split("## Comparison")[0]
    delta = (head.mean() - base.mean()) * 100
    assert (
        f"Best frozen head (by validation accuracy): logreg — {head.mean():.4f} vs {base.mean():.4f} fine-tuned"
        in first
    )
    assert f"{delta:+.2f} pt (95% CI " in first and "no significant difference" in first and "10× cheaper" in first
    assert "2 + 3 epochs (head, then every backbone layer trained) of at most 2 + 30" in first
    assert "kept epoch 2 and 1" in first and "300 images" in first
    rate = "phase-2 learning rate 0.0001 chosen on val from 1e-05, 0.0001, 0.001 (then rung 2 between 1e-05, 0.0001"
    noise = ", its lead still within the validation noise)" if stop == "epoch_cap" else ")"
    assert rate + noise in first
    assert "400 s (learning-rate search 150 s + training 250 s)" in first
    line = next(x for x in first.splitlines() if "Best frozen head" in x)
    capped = "The fine-tune was still improving when its epoch cap stopped it" in line
    assert capped == (stop == "epoch_cap") and ("hit its epoch cap" in first) == capped
    summary = pd.read_csv(out.parent / "summary.csv").set_index("method")
    lo, hi = summary.loc["logreg", ["delta_ci_low", "delta_ci_high"]]
    assert lo < delta < hi and 0 < summary.loc["logreg", "mcnemar_p"] <= 1
    assert summary.loc["finetune", "acc_ci_low"] < base.mean() < summary.loc["finetune", "acc_ci_high"]


def test_two_backbones_make_one_report_with_both(tmp_path):
    cfg = _report_cfg(tmp_path)
    rows = _results().to_dict("records")
    rows.append({**rows[0], "backbone": "resnet50", "test_accuracy": 0.85})
    for row in rows:
        upsert(results_path(cfg.artifacts, "d"), {**row, "n_train": 100})
    out = report.run(cfg)
    summary = pd.read_csv(out.parent / "summary.csv")
    assert set(summary["backbone"]) == {"efficientnet_lite0", "resnet50"}
    text = (out.parent / "report.md").read_text()
    best = text.split("## Best per backbone")[1].split("##")[0]
    assert "| efficientnet_lite0 | linear_svm |" in best and "| resnet50 | logreg |" in best
    assert "efficientnet_lite0: Best frozen head" in text and "resnet50: Best frozen head" in text


def test_when_metadata_wins_the_verdict_also_gives_the_images_alone(tmp_path):
    cfg = _report_cfg(tmp_path)
    art = tmp_path / "artifacts"
    truth = {"ft": np.arange(400) % 10 != 0, "img": np.arange(400) % 8 != 0, "meta": np.arange(400) % 20 != 0}
    rows = [
        dict(method="finetune", features="image", val_accuracy=0.9, train_seconds=400.0, predictions="ft.csv"),
        dict(method="ridge", features="image", val_accuracy=0.88, train_seconds=5.0, predictions="img.csv"),
        dict(method="ridge", features="image+meta", val_accuracy=0.95, train_seconds=6.0, predictions="meta.csv"),
    ]
    for r in rows:
        correct = truth[r["predictions"].removesuffix(".csv")]
        _write_preds(art / r["predictions"], correct)
        upsert(
            results_path(cfg.artifacts, "d"),
            dict(
                dataset="d",
                backbone="b0",
                n_train=300,
                n_test=400,
                test_accuracy=correct.mean(),
                extract_seconds=10.0,
                params="{}",
                **r,
            ),
        )
    out = report.run(cfg)
    first = (out.parent / "report.md").read_text().split("## Comparison")[0]
    img, meta, ft = (truth[k].mean() for k in ("img", "meta", "ft"))
    assert f"Best frozen head (by validation accuracy): ridge + meta — {meta:.4f}" in first
    assert (
        f"Images alone, the best head is ridge: {img:.4f}, {(img - ft) * 100:+.2f} pt vs the fine-tune (95% CI "
        in first
    )
    assert f"the metadata adds {(meta - img) * 100:+.2f} pt." in first


def test_crowded_point_labels_do_not_overlap():
    from pipeline.report.plots import accuracy_vs_time_figure

    heads = ["ridge", "logreg", "linear_svm", "rbf_svm", "mlp", "knn"]
    rows = [
        dict(
            backbone="b0",
            method=m,
            features=f,
            layers=layers,
            status="ok",
            total_seconds=170.0 + 0.1 * i,
            test_accuracy=0.88 + 0.0001 * (i % 3),
        )
        for i, (m, f, layers) in enumerate(
            [(m, "image", lay) for m in heads for lay in ("last", "all")] + [("ridge", "image+meta", "all")]
        )
    ]
    rows.append(
        dict(
            backbone="b0",
            method="finetune",
            features="image",
            layers="",
            status="ok",
            total_seconds=1000.0,
            test_accuracy=0.876,
        )
    )
    fig = accuracy_vs_time_figure(pd.DataFrame(rows), "d")
    fig.canvas.draw()
    ax = fig.axes[0]
    boxes = [t.get_window_extent() for t in ax.texts]
    assert len(boxes) == len(rows)
    overlaps = [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    assert not overlaps, [(ax.texts[i].get_text(), ax.texts[j].get_text()) for i, j in overlaps]


def test_a_head_scored_on_fewer_test_images_is_compared_on_the_common_ones(tmp_path):
    """--metadata-missing drop left 40 test images out of the head's predictions, all ones the fine-tune got
    wrong: its accuracy on those 360 against the fine-tune's on all 400 reads +9.2 pt; on the same images it is
    -0.8 pt."""
    from pipeline.report.stats import mcnemar, paired_delta_ci

    cfg = _report_cfg(tmp_path)
    art = tmp_path / "artifacts"
    ft = np.arange(400) % 10 != 0  # 90% right; the 40 wrong ones are ids 0, 10, 20, ...
    head = ft.copy()
    head[[1, 2, 3]] = False
    kept = np.arange(400) % 10 != 0  # the head has no metadata row for exactly the fine-tune's misses
    _write_preds(art / "ft.csv", ft)
    _write_preds(art / "meta.csv", head)
    pred = pd.read_csv(art / "meta.csv")
    pred[kept].to_csv(art / "meta.csv", index=False)
    for method, features, correct, file in (
        ("finetune", "image", ft, "ft.csv"),
        ("ridge", "image+meta", head[kept], "meta.csv"),
    ):
        upsert(
            results_path(cfg.artifacts, "d"),
            dict(
                dataset="d",
                backbone="b0",
                method=method,
                features=features,
                n_train=300,
                n_test=len(correct),
                test_accuracy=correct.mean(),
                val_accuracy=0.9,
                train_seconds=50.0,
                extract_seconds=1.0,
                params="{}",
                predictions=file,
            ),
        )
    out = report.run(cfg)
    text = (out.parent / "report.md").read_text()
    first = text.split("## Comparison")[0]
    paired_delta = (head[kept].mean() - ft[kept].mean()) * 100
    assert head[kept].mean() - ft.mean() > 0.09  # the unpaired difference: +9.3 pt
    assert f"{head[kept].mean():.4f} on its 360 test images vs {ft.mean():.4f} fine-tuned on 400" in first
    assert f"on the 360 images both scored {paired_delta:+.2f} pt" in first
    summary = pd.read_csv(out.parent / "summary.csv")
    row = summary[(summary["method"] == "ridge") & (summary["status"] == "ok")].iloc[0]
    assert row["n_paired"] == 360 and row["delta_pt"] == pytest.approx(paired_delta)
    assert row["mcnemar_p"] == pytest.approx(mcnemar(head[kept], ft[kept])[2])
    _, lo, hi = paired_delta_ci(head[kept], ft[kept])
    assert (row["delta_ci_low"], row["delta_ci_high"]) == pytest.approx((lo * 100, hi * 100))
    assert f"{paired_delta:+.2f} (on 360 paired)" in text.split("## Comparison")[1]


@pytest.mark.parametrize("replicas", [1, 4])
def test_a_fine_tune_on_several_devices_is_also_charged_device_seconds(replicas):
    from pipeline.report.verdict import device_time

    head = pd.Series({"total_seconds": 40.0})
    devices = {"replicas": replicas, "strategy": "MultiWorkerMirroredStrategy over 4 Ray workers", "workers": 4}
    ft = pd.Series({"total_seconds": 400.0, "params": json.dumps({"devices": devices})})
    text = device_time(head, ft)
    if replicas == 1:
        assert text == ""  # one device: the wall-clock ratio is the whole story
    else:
        assert "1,600 device-s vs 40" in text and "40.0× the head's" in text and "4 Ray workers" in text
