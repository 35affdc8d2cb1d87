"""The forecast: known curves recovered, intervals that widen where they should, the "cannot tell" path, its
cost model, its table, bad inputs, and the stage end to end on the tiny backbone (reuse, resume, budget)."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import results
from pipeline.errors import PipelineError
from pipeline.forecast import calibration, curves, record, stage
from pipeline.forecast.cost import CostModel, Run
from pipeline.forecast.decide import forecast
from pipeline.forecast.evidence import Evidence, gather


def _pow3(n, alpha=0.05, eta=2.0, gamma=-0.5):
    return 1 - (alpha + eta * np.asarray(n, float) ** gamma)


def test_a_known_power_law_is_recovered():
    n = np.array([100, 200, 400, 800, 1600, 3200])
    pts = curves.Points(n, _pow3(n), np.full(len(n), 1e-4))
    p = curves.fit(curves.FORMS["pow3"], pts, scale=1.0)
    assert p[0] == pytest.approx(0.05, abs=2e-3)
    assert np.exp(p[1]) == pytest.approx(2.0, rel=0.05)
    assert p[2] == pytest.approx(-0.5, abs=0.02)
    ens = curves.Ensemble(pts)
    assert ens.accuracy(50_000)[0] == pytest.approx(_pow3(50_000), abs=0.003)
    assert curves.last_value(pts) == pytest.approx(_pow3(3200))


def test_held_out_error_weights_the_form_that_extrapolates():
    """On a curve with a floor, the plain power law (no floor) misses the held-out largest size most."""
    n = np.array([100, 200, 400, 800, 1600])
    pts = curves.Points(n, _pow3(n, alpha=0.15), np.full(len(n), 1e-3))
    errors = curves.holdout_errors(pts)
    assert abs(errors["pow2"]) > abs(errors["pow3"])
    w = curves.form_weights(pts)
    assert w["pow3"] > w["pow2"] and sum(w.values()) == pytest.approx(1)


def _evidence(sizes, acc=None, seed_sd=0.005, n_test=2000, head=0.85, n_full=10_000):
    sizes = np.asarray(sizes, float)
    acc = _pow3(sizes) if acc is None else np.asarray(acc, float)
    n = np.concatenate([sizes, sizes[:1]])  # the smallest size twice: two training seeds
    a = np.concatenate([acc, acc[:1] + seed_sd])
    sd = np.sqrt(a * (1 - a) / n_test + seed_sd**2)
    hn = np.array([*sizes, n_full], float)
    runs = [Run(int(s), 10.0, 5.0 + s / 100, 8 * (2 + s / 50), 8) for s in sizes]
    return Evidence(
        finetune=curves.Points(n, a, sd),
        seed_sd=seed_sd,
        seed_n=float(sizes[0]),
        n_test=n_test,
        runs=runs,
        head="logreg@all",
        head_curve=curves.Points(hn, np.full(len(hn), head), np.full(len(hn), 0.008)),
        forecast_seconds=123.0,
        measured_full=float("nan"),
    )


def _forecast(ev, target, n_full=10_000, cases=None):
    cases = cases if cases is not None else [calibration.Case("a", 2000, 500, 0.90, 0.89)]
    kw = dict(dataset="toy", backbone="tiny", n_full=n_full, max_epochs=30, draws=40)
    return forecast(ev, target=target, cases=cases, **kw)


def test_the_interval_widens_with_extrapolation_and_with_fewer_points():
    ev = _evidence([250, 500, 1000, 2000], seed_sd=0.01)
    near, far = _forecast(ev, 4000), _forecast(ev, 20_000)
    assert far.high - far.low > near.high - near.low
    assert far.extrapolation_sd > near.extrapolation_sd > 0
    fewer = _forecast(_evidence([500, 1000, 2000], seed_sd=0.01), 20_000)
    assert fewer.fit_sd > far.fit_sd
    assert fewer.high - fewer.low > far.high - far.low
    assert near.low < near.accuracy < near.high


def test_the_forecast_says_cannot_tell_when_its_interval_holds_the_head_and_names_the_next_size():
    ev = _evidence([250, 500, 1000], head=float(_pow3(10_000)))  # the head sits on the forecast
    f = _forecast(ev, 10_000)
    assert f.status == "cannot tell" and not f.decided
    assert f.next_n == 2000 and f.next_seconds > 0
    text = stage.sentence(f, _forecast(ev, 20_000), [250, 500, 1000])
    assert text.startswith("Cannot tell yet") and "--ladder 250 500 1000 2000" in text
    clear = _forecast(_evidence([250, 500, 1000], head=0.5), 10_000)
    assert clear.decided and clear.p_beats_head > 0.99 and math.isnan(clear.next_n)
    assert clear.crossover_n == pytest.approx(250)  # beats a poor head from the smallest size on
    beyond = _forecast(_evidence([25, 50, 100], head=0.5), 10_000)
    assert beyond.ratio == 100 and beyond.status == "cannot tell"  # 100x: beyond any honest extrapolation


def test_the_crossover_is_where_the_fine_tune_passes_a_rising_head():
    sizes = np.array([250, 500, 1000, 2000])
    ev = _evidence(sizes, head=float(_pow3(5000)))
    f = _forecast(ev, 10_000)
    assert 2000 < f.crossover_n < 10_000
    assert f.crossover_low <= f.crossover_n <= f.crossover_high or math.isnan(f.crossover_high)


def _cost_run(n: int, search_epochs: float = 1.5) -> Run:
    """A fine-tune whose epoch costs 5 + n/10 s, whose phase 2 runs 3·(n/100)^½ epochs and whose search costs
    ``search_epochs`` of those epochs."""
    epochs = round(3 * (n / 100) ** 0.5)
    return Run(n, 2 + n / 100, search_epochs * (5 + n / 10), (5 + n / 10) * epochs, epochs)


def test_the_cost_model_recovers_linear_epochs_and_a_growing_epoch_count():
    runs = [_cost_run(n) for n in (100, 400, 1600)]
    model = CostModel.fit(runs, max_epochs=30)
    for r in runs:
        assert model.seconds(r.n) == pytest.approx(r.seconds, rel=0.02)
    assert model.search_epochs == pytest.approx(1.5)
    assert model.phase_two_epochs(6400) == pytest.approx(24, rel=0.05)
    assert model.phase_two_epochs(10**6) == 30  # capped at --epochs-finetune


def test_a_search_that_needed_one_more_rung_at_one_size_does_not_become_a_slope():
    runs = [_cost_run(100), _cost_run(400), _cost_run(1600, search_epochs=4.5)]  # a second rung at the largest
    model = CostModel.fit(runs, max_epochs=30)
    assert model.search_epochs == pytest.approx(1.5)
    assert model.seconds(6400) == pytest.approx(_cost_run(6400).seconds, rel=0.05)


def test_backtest_cases_calibrate_the_extrapolation_error():
    cases = [calibration.Case("x", 4000, 1000, 0.90, 0.88), calibration.Case("y", 2000, 1000, 0.90, 0.91)]
    kappa = calibration.error_per_log_ratio(cases)
    assert kappa == pytest.approx(np.sqrt(((0.02 / np.log(4)) ** 2 + (0.01 / np.log(2)) ** 2) / 2))
    assert calibration.extrapolation_sd(1.0, cases) == 0
    assert calibration.extrapolation_sd(8.0, cases) == pytest.approx(kappa * np.log(8))
    shipped = calibration.read_cases()
    assert shipped and all(c.ratio > 1 for c in shipped)  # the package ships measured backtests
    assert all(c.case != shipped[0].case for c in calibration.read_cases(leave_out=shipped[0].case))


def test_the_record_round_trips_and_a_renamed_field_fails(tmp_path):
    f = _forecast(_evidence([250, 500, 1000]), 10_000)
    path = tmp_path / "results" / "toy.forecast.csv"
    record.write(path, [f])
    (back,) = record.read(path)
    assert back.accuracy == pytest.approx(f.accuracy) and back.status == f.status and back.best_head == "logreg@all"
    assert math.isnan(back.measured_accuracy) and back.version == record.VERSION
    record.write(path, [f])  # the same target again: replaced, not appended
    assert len(pd.read_csv(path)) == 1
    table = pd.read_csv(path).rename(columns={"p_beats_head": "p_beats"})
    table.to_csv(path, index=False)
    with pytest.raises(PipelineError, match="no field.*p_beats_head.*unknown field.*p_beats"):
        record.read(path)


@pytest.mark.parametrize(
    ("sizes", "n_full", "message"),
    [
        ((10, 20), 100, "at least 3 sizes"),
        ((4, 10, 20), 100, "under 2 images per class"),
        ((10, 20, 100), 100, "not below the 100 training images"),
        ((), 20, "too few to forecast"),
    ],
)
def test_a_bad_ladder_is_one_line_that_names_the_fix(sizes, n_full, message):
    with pytest.raises(PipelineError, match=message) as e:
        stage.ladder(n_full, 3, sizes, points=3, top=0.2)
    assert "\n" not in str(e.value)


def test_the_default_ladder_doubles_up_to_a_fifth():
    assert stage.ladder(3000, 10, (), points=3, top=0.2) == [150, 300, 600]
    assert stage.seconds("1h") == 3600 and stage.seconds("2.5h") == 9000 and stage.seconds("90") == 90
    with pytest.raises(PipelineError, match="not a duration"):
        stage.seconds("an hour")


def test_evidence_needs_two_seeds_somewhere_and_the_heads_at_full_size():
    rows = [_row("finetune", n, 0.8) for n in (6, 12, 24)] + [{**_row("ridge", 60, 0.85), "backbone": "tiny@16px"}]
    with pytest.raises(PipelineError, match="--ladder-seeds 2"):
        gather(pd.DataFrame(rows).assign(seed=np.nan), "tiny", "tiny@16px", [6, 12, 24], 60)
    rows.append({**_row("finetune", 6, 0.78), "seed": 1})
    ev = gather(pd.DataFrame(rows), "tiny", "tiny@16px", [6, 12, 24], 60)
    assert ev.head == "ridge" and ev.seed_sd == pytest.approx(np.std([0.8, 0.78], ddof=1))
    with pytest.raises(PipelineError, match="make svm"):
        gather(pd.DataFrame(rows[:3] + rows[4:]), "tiny", "tiny@16px", [6, 12, 24], 60)


def _row(method, n, acc):
    params = {"phase_seconds": [1.0, 8.0], "epochs_run": [1, 4]}
    return {
        "backbone": "tiny", "method": method, "features": "image", "layers": "last", "n_train": n, "seed": None,
        "val_accuracy": acc, "test_accuracy": acc, "n_test": 30, "train_seconds": 10.0, "tune_seconds": 1.0,
        "params": json.dumps(params),
    }  # fmt: skip


def _ladder_config(root, artifacts):
    """60 training images (20 a class), forecast from fine-tunes at 6 (two seeds), 12 and 24."""
    import conftest

    from pipeline.config import Config

    c = Config()
    c.artifacts, c.data.dataset = str(artifacts), str(root)
    c.backbone.backbone, c.backbone.weights, c.extract.batch_size = conftest.TINY, "none", 4
    c.extract.runtimes_dir = str(conftest.SHARED_RUNTIMES or "")
    c.heads.heads, c.heads.layers, c.heads.features = ("ridge", "logreg"), ("last",), ("image",)
    c.finetune.epochs_head = c.finetune.epochs_finetune = 1
    c.finetune.batch_size = 6
    c.finetune.lr_grid = (1e-3,)
    c.forecast.ladder = (6, 12, 24)
    return c


@pytest.fixture(scope="module")
def ladder_run(tmp_path_factory):
    """The stage run once on the tiny backbone for the whole session: the first xdist worker to get here
    trains it under a lock, the other waits for it. Each works on its own copy, where the stage runs again
    (every point reused) for its result; tests that change the artifacts work on a copy of that."""
    from conftest import session_folder, write_images

    from pipeline import lock
    from pipeline.extract import stage as extract

    built = session_folder(tmp_path_factory) / "ladder-built"
    with lock.exclusive(built):
        if not (built / "done").exists():
            for k, (split, n) in enumerate((("train", 20), ("val", 5), ("test", 10))):
                write_images(built / "ladder" / split, n, seed=10 + k)
            cfg = _ladder_config(built / "ladder", built / "artifacts")
            extract.run(cfg)
            stage.run(cfg)
            (built / "done").touch()
    base = tmp_path_factory.mktemp("ladder")
    shutil.copytree(built, base, dirs_exist_ok=True, symlinks=True)  # timestamps kept: everything up to date
    cfg = _ladder_config(base / "ladder", base / "artifacts")
    return cfg, stage.run(cfg)


@pytest.fixture
def ladder_cfg(ladder_run, tmp_path):
    """A copy of the run's artifacts, to change."""
    import copy
    import shutil

    cfg = copy.deepcopy(ladder_run[0])
    shutil.copytree(cfg.artifacts, tmp_path / "artifacts")
    cfg.artifacts = str(tmp_path / "artifacts")
    return cfg


