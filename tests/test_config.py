"""The wenet_hooks section: defaults from conf/, composition with Hydra, every problem at once."""

from __future__ import annotations

import pytest
import yaml
from hydra import compose, initialize_config_module

from wenet_hooks.dtypes import Dtype
from wenet_hooks.wenet.config import (
    CONFIG_MODULE,
    ConsolidateConfig,
    OnError,
    TagKind,
    compose_section,
    register_schema,
)
from wenet_hooks.errors import ConfigError


def test_packaged_defaults_compose_with_hydra():
    register_schema()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name="wenet_hooks", overrides=["consolidate.dtype=bf16"])
    assert cfg.consolidate.dtype is Dtype.bf16
    assert cfg.consolidate.enabled is False


def test_absent_section_is_the_defaults():
    assert compose_section(None).consolidate == ConsolidateConfig()


def test_user_section_over_defaults():
    config = compose_section(
        {"consolidate": {"enabled": True, "dtype": "bf16", "keep_sharded": 2, "on_error": "warn",
                         "tags": ["epoch"]}}
    ).consolidate
    assert (config.enabled, config.dtype, config.on_error, config.tags) == (True, Dtype.bf16, OnError.warn,
                                                                          [TagKind.epoch])
    assert config.keep_last() == 2
    assert config.converts("epoch_3") and not config.converts("step_1000") and not config.converts("init")


@pytest.mark.parametrize("keep, expected", [("all", None), ("none", 0), (0, 0), ("3", 3)])
def test_keep_sharded(keep, expected):
    assert compose_section({"consolidate": {"keep_sharded": keep}}).consolidate.keep_last() == expected


def test_every_problem_reported_with_its_full_key():
    section = {
        "consolidate": {"enabled": "maybe", "dtype": "f32", "keep_sharded": "last", "tags": ["init", "epochs"],
                        "verfiy": False, "on_error": "ignore", "bucket_mb": -1},
        "convert": {},
    }
    with pytest.raises(ConfigError) as info:
        compose_section(section)
    assert str(info.value) == (
        "invalid wenet_hooks configuration (8 problem(s)):\n"
        "  - wenet_hooks.consolidate.enabled: expected true or false; found 'maybe'\n"
        "  - wenet_hooks.consolidate.dtype: expected one of fp32, bf16, fp16; found 'f32'\n"
        "  - wenet_hooks.consolidate.keep_sharded: expected all, none or a number of folders to keep; found 'last'\n"
        "  - wenet_hooks.consolidate.tags: expected a list of init, step, epoch; found ['init', 'epochs']\n"
        "  - wenet_hooks.consolidate.verfiy: unknown key; expected one of enabled, dtype, verify, on_error, "
        "keep_sharded, tags, bucket_mb, sharded, resume\n"
        "  - wenet_hooks.consolidate.on_error: expected one of stop, warn; found 'ignore'\n"
        "  - wenet_hooks.consolidate.bucket_mb: expected a number of megabytes >= 0; found -1\n"
        "  - wenet_hooks.convert: unknown key; expected one of consolidate"
    )


def test_section_that_is_not_a_mapping():
    with pytest.raises(ConfigError, match=r"wenet_hooks.consolidate: expected a mapping of options; found True$"):
        compose_section({"consolidate": True})


def test_resume_off_unquoted_is_off_and_auto_is_auto():
    """WeNet reads train.yaml with YAML 1.1, where an unquoted ``off`` is false."""
    from wenet_hooks.wenet.config import Resume, compose_section

    written = yaml.safe_load("consolidate:\n  enabled: true\n  resume: off\n")
    assert written["consolidate"]["resume"] is False
    assert compose_section(written).consolidate.resume is Resume.off
    assert compose_section({"consolidate": {"resume": "auto"}}).consolidate.resume is Resume.auto
    with pytest.raises(ConfigError, match=r"wenet_hooks\.consolidate\.resume: expected one of off, auto; found 'yes'"):
        compose_section({"consolidate": {"resume": "yes"}})
