"""The fine-tune's learning-rate search on planted validation curves (no training): what it trains, what it
chooses, how it resumes, and the record the report reads."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import PipelineError
from pipeline.finetune import search
from pipeline.finetune.record import CLEAR_LEAD, TIE_TO_LARGER, SearchRecord

GRID = (1e-5, 1e-4, 1e-3)
DEMO_BUDGETS = search.rung_budgets(0.34, 3, 30)


class Planted:
    """A candidate's val accuracy as a function of the epochs it has trained over its rungs (``curves``:
    rate -> [(epochs, val), ...], the last value held); each run costs its epochs in seconds."""

    def __init__(self, curves, budgets):
        self.curves, self.budgets, self.tried = curves, budgets, []

    def __call__(self, lr, rung):
        self.tried.append((lr, rung))
        key = min(self.curves, key=lambda v: abs(np.log(v / lr)))
        trained = sum(self.budgets[:rung])  # this rung continues the rate's rung before
        val = [v for e, v in self.curves[key] if e <= trained + 1e-9]
        return (val[-1] if val else self.curves[key][0][1]), self.budgets[rung - 1]


def _search(planted, record=None, n_val=1000, budgets=DEMO_BUDGETS, grid=GRID, saves=None):
    record = record if record is not None else SearchRecord()
    saves = saves if saves is not None else []
    lr = search.choose_lr(planted, grid, record, lambda: saves.append(json.dumps(record.to_params())), n_val, budgets)
    return lr, record


def test_the_rungs_grow_three_fold_and_stay_within_half_the_epoch_cap():
    assert search.rung_budgets(0.34, 3, 30) == pytest.approx([0.34, 1.0, 3.0])  # 1.02 -> a whole epoch
    assert search.rung_budgets(1.0, 3, 30) == [1.0, 3.0, 9.0]
    assert search.rung_budgets(1.0, 3, 8) == [1.0, 3.0]  # 1 + 3 + 9 > 4
    assert search.rung_budgets(1.0, 3, 1) == [1.0] and search.rung_budgets(2.0, 1, 30) == [2.0]


def test_the_first_rung_trains_at_least_its_floor_of_steps_and_never_less_than_asked():
    """The demo's third of an epoch on 3,000 images (94 steps an epoch: 32 steps) is kept; on a forecast's
    500-image ladder point (16 steps) it would be 5 steps, so rung 1 trains the whole epoch; in between the
    floor's share of an epoch; a larger budget is never cut."""
    floor = search.MIN_FIRST_RUNG_STEPS
    assert search.first_rung(0.34, 94) == 0.34
    assert search.first_rung(0.34, 16) == 1.0
    assert search.first_rung(0.34, 63) == pytest.approx(floor / 63) and round(search.first_rung(0.34, 63) * 63) == floor
    assert search.first_rung(1.0, 16) == 1.0 and search.first_rung(2.0, 5) == 2.0


def test_a_short_run_leader_that_trains_worse_loses_to_the_better_full_run():
    """The demo's case at 750 and 1,500 images: after a third of an epoch 1e-5 leads 1e-4 inside the noise
    (1.3 pt over 1,000 val images), and 1e-5 would be 4-5 pt worse fully trained. The rungs grow until the
    better rate leads clearly; equal short second runs (the old search) would have kept 1e-5 ahead."""
    curves = {
        1e-5: [(0.34, 0.765), (1.34, 0.775), (4.34, 0.785)],  # quick start, low ceiling
        1e-4: [(0.34, 0.758), (1.34, 0.770), (4.34, 0.830)],  # slow start, the better run
        1e-3: [(0.34, 0.40), (1.34, 0.55), (4.34, 0.70)],
    }
    planted = Planted(curves, DEMO_BUDGETS)
    lr, record = _search(planted)
    assert lr == pytest.approx(1e-4) and record.decided == CLEAR_LEAD and not record.within_noise
    assert sorted(planted.tried) == [(1e-5, 1), (1e-5, 2), (1e-5, 3), (1e-4, 1), (1e-4, 2), (1e-4, 3), (1e-3, 1)]
    assert record.rung_epochs == pytest.approx([0.34, 1.0, 3.0]) and len(record.rungs) == 3
    assert record.seconds == pytest.approx(3 * 0.34 + 2 * 1.0 + 2 * 3.0)
    weights, val, epochs = search.outcome(record, Path("w"), lr)
    assert (weights.name, val, epochs) == ("search3-lr0.0001.weights.h5", 0.830, pytest.approx(4.34))


