"""wenet_hooks: recognize-ready single-file checkpoints from DeepSpeed ZeRO training.

The core is free of WeNet imports so it serves any DeepSpeed trainer::

    state_dict = consolidate(engine)            # collective: every rank calls it
    if state_dict is not None:                  # rank 0
        write_state_dict(state_dict, "exp/epoch_3.pt", verify=True)
"""

from wenet_hooks.consolidate import DTYPES, consolidate, resolve_dtype, unwrap_model
from wenet_hooks.errors import (
    CheckpointWriteError,
    ConsolidationError,
    VerificationError,
    WenetHooksError,
)
from wenet_hooks.io import TMP_SUFFIX, tmp_path_for, write_state_dict
from wenet_hooks.verify import Manifest, TensorSpec, load_state_dict_file, tensor_checksum, verify

__version__ = "0.1.0"

__all__ = [
    "DTYPES",
    "CheckpointWriteError",
    "ConsolidationError",
    "Manifest",
    "TMP_SUFFIX",
    "TensorSpec",
    "VerificationError",
    "WenetHooksError",
    "consolidate",
    "load_state_dict_file",
    "resolve_dtype",
    "tensor_checksum",
    "tmp_path_for",
    "unwrap_model",
    "verify",
    "write_state_dict",
]
