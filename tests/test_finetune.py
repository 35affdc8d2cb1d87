import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import copy_of, toy_config, toy_presplit

from pipeline import finetune, results
from pipeline.finetune import search
from pipeline.finetune.record import TIE_TO_LARGER, SearchRecord

pytestmark = pytest.mark.slow  # trains models, starts Ray or runs subprocesses: not in `make test-fast`


def _tiny_recipe(cfg):
    cfg.finetune.epochs_head = 1
    cfg.finetune.epochs_finetune = 1
    cfg.finetune.steps_per_epoch = 1
    cfg.finetune.batch_size = 6
    cfg.finetune.unfreeze_layers = -1
    cfg.finetune.learning_rate = 0.05
    cfg.finetune.lr_grid = (0.005,)  # no search: one phase-2 fit (the search has tests of its own)
    return cfg


@pytest.fixture
def ft_cfg(cfg):
    return _tiny_recipe(cfg)


def _backbone_weights(model):
    base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    return base, [w.copy() for w in base.get_weights()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One fine-tune of the tiny recipe, trained once for the tests that only watch or read it: what each
    phase did to the backbone (trainable weights, weights and BatchNorm statistics before and after) and
    the first test pass's predictions (phase 1's model), beside the folder it wrote."""
    base = tmp_path_factory.mktemp("trained")
    toy_presplit(base)
    cfg = _tiny_recipe(toy_config(base))
    seen, first_pred = {}, {}
    real_fit, real_predict = finetune.phases.fit_phase, finetune.train._predict

    def spy(model, phase, *a, **k):
        backbone, before = _backbone_weights(model)
        bn = backbone.get_layer("bn1")
        mean = bn.moving_mean.numpy().copy()
        seen[phase] = {"trainable": len(backbone.trainable_weights), "before": before}
        out = real_fit(model, phase, *a, **k)
        seen[phase]["after"] = _backbone_weights(model)[1]
        seen[phase]["bn_unchanged"] = np.array_equal(mean, bn.moving_mean.numpy())
        return out

    def predict_spy(model, ds, split, *a):
        out = real_predict(model, ds, split, *a)
        first_pred.setdefault("pred", out[2])  # the first test pass: right after phase 1
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(finetune.phases, "fit_phase", spy)
        mp.setattr(finetune.train, "_predict", predict_spy)
        res = finetune.run(cfg)
    return base, seen, first_pred["pred"], res


@pytest.fixture
def trained_cfg(trained, tmp_path):
    """A copy of the trained fine-tune's folder, this test's own to change."""
    return _tiny_recipe(copy_of(trained[0], tmp_path))


def test_phase_two_unfreezes_and_changes_the_backbone_while_phase_one_does_not(trained, trained_cfg):
    _, seen, _, res = trained
    assert seen[1]["trainable"] == 0
    assert all(np.array_equal(a, b) for a, b in zip(seen[1]["before"], seen[1]["after"]))
    assert seen[2]["trainable"] > 0
    conv_kernel = 0  # conv1's kernel is the backbone's first weight
    assert not np.allclose(seen[2]["before"][conv_kernel], seen[2]["after"][conv_kernel])
    assert len(res.phase_seconds) == 2 and res.train_seconds > 0 and res.epochs_run == [1, 1]

    row = results.read_results(results.results_path(trained_cfg.artifacts, "toy")).iloc[0]
    assert (row["method"], row["features"], row["n_test"]) == ("finetune", "image", 9)
    assert row["train_seconds"] == pytest.approx(res.train_seconds)
    assert json.loads(row["params"])["epochs_run"] == [1, 1]
    path = finetune.model_path(trained_cfg)
    reloaded = keras.models.load_model(path)  # preprocessing layer is serialisable
    assert reloaded.output_shape == (None, 3)
    pred = pd.read_csv(path.with_name("tiny_cnn-finetuned.predictions.csv"))
    assert len(pred) == 9 and set(pred.columns) >= {"id", "y_true", "y_pred"}
    assert not path.with_name("tiny_cnn-finetuned.work").exists()


def test_batchnorm_stays_in_inference_mode_when_unfrozen(trained):
    seen = trained[1]
    assert {phase: seen[phase]["bn_unchanged"] for phase in seen} == {1: True, 2: True}


def test_interrupted_finetune_resumes_after_the_finished_phase(ft_cfg, monkeypatch):
    real = finetune.phases.fit_phase
    calls = []

    def crash_in_phase_two(model, phase, *a, **k):
        calls.append(phase)
        if phase == 2 and calls.count(2) == 1:
            raise KeyboardInterrupt
        return real(model, phase, *a, **k)

    monkeypatch.setattr(finetune.phases, "fit_phase", crash_in_phase_two)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(ft_cfg)
    ft_cfg.finetune.resume = True
    res = finetune.run(ft_cfg)
    assert calls == [1, 2, 2]  # phase 1 was not trained again
    assert len(res.phase_seconds) == 2


def test_report_of_a_finetuned_model_has_confusion_matrices_and_gradcam(trained_cfg):
    from pipeline import report

    model = keras.models.load_model(finetune.model_path(trained_cfg))
    cams, cls = report.gradcam(model, np.full((2, 16, 16, 3), 100.0, np.float32))
    assert cams.shape == (2, 16, 16) and cams.min() >= 0 and cams.max() <= 1 and cls.shape == (2,)
    out = report.run(trained_cfg)
    d = out.parent
    assert (d / "gradcam.png").exists() and (d / "confusion_0_finetune.png").exists()
    text = (d / "report.md").read_text()
    assert (
        "Grad-CAM" in text
        and "fine-tuned tiny_cnn" in text
        and "| tiny_cnn | finetune | " in text
        and "| tiny_cnn | frozen_dense | " in text
    )


def test_frozen_dense_is_phase_one_scored_as_its_own_method(trained, trained_cfg):
    _, _, phase_one_pred, res = trained
    table = results.read_results(results.results_path(trained_cfg.artifacts, "toy")).set_index("method")
    dense = table.loc["frozen_dense"]
    assert dense["train_seconds"] == pytest.approx(res.phase_seconds[0])  # charged phase 1 only
    assert dense["train_seconds"] < table.loc["finetune", "train_seconds"]
    saved = pd.read_csv(finetune.model_path(trained_cfg).with_name("tiny_cnn-frozen_dense.predictions.csv"))
    assert (saved["y_pred"].to_numpy() == phase_one_pred).all()
    assert dense["test_accuracy"] == pytest.approx((saved["y_true"] == saved["y_pred"]).mean())


def test_unchanged_inputs_reuse_the_fine_tune_and_a_changed_setting_redoes_it(trained_cfg, monkeypatch, capsys):
    ft_cfg = trained_cfg
    first = finetune.run(ft_cfg)
    before = results.read_results(results.results_path(ft_cfg.artifacts, "toy"))

    def no_fitting(*a, **k):
        raise AssertionError("fitted although nothing changed")

    real = finetune.phases.fit_phase
    monkeypatch.setattr(finetune.phases, "fit_phase", no_fitting)
    again = finetune.run(ft_cfg)
    assert "up to date" in capsys.readouterr().out
    assert again.scores == first.scores and again.phase_seconds == first.phase_seconds
    after = results.read_results(results.results_path(ft_cfg.artifacts, "toy"))
    pd.testing.assert_frame_equal(before, after)

    calls = []
    monkeypatch.setattr(
        finetune.phases, "fit_phase", lambda m, phase, *a, **k: calls.append(phase) or real(m, phase, *a, **k)
    )
    ft_cfg.finetune.learning_rate = 0.01  # a setting that changes the numbers
    finetune.run(ft_cfg)
    assert calls == [1, 2]
    ft_cfg.force = True
    finetune.run(ft_cfg)
    assert calls == [1, 2, 1, 2]


def test_seeds_train_one_model_and_row_each_and_the_report_gives_mean_and_sd(ft_cfg):
    from pipeline import heads, report
    from pipeline.extract import stage as extract

    ft_cfg.finetune.seeds = 3
    first = finetune.run(ft_cfg)
    table = results.read_results(results.results_path(ft_cfg.artifacts, "toy"))
    ft = table[table["method"] == "finetune"]
    assert sorted(ft["seed"].fillna(-1).astype(int)) == [-1, 1, 2]  # the configured seed's row, then seeds 1 and 2
    assert len(table[table["method"] == "frozen_dense"]) == 3
    seed1 = finetune.model_path(ft_cfg, extra_seed=1)
    a, b = keras.models.load_model(first.model_path), keras.models.load_model(seed1)
    assert not np.allclose(a.get_layer("head").get_weights()[0], b.get_layer("head").get_weights()[0])
    again = finetune.run(ft_cfg)  # every seed up to date: nothing retrained, the first seed's result returned
    assert again.model_path == first.model_path and again.train_seconds == first.train_seconds

    extract.run(ft_cfg)
    ft_cfg.heads.heads = ("ridge",)
    heads.run(ft_cfg)
    out = report.run(ft_cfg).parent
    text = (out / "report.md").read_text()
    accs = ft.sort_values("seed", na_position="first")["test_accuracy"].to_numpy()
    mean, sd = accs.mean(), accs.std(ddof=1)
    assert "## Fine-tune across training seeds" in text and f"{mean:.4f} ± {sd:.4f}" in text
    assert f"Across 3 training seeds the fine-tune scored {mean:.4f} ± {sd:.4f}" in text
    summary = pd.read_csv(out / "summary.csv")  # the extra seeds are a spread, not methods of their own
    assert (summary["method"] == "finetune").sum() == 1 and (summary["method"] == "frozen_dense").sum() == 1


def test_decoded_once_the_batches_are_the_pixels_and_orders_of_decoding_every_epoch(cfg, tmp_path):
    """In memory and spilled to disk: the same images, labels and per-epoch shuffles as the decode-each-epoch
    pipeline under the same seed."""
    from pipeline.data import from_config, image_dataset
    from pipeline.finetune import inputs

    ds = from_config(cfg)
    paths, labels = ds.paths("train"), ds.splits["train"].labels
    for budget, spill in ((2**30, False), (0, True)):
        every = image_dataset(paths, 16, 4, labels, shuffle_seed=7)
        dec = inputs.decode(paths, labels, 16, budget, tmp_path / f"train{budget}.npy")
        assert dec.spilled == spill and len(dec) == len(paths)
        once = inputs.batches(dec, 4, shuffle_seed=7)
        for _epoch in range(2):  # a new order each epoch, the same one on both sides
            pairs = list(zip(every, once, strict=True))
            assert len(pairs) == 5
            for (xa, ya), (xb, yb) in pairs:
                np.testing.assert_array_equal(xa.numpy(), xb.numpy())
                np.testing.assert_array_equal(ya.numpy(), yb.numpy())
    first, second = ([y.numpy() for _, y in once] for _ in range(2))
    assert any(not np.array_equal(a, b) for a, b in zip(first, second))  # reshuffled


def test_the_input_pipelines_run_without_tf_datas_autotuning(cfg, tmp_path):
    """Its model thread, joined when Keras drops an epoch's iterator, idled both cores ~10 s in 6 of 15 short
    fits of the demo model (benchmarks/NOTES.md): the fine-tune's batches (training and validation), the
    decoded test pass and the streaming probe's batches all switch it off."""
    from types import SimpleNamespace

    from pipeline.data import from_config, image_dataset
    from pipeline.finetune import inputs
    from pipeline.heads import probe

    ds = from_config(cfg)
    paths, labels = ds.paths("train"), ds.splits["train"].labels
    dec = inputs.decode(paths, labels, 16, 2**30, tmp_path / "train.npy")
    stream = SimpleNamespace(width=3)  # read only when iterated
    pipelines = [
        inputs.batches(dec, 4, shuffle_seed=7),
        inputs.batches(dec, 4),
        inputs.batches(dec, 4, 7, pad_to=len(dec) + 2),
        image_dataset(paths, 16, 4),
        probe._dataset(stream, 4, 2, seed=0),
    ]
    assert [p.options().autotune.enabled for p in pipelines] == [False] * len(pipelines)