def test_a_tie_that_survives_every_rung_goes_to_the_larger_rate(caplog):
    """Both within the noise at every rung, the smaller rate a hair ahead each time: short-horizon bias
    says it is the one to distrust; the search takes the larger rate and says it was a tie."""
    curves = {1e-5: [(0, 0.800)], 1e-4: [(0, 0.795)], 1e-3: [(0, 0.50)]}
    with caplog.at_level("WARNING"):
        lr, record = _search(Planted(curves, DEMO_BUDGETS))
    assert lr == pytest.approx(1e-4) and record.decided == TIE_TO_LARGER and record.within_noise
    assert len(record.rungs) == 3 and "tie within the validation noise" in caplog.text
    lr, record = _search(Planted(curves, [1.0]), budgets=[1.0])  # no second rung fits: the tie is settled the same way
    assert lr == pytest.approx(1e-4) and len(record.rungs) == 1 and record.decided == TIE_TO_LARGER


def test_a_clear_lead_ends_the_search_after_one_rung_and_an_edge_leader_extends_the_grid():
    curves = {1e-5: [(0, 0.5)], 1e-4: [(0, 0.6)], 1e-3: [(0, 0.7)], 1e-2: [(0, 0.8)], 1e-1: [(0, 0.3)]}
    planted = Planted(curves, DEMO_BUDGETS)
    lr, record = _search(planted)
    assert lr == pytest.approx(1e-2) and len(planted.tried) == 5 and all(rung == 1 for _, rung in planted.tried)
    assert record.decided == CLEAR_LEAD and len(record.rungs[0]) == 5
    lr, _ = _search(Planted(curves, DEMO_BUDGETS), grid=(3e-4,))
    assert lr == 3e-4  # one value: no search


def test_an_interrupted_search_resumes_from_its_record_and_trains_nothing_twice():
    curves = {1e-5: [(0.34, 0.765), (1.34, 0.775)], 1e-4: [(0.34, 0.758), (1.34, 0.800)], 1e-3: [(0, 0.4)]}
    planted = Planted(curves, DEMO_BUDGETS)
    saves = []
    first, record = _search(planted, saves=saves)
    assert len(saves) == len(planted.tried) + 1  # after every run, and once at the end
    for cut in range(1, len(saves)):  # killed after any run: the record on disk then
        resumed = SearchRecord.from_dict(json.loads(saves[cut - 1]))
        rest = Planted(curves, DEMO_BUDGETS)
        lr, _ = _search(rest, record=resumed)
        assert lr == first and len(rest.tried) == len(planted.tried) - cut  # only what was not yet trained
    _search(lambda *a: pytest.fail("retrained a tried value"), record=record)


def test_a_final_val_below_another_rates_search_val_is_flagged_and_the_verdict_says_so():
    record = SearchRecord(rungs=[{"1e-05": 0.80, "0.0001": 0.79, "0.001": 0.5}, {"1e-05": 0.81, "0.0001": 0.82}])
    record.chosen = 1e-4
    record.compare_final(0.85)
    assert record.beaten_by == {}
    record.compare_final(0.805)
    assert record.beaten_by == {"1e-05": 0.81} and record.final_val == 0.805
    from pipeline.report.verdict import _search_text

    text = _search_text(SearchRecord.from_params({"lr_search": record.to_params()}))
    assert "chosen on val from 1e-05, 0.0001, 0.001 (then rung 2 between 1e-05, 0.0001)" in text
    assert "flagged: its final val 0.805 is below what 1e-05 (val 0.810) reached in the search" in text