def _trained(monkeypatch, kill_at: str | None = None):
    """The works (folders) every fine-tune phase trains in, in order; ``kill_at``: interrupt that work's phase 2."""
    from pipeline import finetune

    real, seen = finetune.phases.fit_phase, []

    def spy(model, phase, epochs, train, val, c, work, **kw):
        seen.append((work.name, phase))
        if kill_at and kill_at in work.name and phase == 2:
            raise KeyboardInterrupt
        return real(model, phase, epochs, train, val, c, work, **kw)

    monkeypatch.setattr(finetune.phases, "fit_phase", spy)
    return seen


@pytest.mark.slow
def test_the_stage_measures_the_ladder_forecasts_and_reuses_every_point(ladder_run, monkeypatch, capsys):
    cfg, (full, double) = ladder_run
    table = results.read_results(results.results_path(cfg.artifacts, "ladder"))
    ft = table[table["method"] == "finetune"]
    assert sorted(zip(ft["n_train"], ft["seed"].fillna(-1))) == [(6, -1), (6, 1), (12, -1), (24, -1)]
    assert sorted(set(table.loc[table["method"] == "ridge", "n_train"])) == [6, 12, 24, 60]
    assert (full.target_n, double.target_n, full.n_full) == (60, 120, 60)
    assert full.measured_sizes == "6 12 24" and full.ratio == 2.5 and full.best_head in ("ridge", "logreg")
    assert full.low <= full.accuracy <= full.high and full.cost_seconds > 0 and full.forecast_seconds > 0
    assert [r.target_n for r in record.read(record.path(cfg.artifacts, "ladder"))] == [60, 120]
    band = record.read_band(record.band_path(cfg.artifacts, "ladder"))
    assert band["n"].min() == 6 and band["n"].max() == pytest.approx(120) and (band["low"] <= band["high"]).all()

    trained = _trained(monkeypatch)
    again = stage.run(cfg)  # nothing changed: every point reused, nothing trained, the same forecast
    assert trained == []
    assert again[0].accuracy == pytest.approx(full.accuracy)
    out = capsys.readouterr().out
    assert ("images is forecast at" in out or "Cannot tell yet" in out) and "Measured error of such forecasts" in out