def test_decode_leaves_out_an_unreadable_image_and_says_where(cfg, tmp_path):
    from pipeline.data import from_config
    from pipeline.finetune import inputs

    ds = from_config(cfg)
    paths, labels = ds.paths("train"), ds.splits["train"].labels
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    dec = inputs.decode([*paths[:3], str(bad), *paths[3:]], np.r_[labels[:3], 0, labels[3:]], 16, 2**30, tmp_path / "x")
    assert len(dec) == len(paths) and 3 not in dec.index
    np.testing.assert_array_equal(dec.labels, labels)


def test_a_searched_fine_tune_grows_its_rungs_continues_the_chosen_rate_and_is_charged_its_search(ft_cfg, monkeypatch):
    """Every rate ties (the noise planted wide): rung 1 trains each one epoch, rung 2 each three more from
    its own rung-1 weights, the larger rate is taken and continues from its rung-2 weights at epoch 4."""
    from pipeline.finetune import search

    seen, loaded = [], []
    real_fit, real_load = finetune.phases.fit_phase, finetune.phases.load_weights

    def spy(model, phase, epochs, *a, **k):
        out = real_fit(model, phase, epochs, *a, **k)
        seen.append((phase, k.get("tag", ""), epochs, k.get("initial", 0), out))
        return out

    monkeypatch.setattr(finetune.phases, "fit_phase", spy)
    monkeypatch.setattr(finetune.phases, "load_weights", lambda m, p: (loaded.append(Path(p).name), real_load(m, p)))
    monkeypatch.setattr(search, "noise", lambda acc, n: 1.0)
    ft_cfg.finetune.lr_grid = (1e-3, 1e-2, 1e-1)
    ft_cfg.finetune.epochs_finetune = 8  # room for rungs of 1 and 3 epochs (within half the cap), not 9
    res = finetune.run(ft_cfg)
    searches = [s for s in seen if s[1].startswith("search")]
    assert [(s[1], s[2]) for s in searches] == [
        ("search-lr0.001", 1), ("search-lr0.01", 1), ("search-lr0.1", 1),
        ("search2-lr0.001", 3), ("search2-lr0.01", 3), ("search2-lr0.1", 3),
    ]  # fmt: skip
    assert "search-lr0.01.weights.h5" in loaded[loaded.index("phase2.start.weights.h5") :]  # rung 2 from rung 1's
    final = [s for s in seen if s[0] == 2 and not s[1]]
    assert len(final) == 1 and final[0][3] == 4  # the winner continues after its 1 + 3 search epochs
    # the final run starts from the chosen rate's rung-2 weights (and reloads them when it never beat them)
    assert loaded[-2:] in (["search-lr0.1.weights.h5", "search2-lr0.1.weights.h5"], ["search2-lr0.1.weights.h5"] * 2)
    row = results.read_results(results.results_path(ft_cfg.artifacts, "toy")).set_index("method").loc["finetune"]
    params = json.loads(row["params"])
    record = SearchRecord.from_params(params)
    assert params["learning_rate_finetune"] == pytest.approx(0.1) and record.decided == TIE_TO_LARGER
    assert record.rung_epochs == [1.0, 3.0] and [len(r) for r in record.rungs] == [3, 3]
    search_s = sum(s[4][0] for s in searches)
    assert row["tune_seconds"] == pytest.approx(search_s, rel=1e-6) and res.search_seconds == pytest.approx(search_s)
    assert row["train_seconds"] == pytest.approx(sum(res.phase_seconds) + search_s)
    assert all(record.best_search_val(k) > record.final_val for k in record.beaten_by)
    assert params["epochs_run"][1] == 4 + final[0][4][1]


