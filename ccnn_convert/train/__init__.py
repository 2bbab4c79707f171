"""Train converted models: the Python API behind ``ccnn-train``.

The stages, one module each:

* :mod:`.recipe`: the knobs (:class:`TrainConfig`), optimizer, schedule;
* :mod:`.data`: ``DIR/train`` and ``DIR/val``, class labels, augmentation, global batches;
* :mod:`.memory`: activation checkpointing over the converted model's blocks, out-of-memory errors;
* :mod:`.loop`: the :class:`Trainer` (DDP, autocast, one epoch, validation, its state);
* :mod:`.resume`: the training state on disk and exact resumption;
* :mod:`.history`: the JSON history and the PNG learning curve;
* :mod:`.run`: :func:`train_model`, MODEL + DIR -> trained artifacts.

>>> from ccnn_convert.train import TrainConfig, train_model
>>> result = train_model("resnet18", "data/", "runs/r18", config=TrainConfig(epochs=1))  # doctest: +SKIP
"""

from .loop import EpochRecord, StepInfo, Trainer
from .memory import checkpoint_blocks
from .recipe import TrainConfig, build_optimizer, build_scheduler, parameter_groups
from .run import OUTPUT_FILES, TrainResult, train_model

__all__ = ["EpochRecord", "OUTPUT_FILES", "StepInfo", "TrainConfig", "TrainResult", "Trainer",
           "build_optimizer", "build_scheduler", "checkpoint_blocks", "parameter_groups", "train_model"]
