"""The ``wenet_hooks`` section of a WeNet ``train.yaml``: schema, defaults, validation.

The schema is a set of dataclasses registered in Hydra's ConfigStore; the
defaults live in ``conf/wenet_hooks.yaml`` (installed as the package
``wenet_hooks.conf``, as in Hydra's packaged-app example).
A user's section is composed over them with Hydra's Compose API and validated
once, every problem reported with its full key::

    wenet_hooks.consolidate.dtype: expected one of fp32, bf16, fp16; found 'f32'
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping, Optional

from wenet_hooks.dtypes import Dtype
from wenet_hooks.errors import ConfigError
from wenet_hooks.gather.bucketed import DEFAULT_BUCKET_MB
from wenet_hooks.plan import SaveOptions

SECTION = "wenet_hooks"
SCHEMA_NAME = "wenet_hooks_schema"
CONFIG_MODULE = "wenet_hooks.conf"


class OnError(enum.Enum):
    stop = "stop"  # every rank raises; training stops
    warn = "warn"  # log, keep training and the sharded folder


class Resume(enum.Enum):
    off = "off"  # start as the command says (WeNet's --checkpoint, if any)
    auto = "auto"  # continue from the newest committed save in model_dir, if there is one


class TagKind(enum.Enum):
    init = "init"
    step = "step"
    epoch = "epoch"


@dataclass
class ConsolidateConfig:
    """What happens at each WeNet save (``wenet_hooks.consolidate``)."""

    enabled: bool = False
    dtype: Dtype = Dtype.fp32
    verify: bool = True
    on_error: OnError = OnError.stop
    keep_sharded: str = "all"  # "all", "none" or K (the K most recent)
    tags: List[TagKind] = field(default_factory=lambda: list(TagKind))
    bucket_mb: float = DEFAULT_BUCKET_MB  # received by rank 0 per collective; 0: DeepSpeed's per-parameter gather
    # False: DeepSpeed's sharded save is not made; <tag>.pt (+ <tag>.optim) are the checkpoint, written in
    # the background (the previous save stays valid until the new one is published).
    sharded: bool = True
    # auto: a run continues from the newest committed save in model_dir (the same command is the whole recovery).
    resume: Resume = Resume.off

    def save_options(self, optimizer: bool, background_gather: bool = True) -> SaveOptions:
        """The options of each save this section asks for (``optimizer``: also ``<tag>.optim``;
        ``background_gather``: its gather may go on after the save returns)."""
        return SaveOptions(dtype=self.dtype, verify=self.verify, bucket_mb=self.bucket_mb, optimizer=optimizer,
                           background_gather=background_gather)

    def keep_last(self) -> Optional[int]:
        """How many sharded folders to keep; ``None`` keeps all."""
        if self.keep_sharded == "all":
            return None
        return 0 if self.keep_sharded == "none" else int(self.keep_sharded)

    def converts(self, tag: str) -> bool:
        """Whether a save with this WeNet tag (``init``, ``step_N``, ``epoch_N``) is converted."""
        kind = tag.split("_", 1)[0]
        return any(kind == t.value for t in self.tags)


@dataclass
class WenetHooksConfig:
    """The whole ``wenet_hooks`` section."""

    consolidate: ConsolidateConfig = field(default_factory=ConsolidateConfig)


def register_schema() -> None:
    """Register the schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=WenetHooksConfig)


def compose_section(section: Optional[Mapping[str, Any]]) -> WenetHooksConfig:
    """Compose a user's ``wenet_hooks`` section over the packaged defaults.

    Raises:
        ConfigError: listing every unknown key, wrong type and invalid choice.
    """
    from omegaconf import OmegaConf

    defaults = _compose_defaults()
    section = _resume_off_as_written({} if section is None else section)
    problems = _section_problems(defaults, section, WenetHooksConfig, SECTION)
    if problems:
        raise ConfigError(problems)
    return OmegaConf.to_object(OmegaConf.merge(defaults, section))


def _resume_off_as_written(section: Any) -> Any:
    """``resume: off`` as the user wrote it: YAML 1.1 (WeNet's loader) reads an unquoted ``off`` as false."""
    consolidate = section.get("consolidate") if isinstance(section, Mapping) else None
    if isinstance(consolidate, Mapping) and consolidate.get("resume") is False:
        return {**section, "consolidate": {**consolidate, "resume": Resume.off.value}}
    return section


def _compose_defaults():
    from hydra import compose, initialize_config_module

    register_schema()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name=SECTION)


def _section_problems(node: Any, user: Any, schema: type, prefix: str) -> list[str]:
    """Check each user key on its own, so one bad key does not hide the next."""
    from omegaconf import OmegaConf

    if not isinstance(user, Mapping):
        return [f"{prefix}: expected a mapping of options; found {user!r}"]
    hints = typing.get_type_hints(schema)
    problems: list[str] = []
    for key, value in user.items():
        full = f"{prefix}.{key}"
        if key not in hints:
            problems.append(f"{full}: unknown key; expected one of {', '.join(hints)}")
        elif dataclasses.is_dataclass(hints[key]):
            problems.extend(_section_problems(node[key], value, hints[key], full))
        else:
            try:
                OmegaConf.merge(node, {key: value})
            except Exception:
                problems.append(f"{full}: expected {_expected_text(hints[key])}; found {value!r}")
                continue
            check = _FIELD_CHECKS.get((schema, key))
            if check is not None and not check(value):
                problems.append(f"{full}: expected {_FIELD_EXPECTED[(schema, key)]}; found {value!r}")
    return problems


def _expected_text(hint: Any) -> str:
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(m.name for m in hint)
    if typing.get_origin(hint) in (list, List):
        return "a list of " + _expected_text(typing.get_args(hint)[0]).replace("one of ", "")
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _keep_sharded_ok(value: Any) -> bool:
    return str(value) in ("all", "none") or str(value).isdigit()


def _not_negative(value: Any) -> bool:
    return float(value) >= 0


# Checks beyond the type, per (schema, key).
_FIELD_CHECKS: dict[tuple[type, str], Callable[[Any], bool]] = {
    (ConsolidateConfig, "keep_sharded"): _keep_sharded_ok,
    (ConsolidateConfig, "bucket_mb"): _not_negative,
}
_FIELD_EXPECTED = {
    (ConsolidateConfig, "keep_sharded"): "all, none or a number of folders to keep",
    (ConsolidateConfig, "bucket_mb"): "a number of megabytes >= 0",
}
