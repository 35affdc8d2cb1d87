import json

import pytest
from conftest import TINY

from pipeline.api import STAGES
from pipeline.cli import build_parser, main
from pipeline.config import resolve_config
from pipeline.errors import PipelineError


def extract_argv(dataset, artifacts, weights="none", *extra):
    return [
        "extract",
        "--dataset",
        str(dataset),
        "--backbone",
        TINY,
        "--weights",
        str(weights),
        "--artifacts",
        str(artifacts),
        *extra,
    ]


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_has_help_documenting_every_option(capsys, stage):
    """Each stage's --help lists a flag for every field of its config sections (a name two sections share
    is qualified by the later section: --finetune-batch-size)."""
    import dataclasses

    from pipeline.config import section_types

    with pytest.raises(SystemExit) as e:
        main([stage, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    seen = set()
    for section in STAGES[stage][1]:
        for f in dataclasses.fields(section_types()[section]):
            flag = "--" + f.name.replace("_", "-")
            if flag in seen:
                flag = f"--{section}-{f.name.replace('_', '-')}"
            seen.add(flag)
            assert flag in out, (stage, flag)


def test_toml_then_flags_override_defaults(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('artifacts = "out"\n[extract]\nbatch_size = 8\nstrict = true\n[data]\nseed = 3\n')
    args = build_parser().parse_args(["extract", "--config", str(toml), "--batch-size", "16"])
    cfg = resolve_config(args)
    assert (cfg.artifacts, cfg.extract.batch_size, cfg.extract.strict, cfg.data.seed) == ("out", 16, True, 3)
    assert cfg.backbone.backbone == "efficientnet_lite0"


def test_unknown_toml_key_is_a_one_line_error(tmp_path, capsys):
    toml = tmp_path / "bad.toml"
    toml.write_text("[extract]\nbatchsize = 8\n")
    assert main(["extract", "--config", str(toml)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown option config.extract.batchsize") and "\n" not in err


@pytest.mark.slow
def test_cli_extract_end_to_end_and_cache_hit(presplit, tmp_path, capsys):
    argv = extract_argv(presplit, tmp_path / "a", "none", "--batch-size", "8")
    assert main(argv) == 0
    sidecar = json.loads((tmp_path / "a" / "features" / "toy" / f"{TINY}@16px.json").read_text())
    assert sidecar["config"]["extract"]["batch_size"] == 8 and "numpy" in sidecar["versions"]
    assert main(argv) == 0
    assert "cache hit" in capsys.readouterr().err
    cache = tmp_path / "a" / "features" / "toy" / f"{TINY}@16px.h5"
    before = cache.stat().st_mtime_ns
    assert main(argv + ["--force"]) == 0  # extracted again, the file replaced once complete
    assert "cache hit" not in capsys.readouterr().err and cache.stat().st_mtime_ns > before


def test_bad_inputs_are_one_line_errors_without_traceback(presplit, tmp_path, capsys):
    (presplit / "train" / "purple").mkdir()
    assert main(["extract", "--dataset", str(presplit), "--backbone", TINY, "--artifacts", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: class folder toy/train/purple has no images (.bmp, .gif, .jpeg, .jpg, .png)"
    ]
    (presplit / "train" / "purple").rmdir()
    assert main(["extract", "--dataset", str(presplit), "--backbone", "nope"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unknown backbone 'nope'" in err


def test_unwritable_artifacts_is_a_one_line_error(presplit, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(extract_argv(presplit, blocker)) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"error: cannot write to {blocker}/features/toy")
    assert "Traceback" not in err


def test_missing_weights_file_is_one_line_and_debug_shows_the_traceback(presplit, tmp_path, capsys):
    argv = extract_argv(presplit, tmp_path / "a", tmp_path / "gone.weights.h5")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"error: weights file {tmp_path / 'gone.weights.h5'} does not exist"
    assert "Traceback" not in err
    assert main(["--debug", *argv]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.slow
def test_the_api_example_in_the_docs_runs_on_the_tiny_backbone(tmp_path, presplit, monkeypatch):
    """docs/api.md's example, run as written with the tiny backbone, the generated images and a tiny recipe."""
    import re
    from pathlib import Path

    from conftest import TINY

    page = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    toml = tmp_path / "tiny.toml"
    toml.write_text(
        "[backbone]\nweights = 'none'\n[extract]\nbatch_size = 4\n[heads]\nlayers = ['last']\n"
        "[finetune]\nepochs_head = 1\nepochs_finetune = 1\nbatch_size = 6\nlr_grid = [0.001]\n"
    )
    code = code.replace('"fashion-mnist"', repr(str(presplit))).replace('"efficientnet_lite0"', repr(TINY))
    code = code.replace('"benchmarks/fashion_mnist_112.toml"', repr(str(toml)))
    code = code.replace('artifacts="artifacts"', f"artifacts={str(tmp_path / 'artifacts')!r}")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/api.md", "exec"), scope)
    assert scope["cache"].exists() and scope["html"].name == "report.html" and scope["html"].exists()
    assert set(scope["heads"]["method"]) == {"ridge", "logreg"}
    assert set(scope["tuned"]["method"]) == {"finetune", "frozen_dense"}
    assert len(scope["everything"]) == len(scope["heads"]) + len(scope["tuned"])


def test_the_api_names_a_bad_option_in_one_line(tmp_path):
    from pipeline import api

    with pytest.raises(PipelineError, match="'no_such' is not an option of `heads`"):
        api.configure("heads", "x", no_such=1)
    with pytest.raises(PipelineError, match="'batch_size' is in several sections"):
        api.configure("curve", "x", batch_size=4)
    cfg = api.configure("curve", "x", heads={"batch_size": 64}, finetune={"batch_size": 8}, lr_grid=[1e-4])
    assert (cfg.heads.batch_size, cfg.finetune.batch_size, cfg.finetune.lr_grid) == (64, 8, (1e-4,))
    assert set(cfg.explicit) >= {"heads.batch_size", "finetune.batch_size", "finetune.lr_grid"}
