"""`make finetune`: the fully fine-tuned Keras baseline, timed on the same splits.

Two phases, as in the Keras transfer-learning guide: (1) backbone frozen, train the new head; (2)
every backbone layer trainable, its learning rate searched on the validation split like the heads' C,
then trained until early stopping (``model``: the network; ``inputs``: images decoded once; ``search``:
the learning-rate search and schedule; ``job``: one fine-tune's data, weights and paths; ``state``: its
progress, resumable; ``phases``: the two fits, driven by ``train``, which also scores, saves and writes the
results rows). Same backbone, weights, input size, preprocessing and splits as ``extract``.
"""

from pipeline.data.augment import AUGMENT_SEEDS, augmentation_layers
from pipeline.finetune import phases
from pipeline.finetune.model import build_model, set_trainable
from pipeline.finetune.train import FinetuneResult, model_path, run

__all__ = [
    "AUGMENT_SEEDS",
    "FinetuneResult",
    "augmentation_layers",
    "build_model",
    "model_path",
    "phases",
    "run",
    "set_trainable",
]