def test_the_record_the_report_reads_is_the_one_the_fine_tune_wrote_and_a_renamed_field_fails():
    record = SearchRecord(rungs=[{"1e-05": 0.8, "0.0001": 0.79}], chosen=1e-4, decided=TIE_TO_LARGER)
    params = json.loads(json.dumps({"lr_search": record.to_params()}))
    assert SearchRecord.from_params(params) == record
    planted = dict(params["lr_search"])
    planted["beaten"] = planted.pop("beaten_by")  # a field renamed on one side only
    with pytest.raises(PipelineError, match="unknown \\['beaten'\\], missing \\['beaten_by'\\]"):
        SearchRecord.from_params({"lr_search": planted})
    old = {
        "lr_search": {"1e-05": 0.84, "0.0001": 0.85},
        "lr_search_rung2": {"1e-05": 0.84, "0.0001": 0.87},
        "lr_search_within_noise": True,
        "learning_rate_finetune": 1e-4,
        "search_seconds": 150.0,
    }
    read = SearchRecord.from_params(old)  # a row written before the record: the same facts
    assert read.rungs == [old["lr_search"], old["lr_search_rung2"]] and read.within_noise and read.seconds == 150.0
    assert SearchRecord.from_params({"lr_search": None}) is None


def test_the_fine_tunes_params_are_one_typed_record_and_a_planted_rename_fails():
    from pipeline.finetune.record import FinetuneParams
    from pipeline.report.verdict import _baseline, capped

    search = SearchRecord(rungs=[{"1e-05": 0.8, "0.0001": 0.83}], chosen=1e-4, decided="clear lead")
    p = FinetuneParams(
        epochs=[2, 30], epochs_run=[2, 30], best_epochs=[2, 29], stop="epoch_cap", unfreeze_layers=-1,
        learning_rate=1e-3, learning_rate_finetune=1e-4, search=search, search_epochs=0.34, search_seconds=40.0,
        schedule="plateau", devices={"replicas": 2, "strategy": "two workers"}, phase_seconds=[10.0, 300.0],
    )  # fmt: skip
    params = json.loads(json.dumps(p.to_params()))
    assert FinetuneParams.from_params(params) == p
    row = pd.Series({"params": json.dumps(params), "n_train": 3000, "total_seconds": 350.0, "backbone": "b"})
    assert capped(row) and "phase 2 hit its epoch cap" in _baseline(row)
    assert "learning-rate search 40 s + training 310 s" in _baseline(row)
    planted = dict(params)
    planted["stopped"] = planted.pop("stop")  # renamed on the writer's side only
    with pytest.raises(PipelineError, match="unknown \\['stopped'\\], missing \\['stop'\\]"):
        FinetuneParams.from_params(planted)
    bad = json.dumps(planted)
    with pytest.raises(PipelineError):
        capped(pd.Series({"params": bad}))
    legacy = {k: v for k, v in params.items() if k not in ("version", "devices", "schedule")}  # an older row
    old = FinetuneParams.from_params(legacy)
    assert old.capped and old.devices is None and old.replicas == 1 and old.search == search


def test_the_work_folders_state_resumes_only_when_it_matches_the_inputs_and_this_layout(tmp_path):
    from pipeline.finetune.state import FILE, FrozenScore, RunState

    work = tmp_path / "m.work"
    state = RunState.start(work, "key", resume=True)
    assert state == RunState(inputs_key="key") and work.is_dir()
    state.end_phase(1.5, 2, 1, 0.5)
    state.frozen = FrozenScore(scores={"test_accuracy": 0.5}, n_test=4)
    state.search = SearchRecord(rungs=[{"0.001": 0.4}], rung_epochs=[0.34], seconds=2.0)
    state.save(work)
    (work / "phase1.done.weights.h5").write_text("")
    assert RunState.start(work, "key", resume=True) == state  # typed all the way back
    assert (work / "phase1.done.weights.h5").exists()
    assert RunState.start(work, "key", resume=False) == RunState(inputs_key="key")
    assert list(work.iterdir()) == []  # not resuming: nothing of the old run is left to be mistaken for it
    state.save(work)
    assert RunState.start(work, "other inputs", resume=True) == RunState(inputs_key="other inputs")
    state.save(work)
    saved = json.loads((work / FILE).read_text())
    saved["phase_secs"] = saved.pop("phase_seconds")  # a planted rename: another version's work folder
    (work / FILE).write_text(json.dumps(saved))
    assert RunState.start(work, "key", resume=True) == RunState(inputs_key="key")
