"""Fine-tune the tiny backbone in a fresh process that sees two logical CPU devices (they must be set before
TensorFlow starts): `python tests/mirrored_run.py DATA ARTIFACTS DEVICES BATCH [ARTIFACTS DEVICES BATCH ...]`
runs each in turn and prints one JSON line per run."""

import json
import sys
from pathlib import Path

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, str(Path(__file__).parent))

import conftest  # noqa: E402  (registers the tiny backbone)

from pipeline import finetune, results  # noqa: E402
from pipeline.config import Config  # noqa: E402


def run(data: str, artifacts: str, devices: str, batch: int) -> dict:
    cfg = Config()
    cfg.artifacts, cfg.data.dataset = artifacts, data
    cfg.backbone.backbone, cfg.backbone.weights = conftest.TINY, "none"
    ft = cfg.finetune
    ft.epochs_head, ft.epochs_finetune, ft.batch_size, ft.devices = 1, 1, batch, devices
    ft.learning_rate, ft.lr_grid = 0.003, (0.003,)  # short and slow: val far from saturated
    ft.augment, ft.dropout = (), 0.0  # nothing random in training but the shuffle, which both runs share
    res = finetune.run(cfg)
    row = results.read_results(results.results_path(artifacts, Path(data).name)).set_index("method").loc["finetune"]
    return {"val": res.val_accuracy, "devices": json.loads(row["params"])["devices"]}


args = sys.argv[2:]
for k in range(0, len(args), 3):
    print(json.dumps(run(sys.argv[1], args[k], args[k + 1], int(args[k + 2]))), flush=True)