@pytest.mark.slow
def test_over_its_budget_the_stage_prints_the_command_and_does_not_fine_tune(ladder_cfg, monkeypatch, capsys):
    ladder_cfg.forecast.finetune_budget = "1s"
    trained = _trained(monkeypatch)
    stage.run(ladder_cfg)
    out = capsys.readouterr().out
    assert trained == [] and "over the --finetune-budget of 1 s: not run" in out
    command = out.split("To run it:\n")[1].strip().splitlines()[0]
    assert command.startswith("python -m pipeline finetune --dataset ") and "--lr-grid 0.001" in command
    table = results.read_results(results.results_path(ladder_cfg.artifacts, "ladder"))
    assert 60 not in set(table.loc[table["method"] == "finetune", "n_train"])

    ladder_cfg.forecast.finetune_budget = "10h"
    stage.run(ladder_cfg)
    assert {w for w, _ in trained} == {"tiny_cnn-finetuned.work"}  # within budget: only the full fine-tune ran
    table = results.read_results(results.results_path(ladder_cfg.artifacts, "ladder"))
    assert 60 in set(table.loc[table["method"] == "finetune", "n_train"])


@pytest.mark.slow
def test_an_interrupted_ladder_resumes_and_trains_nothing_twice(ladder_cfg, monkeypatch):
    models = Path(ladder_cfg.artifacts) / "models" / "ladder"
    for f in [*models.glob("*-n12*"), *models.glob("*-n24*")]:  # as if the run had stopped after its first size
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    seen = _trained(monkeypatch, kill_at="-n12")
    with pytest.raises(KeyboardInterrupt):
        stage.run(ladder_cfg)
    assert seen == [("tiny_cnn-finetuned-n12.work", 1), ("tiny_cnn-finetuned-n12.work", 2)]
    monkeypatch.undo()
    trained = _trained(monkeypatch)
    stage.run(ladder_cfg)
    assert trained == [("tiny_cnn-finetuned-n12.work", 2), ("tiny_cnn-finetuned-n24.work", 1),
                       ("tiny_cnn-finetuned-n24.work", 2)]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("ladder", "message"), [((6, 12), "at least 3 sizes"), ((6, 12, 60), "not below")])
