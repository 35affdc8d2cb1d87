"""`make finetune`: the fully fine-tuned Keras baseline, timed on the same splits.

Two phases, as in the Keras transfer-learning guide: (1) backbone frozen, train the new head; (2)
unfreeze the top of the backbone and train on at a ~10x lower learning rate (``model``: the network
and its phases; ``train``: fitting, scoring, saving, results rows). Same backbone, weights, input size
and preprocessing as ``extract``.
"""

from pipeline.augment import AUGMENT_SEEDS, augmentation_layers
from pipeline.finetune.model import build_model, set_trainable
from pipeline.finetune.train import FinetuneResult, model_path, run

__all__ = [
    "AUGMENT_SEEDS",
    "FinetuneResult",
    "augmentation_layers",
    "build_model",
    "model_path",
    "run",
    "set_trainable",
]