def test_a_fine_tune_that_hits_its_cap_is_flagged_in_its_row_and_the_verdict(trained_cfg):
    from pipeline import heads, report
    from pipeline.extract import stage as extract

    ft_cfg = trained_cfg  # one phase-2 epoch of at most one: the cap ended it
    extract.run(ft_cfg)
    ft_cfg.heads.heads = ("ridge",)
    heads.run(ft_cfg)
    row = results.read_results(results.results_path(ft_cfg.artifacts, "toy")).set_index("method").loc["finetune"]
    assert json.loads(row["params"])["stop"] == "epoch_cap"
    text = (report.run(ft_cfg).parent / "report.md").read_text()
    line = next(x for x in text.splitlines() if "Best frozen head" in x)
    assert "The fine-tune was still improving when its epoch cap stopped it" in line


def test_two_devices_under_mirrored_strategy_train_like_one_at_the_same_global_batch(tmp_path):
    """Two logical CPU devices (`--devices all`, 4 images each) against one device with 8: the same global
    batch and shuffle, no augmentation or dropout, one short slow epoch per phase so validation is far from
    saturated; the same validation accuracy within 2 of the 30 images (Adam turns float-order noise in
    near-zero gradients into whole steps, so weights differ by ~0.03); the row records the replicas, the
    strategy and the global batch."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import write_images

    data = tmp_path / "data" / "toy"
    for k, (split, n) in enumerate((("train", 20), ("val", 10), ("test", 4))):
        write_images(data / split, n, seed=k)
    script = Path(__file__).parent / "mirrored_run.py"
    runs = (("one", 8), ("all", 4))  # one process for both: each pays TensorFlow's start once
    argv = [a for devices, batch in runs for a in (str(tmp_path / devices), devices, str(batch))]
    run = subprocess.run([sys.executable, str(script), str(data), *argv], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.strip().splitlines() if line.startswith("{")]
    out = {devices: line for (devices, _), line in zip(runs, lines, strict=True)}
    assert out["one"]["devices"] == {"replicas": 1, "strategy": "one device", "global_batch": 8, "workers": 1}
    assert out["all"]["devices"] == {
        "replicas": 2,
        "strategy": "MirroredStrategy over 2 CPU devices",
        "global_batch": 8,
        "workers": 1,
    }
    assert out["one"]["val"] < 0.9  # not saturated: a difference could show
    assert abs(out["all"]["val"] - out["one"]["val"]) <= 2 / 30 + 1e-9


@pytest.mark.parametrize("min_steps, search_steps", [(1, 1), (search.MIN_FIRST_RUNG_STEPS, None)])
def test_a_search_of_a_fraction_of_an_epoch_trains_that_share_of_the_batches(
    ft_cfg, monkeypatch, min_steps, search_steps
):
    """`--search-epochs 0.34` (the demo's search budget): each rate sees a third of an epoch's batches
    (18 images, batch 6: 1 of 3), the winner then trains whole epochs — unless that share is under the
    first rung's floor of steps, as on this tiny set: then each rate trains a whole epoch (every batch)."""
    monkeypatch.setattr(search, "MIN_FIRST_RUNG_STEPS", min_steps)
    seen = []
    real = finetune.phases.fit_phase

    def spy(model, phase, epochs, *a, **k):
        seen.append((k.get("tag", ""), epochs, k.get("steps")))
        return real(model, phase, epochs, *a, **k)

    monkeypatch.setattr(finetune.phases, "fit_phase", spy)
    ft_cfg.finetune.steps_per_epoch = None
    ft_cfg.finetune.lr_grid, ft_cfg.finetune.search_epochs, ft_cfg.finetune.epochs_finetune = (1e-3, 1e-2), 0.34, 2
    finetune.run(ft_cfg)
    searches = [s for s in seen if s[0].startswith("search")]
    assert len(searches) >= 2 and all(s[1:] == (1, search_steps) for s in searches)
    assert [s for s in seen if not s[0]][-1][2] is None  # the continuation: every batch


def test_a_kill_while_saving_a_phases_weights_leaves_no_file_that_says_done(tmp_path):
    """`phase1.done.weights.h5` present means phase 1 is done; half of it (a kill while writing) must never
    be there, or the resumed run fails reading it (seen on an interrupted two-worker run)."""
    from pipeline.finetune import phases, weights

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    done = tmp_path / "phase1.done.weights.h5"

    def dies_half_way(path):
        open(path, "wb").write(b"\x89HDF\r\n")  # the first bytes, then the process is gone
        raise KeyboardInterrupt

    model.save_weights = dies_half_way
    with pytest.raises(KeyboardInterrupt):
        weights.save(model, done)
    assert list(tmp_path.iterdir()) == []
    del model.save_weights
    weights.save(model, done)
    assert phases._done(model, done, 1)


def test_the_workers_enter_the_fine_tunes_key_only_when_they_train(cfg):
    """Results fine-tuned before `--engine ray` existed keep their keys (a second `make demo` reuses them);
    several Ray workers change the global batch, so they make a key of their own."""
    from pipeline.finetune import train

    job = train._job(cfg, None, None)
    before = train._key(job)
    cfg.finetune.workers = 4  # the local engine ignores it
    assert train._key(job) == before
    cfg.finetune.engine = "ray"
    assert train._key(job) != before


class _Crash(keras.callbacks.Callback):
    """Kills a fit at the end of epoch ``at`` (after BackupAndRestore, listed before it, saved that epoch)."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at:
            raise KeyboardInterrupt


class _Scripted(keras.callbacks.Callback):
    """Replaces each epoch's val accuracy by a scripted one (callbacks share the epoch's logs) and keeps
    a copy of the weights of every epoch."""

    def __init__(self, vals, weights: dict):
        super().__init__()
        self.vals, self.weights = vals, weights

    def on_epoch_end(self, epoch, logs=None):
        logs["val_accuracy"] = self.vals[epoch]
        self.weights[epoch] = [w.copy() for w in self.model.get_weights()]


def test_a_resumed_fit_stops_and_restores_as_an_unbroken_one_would(tmp_path):
    from pipeline.finetune.progress import ResumableEarlyStopping

    x, y = np.random.default_rng(0).normal(size=(16, 3)).astype("float32"), np.arange(16) % 2
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy", metrics=["accuracy"])
    weights, vals = {}, [0.5, 0.9, 0.6, 0.6, 0.6, 0.6]  # the best epoch is the 2nd, before the kill

    def fit(*crash):
        stopping = ResumableEarlyStopping(tmp_path / "epochs-phase2", patience=2)
        backup = keras.callbacks.BackupAndRestore(tmp_path / "backup")
        model.fit(
            x,
            y,
            validation_data=(x, y),
            epochs=6,
            callbacks=[_Scripted(vals, weights), stopping, backup, *crash],
            verbose=0,
        )
        return stopping

    with pytest.raises(KeyboardInterrupt):
        fit(_Crash(at=2))
    summary = fit().summary(0)
    # unbroken: epochs 3 and 4 do not beat epoch 2 (patience 2) -> stop after 4 with epoch 2's weights
    assert (summary.ran, summary.best_epoch, summary.best_val) == (4, 2, 0.9)
    assert sorted(weights) == [0, 1, 2, 3]  # epoch 4 (index 4) never ran: patience counted from before the kill
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights[1]))
    assert summary.earlier_seconds > 0


def test_a_fine_tune_killed_in_phase_two_records_every_epoch_of_it(ft_cfg, monkeypatch):
    ft_cfg.finetune.epochs_finetune = 3
    ft_cfg.finetune.patience = 10
    real = finetune.phases.fit_phase
    calls = []

    def crash_after_two_epochs(model, phase, *a, **k):
        calls.append(phase)
        if phase == 2 and calls.count(2) == 1:
            k["extra"] = [*k.get("extra", ()), _Crash(at=1)]
        return real(model, phase, *a, **k)

    monkeypatch.setattr(finetune.phases, "fit_phase", crash_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(ft_cfg)
    (log,) = Path(ft_cfg.artifacts).rglob("epochs-phase2.json")
    before = json.loads(log.read_text())
    assert [e["epoch"] for e in before] == [0, 1]
    ft_cfg.finetune.resume = True
    res = finetune.run(ft_cfg)
    params = json.loads(results.read_results(results.results_path(ft_cfg.artifacts, "toy")).iloc[0]["params"])
    assert res.epochs_run == [1, 3] and params["epochs_run"] == [1, 3] and params["stop"] == "epoch_cap"
    assert 1 <= params["best_epochs"][1] <= 3
    assert res.phase_seconds[1] >= sum(e["seconds"] for e in before)


def test_phase_two_compiles_once_for_its_whole_search_and_final_run(ft_cfg, monkeypatch):
    """Each compile retraces the training step: the searched rates and the final run share phase 2's one."""
    compiled = []
    real = finetune.phases._compile
    monkeypatch.setattr(finetune.phases, "_compile", lambda model, ft, lr: (compiled.append(lr), real(model, ft, lr)))
    ft_cfg.finetune.lr_grid, ft_cfg.finetune.epochs_finetune = (1e-3, 1e-2, 1e-1), 2
    finetune.run(ft_cfg)
    assert compiled == [ft_cfg.finetune.learning_rate, 1e-3]  # phase 1's, then phase 2's


