"""DeepSpeed's own converter as each supported version documents it (tests only).

- 0.14: ``convert_zero_checkpoint_to_fp32_state_dict(dir, output_FILE, tag)`` writes
  one file and has no ``max_shard_size``.
- 0.15.3 and later: the second argument is an output FOLDER (``pytorch_model.bin``,
  or sharded files plus an index above ``max_shard_size``); 0.15.x does not create
  that folder itself, 0.16 and later do.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from wenet_hooks.compat import installed_version, version_tuple

WRITES_FOLDERS = (0, 15, 3)


def deepspeed_version() -> tuple[int, ...]:
    return version_tuple(installed_version("deepspeed") or "0")


def zero_to_fp32(model_dir: Path, output: Path, tag: str, **options) -> None:
    """``convert_zero_checkpoint_to_fp32_state_dict`` at ``output`` (a folder since 0.15.3).

    ``options`` (``max_shard_size``, ``safe_serialization``) need a version that writes
    folders; on an older one the calling test is skipped with the reason.
    """
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

    if deepspeed_version() < WRITES_FOLDERS:
        if options:
            pytest.skip(f"DeepSpeed {'.'.join(map(str, deepspeed_version()))}'s zero_to_fp32 writes one file "
                        "(folders and max_shard_size came in 0.15.3)")
    elif deepspeed_version() < (0, 16):
        Path(output).mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        convert_zero_checkpoint_to_fp32_state_dict(str(model_dir), str(output), tag=tag, **options)
