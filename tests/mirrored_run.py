"""Fine-tune the tiny backbone in a fresh process that sees two logical CPU devices (they must be set before
TensorFlow starts): `python tests/mirrored_run.py DATA ARTIFACTS DEVICES BATCH` prints the run's JSON line."""

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

data, artifacts, devices, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cfg = Config()
cfg.artifacts, cfg.data.dataset = artifacts, data
cfg.backbone.backbone, cfg.backbone.weights = conftest.TINY, "none"
ft = cfg.finetune
ft.epochs_head, ft.epochs_finetune, ft.batch_size, ft.devices = 1, 1, batch, devices
ft.learning_rate, ft.lr_grid = 0.003, (0.003,)  # short and slow: val far from saturated
ft.augment, ft.dropout = (), 0.0  # nothing random in training but the shuffle, which both runs share
res = finetune.run(cfg)
row = results.read_results(results.results_path(artifacts, Path(data).name)).set_index("method").loc["finetune"]
print(json.dumps({"val": res.val_accuracy, "devices": json.loads(row["params"])["devices"]}))