def test_a_restarted_optimizer_annealed_per_batch_trains_as_a_fresh_compile_with_cosine_decay(tmp_path):
    """compile_once + restart + annealing (what each searched rate gets) against what it replaced: a fresh
    compile with a CosineDecay schedule, from the same weights. The shared optimizer has trained another
    rate first, and its state was saved into the weights file loaded before the restart."""
    from types import SimpleNamespace

    from pipeline.finetune import phases, search, weights

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(48, 5)).astype("float32"), rng.integers(0, 3, 48)

    def model():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(3, "softmax")])

    ft, lr, steps = SimpleNamespace(optimizer="adam"), 0.05, 6
    fresh = model()
    start = [w.copy() for w in fresh.get_weights()]
    schedule = keras.optimizers.schedules.CosineDecay(lr, steps)
    fresh.compile(keras.optimizers.Adam(schedule), "sparse_categorical_crossentropy")
    fresh.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)

    shared = model()
    restart = phases.compile_once(shared, ft, 0.5)
    shared.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)  # another rate's run first
    shared.set_weights(start)
    weights.save(shared, tmp_path / "w.weights.h5")  # as a search run's file: the optimizer's state with it
    weights.load(shared, tmp_path / "w.weights.h5")
    assert int(shared.optimizer.iterations) == 12
    restart(lr)
    assert int(shared.optimizer.iterations) == 0
    shared.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[search.annealing(lr, steps)])
    for a, b in zip(fresh.get_weights(), shared.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(shared.optimizer.learning_rate) == pytest.approx(lr * 0.5 * (1 + np.cos(np.pi * 5 / 6)))