def test_a_bad_ladder_writes_nothing(ladder_cfg, ladder, message):
    def files():
        return {p: p.stat().st_mtime_ns for p in Path(ladder_cfg.artifacts).rglob("*") if p.is_file()}

    before = files()
    ladder_cfg.forecast.ladder = ladder
    with pytest.raises(PipelineError, match=message):
        stage.run(ladder_cfg)
    assert files() == before


@pytest.mark.slow
def test_make_demo_on_a_users_folder_stops_after_the_forecast_when_over_budget(tmp_path):
    """`make demo DATA=<folder>` forecasts before it fine-tunes; over BUDGET it prints the forecast and the
    command for the full fine-tune, runs nothing more, and still writes the report with the forecast in it."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import keras
    from conftest import write_images

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    repo = Path(__file__).resolve().parents[1]
    data = write_images(tmp_path / "my_photos", 30)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="c1")(inputs)
    keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="gap")(x)).save(tmp_path / "tiny.keras")
    (tmp_path / "run.toml").write_text(
        "[heads]\nheads = ['ridge']\nlayers = ['last']\n[extract]\ntaps = ['none']\nbatch_size = 8\n"
        "[finetune]\nepochs_head = 1\nepochs_finetune = 1\nbatch_size = 6\nlr_grid = [0.001]\n"
        "[forecast]\nladder = [6, 9, 12]\n"
    )
    venv = Path(sys.executable).parent.parent
    stamp = venv / ".installed-cpu"
    art = tmp_path / "artifacts"
    cmd = ["make", "-C", str(repo), "-o", str(stamp), "demo", f"VENV={venv}", f"DATA={data}", f"ARTIFACTS={art}",
           f"BACKBONE={tmp_path / 'tiny.keras'}", f"CONFIG={tmp_path / 'run.toml'}", "BUDGET=1s"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "over the --finetune-budget of 1 s: not run. To run it:" in done.stdout
    assert "python -m pipeline finetune --dataset" in done.stdout
    table = results.read_results(results.results_path(art, "my_photos"))
    ft = table[table["method"] == "finetune"]
    assert sorted(set(ft["n_train"])) == [6, 9, 12]  # the ladder only: the full fine-tune was not run
    report = (art / "reports" / "my_photos" / "report.md").read_text()
    assert "**Forecast, not measured**" in report and "## Forecast" in report


def test_the_report_labels_the_forecast_and_sets_it_beside_a_measured_fine_tune(tmp_path):
    from pipeline.forecast import decide
    from pipeline.report import forecast as section

    ev = _evidence([250, 500, 1000])
    curves = decide.build(ev, [], 20_000, draws=20)
    kw = dict(dataset="toy", backbone="tiny", n_full=10_000, max_epochs=30)
    records = [decide.at(curves, target=t, **kw) for t in (10_000, 20_000)]
    band = decide.band(curves).assign(backbone="tiny")
    small = [{**_row("finetune", n, 0.8), "seed": np.nan} for n in (250, 500, 1000)]
    lines = section.verdict_lines(records, measured_full=set())
    assert len(lines) == 1 and lines[0].startswith("**Forecast, not measured** (tiny):")
    assert "Measured error of such forecasts" in lines[0]
    assert section.verdict_lines(records, measured_full={"tiny"}) == []
    out = section.sections(records, band, pd.DataFrame(small), tmp_path, "toy")
    assert out[0][0] == "Forecast" and (tmp_path / "forecast_tiny.png").stat().st_size > 0
    assert list(out[1][1]["measured"]) == ["", ""]
    full = pd.DataFrame(small + [{**_row("finetune", 10_000, 0.93), "seed": np.nan}])
    out = section.sections(records, band, full, tmp_path, "toy")
    assert out[1][1]["measured"].iloc[0].startswith("0.9300 ("), out[0][1]
    assert "The full fine-tune was run: measured 0.9300" in out[0][1], out[0][1]


def test_the_printed_fine_tune_command_parses_back_to_the_forecast_recipe(cfg):
    """The command printed when the fine-tune is over budget, read by the real parser, gives back every data,
    backbone and fine-tune setting: flags named as the CLI names them (a name two sections share, a bool)."""
    import shlex
    from types import SimpleNamespace

    from pipeline import api
    from pipeline.cli import build_parser
    from pipeline.config import resolve_config
    from pipeline.forecast.text import budget_text

    cfg.finetune.batch_size = 12  # extract and heads have a batch_size too
    cfg.finetune.augment = ("flip",)
    cfg.finetune.resume = True
    cfg.finetune.lr_grid = (1e-3, 1e-2)
    cfg.backbone.mixed_precision = False
    text = budget_text(SimpleNamespace(cost_seconds=7200.0), 60.0, cfg)
    argv = shlex.split(text.splitlines()[-1])
    assert argv[:4] == ["python", "-m", "pipeline", "finetune"]
    back = resolve_config(build_parser().parse_args(argv[3:]))
    for section in api.STAGES["finetune"][1]:
        assert getattr(back, section) == getattr(cfg, section), section
