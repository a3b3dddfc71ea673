"""Model transforms with an undo: each changes the model in place and has a function that changes it back.

- ``convert_to_ghost_bn`` switches the class of every BN layer (per-chunk statistics in training);
  ``revert_ghost_bn`` switches it back.
- ``freeze_bn`` installs a forward pre-hook per BN layer (inference mode whatever ``model.train()``);
  ``unfreeze_bn`` removes it.
- ``recalibrate_bn`` rewrites the BN running statistics (pooled over batches, sample-weighted);
  ``restore_bn_statistics`` puts back what ``save_bn_statistics`` copied before.

Measurements that leave the model as found are in ``hf_batchsched.probes``; the callbacks in
``hf_batchsched.callbacks.batchnorm`` are thin shells over these functions. See ``README.md`` beside this file.
"""

from .freezing import freeze_bn, is_bn_frozen, unfreeze_bn
from .ghost_bn import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    GhostSyncBatchNorm,
    convert_to_ghost_bn,
    revert_ghost_bn,
)
from .recalibration import recalibrate_bn, restore_bn_statistics, save_bn_statistics

__all__ = [
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GhostSyncBatchNorm",
    "convert_to_ghost_bn",
    "freeze_bn",
    "is_bn_frozen",
    "recalibrate_bn",
    "restore_bn_statistics",
    "revert_ghost_bn",
    "save_bn_statistics",
    "unfreeze_bn",
]
