"""A command line of plain ``key=value`` words, read without Hydra.

Hydra costs the converter about 0.5 s beyond ``import torch`` on every run (its import, and the
config composed twice: once to find the run mode, once to run), more than writing a 53M-parameter
model takes (``bench/README.md``, table 3). Most command lines are plain words over the schema's
own fields (``model_dir=exp/whisper tag=epoch_7 dry_run=true``). For those, this module builds the
same :class:`ConvertConfig` from the same sources Hydra composes, in the same order: the schema's
defaults, then the packaged ``conf/convert.yaml``, then the command line; a value is taken only
where the schema holds it as it is (a bool, an enum member's name, a string, None where optional).

Anything else returns None and the command goes through Hydra, which reads it, or reports it, as it
always has: a flag (``--help``, ``--cfg``, ``-m``), an override Hydra's grammar gives a meaning to
(``+key``, ``~key``, ``hydra.*``, quotes, ``${...}``, lists, sweeps, a number, ``true``/``false``
in a field that is not a bool), a key the schema does not have, a value the schema refuses, a
missing ``model_dir``. ``tests/test_convert_cli.py`` holds both readings equal on a set of command
lines.
"""

from __future__ import annotations

import enum
import logging.config
import re
from dataclasses import fields
from importlib import resources
from typing import Any, Optional, Sequence, get_type_hints

from wenet_hooks.convert.options import ConvertConfig

# A value Hydra's override grammar reads as this very string: it starts with a letter, "_" or "/"
# (so it is not a number, and not "-", "+" or "." starting one), with no quote, escape, space,
# "$", ",", bracket or brace (no interpolation, list, dict or sweep).
_PLAIN_VALUE = re.compile(r"[A-Za-z_/][A-Za-z0-9_./-]*")
# Words Hydra reads, in any case, as a bool, None or a float.
_BOOLS = {"true": True, "false": False}
_NULL = "null"
_FLOATS = {"inf", "nan"}
_MISSING = "???"  # OmegaConf's mark of a mandatory value
_REFUSED = object()  # a value the schema does not hold as it is


def plain_config(argv: Sequence[str]) -> Optional[ConvertConfig]:
    """The config ``argv`` asks for, when every word is a plain ``field=value`` that the schema
    takes; None otherwise (Hydra reads it, or reports it)."""
    import yaml  # (OmegaConf's import alone costs 0.14 s; the packaged defaults are plain YAML)

    types = get_type_hints(ConvertConfig)
    words = _plain_words(argv, types)
    if words is None:
        return None
    defaults = yaml.safe_load(_packaged("convert.yaml"))
    values = {f.name: defaults.get(f.name, f.default) for f in fields(ConvertConfig)}
    values.update(words)
    typed = {key: _typed(value, types[key]) for key, value in values.items()}
    if any(value is _REFUSED for value in typed.values()) or typed["model_dir"] == _MISSING:
        return None  # a refused value or a missing model_dir: Hydra names the key and the problem
    return ConvertConfig(**typed)


def configure_logging() -> None:
    """The logging Hydra sets up for the command (``conf/hydra/job_logging/stderr.yaml``): lines on
    stderr, the summary table alone on stdout."""
    import yaml

    logging.config.dictConfig(yaml.safe_load(_packaged("hydra/job_logging/stderr.yaml")))


def _plain_words(argv: Sequence[str], types: dict[str, Any]) -> Optional[dict[str, Any]]:
    """``{field: value}`` of ``argv``, where each value means to Hydra what it says; else None."""
    words: dict[str, Any] = {}
    for word in argv:
        key, sep, value = word.partition("=")
        if not sep or key not in types or key in words:
            return None
        lowered = value.lower()
        if lowered == _NULL:
            words[key] = None
        elif lowered in _BOOLS and types[key] is bool:
            words[key] = _BOOLS[lowered]
        elif lowered in _BOOLS or lowered in _FLOATS or not _PLAIN_VALUE.fullmatch(value):
            return None  # (true/false in a field that is not a bool: Hydra hands it a bool, "True")
        else:
            words[key] = value
    return words


def _typed(value: Any, kind: Any) -> Any:
    """``value`` as a field of type ``kind`` holds it, or _REFUSED: only what the schema takes as
    it is (a bool, an enum member's name, a string, None where optional)."""
    if value is None:
        return None if kind == Optional[str] else _REFUSED
    if kind is bool:
        return value if isinstance(value, bool) else _REFUSED
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return kind[value] if isinstance(value, str) and value in kind.__members__ else _REFUSED
    return value if isinstance(value, str) and kind in (str, Optional[str]) else _REFUSED


def _packaged(name: str) -> str:
    # The same files Hydra reads: the package wenet_hooks.conf (CONFIG_PATH in cli.py).
    return resources.files("wenet_hooks.conf").joinpath(name).read_text(encoding="utf-8")
