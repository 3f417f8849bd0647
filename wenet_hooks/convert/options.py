"""Options of ``wenet-hooks-convert`` (defaults in ``conf/convert.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from wenet_hooks.dtypes import Dtype

SCHEMA_NAME = "convert_schema"
KEEP, REMOVE = "all", "none"


@dataclass
class ConvertConfig:
    """What the offline command converts, and how."""

    model_dir: str = "???"  # the WeNet experiment folder, e.g. exp/whisper
    tag: Optional[str] = None  # one tag (or "latest"); None: every tag not yet converted
    dtype: Dtype = Dtype.fp32
    dry_run: bool = False  # list what would be done, write nothing
    overwrite: bool = False  # replace an existing valid <tag>.pt
    # Sharded <tag>/ folders after their <tag>.pt verified: all (kept) or none
    # (removed), the words of the training section's keep_sharded.
    keep_sharded: str = KEEP
    config: Optional[str] = None  # a WeNet train.yaml: check keys and shapes against the model it builds
    # Also write <tag>.optim from a sharded model+optimizer save, for an exact resume
    # with --checkpoint <tag>.pt (the file the hook writes during training).
    optimizer: bool = False

    def removes_sharded(self) -> bool:
        """Whether converted sharded folders are removed; ``true``/``false`` are read as all/none.

        Raises:
            ValueError: any other value.
        """
        value = str(self.keep_sharded).strip().lower()
        if value in (KEEP, "true"):
            return False
        if value in (REMOVE, "false"):
            return True
        raise ValueError(f"keep_sharded: expected all or none; found {self.keep_sharded!r}")


def register_schema() -> None:
    """Register the schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=ConvertConfig)
