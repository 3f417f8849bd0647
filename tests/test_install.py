"""Installing into WeNet: every holder of save_model rebound, idempotent, reversible, cheap."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from conftest import STANDIN, TESTS
from wenet_hooks.wenet import patch as patch_module


@pytest.fixture
def fake_wenet(monkeypatch):
    """Modules shaped like WeNet's train_utils and two by-name importers."""
    def save_model(model, info_dict):
        return "original"

    def check_modify_and_save_config(args, configs, symbol_table):
        return configs

    train_utils = types.ModuleType("wenet.utils.train_utils")
    train_utils.save_model = save_model
    train_utils.check_modify_and_save_config = check_modify_and_save_config
    executor = types.ModuleType("wenet.utils.executor")
    executor.save_model = save_model
    main = types.ModuleType("fake_train_main")
    main.save_model, main.check_modify_and_save_config = save_model, check_modify_and_save_config
    for mod in (train_utils, executor, main):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    yield train_utils, executor, main, save_model
    patch_module.uninstall()


def test_rebinds_every_holder_once_and_uninstall_restores(fake_wenet):
    train_utils, executor, main, original = fake_wenet
    places = patch_module.patch_train_utils(train_utils)
    assert sorted(places) == [
        "fake_train_main.check_modify_and_save_config", "fake_train_main.save_model",
        "wenet.utils.executor.save_model",
        "wenet.utils.train_utils.check_modify_and_save_config", "wenet.utils.train_utils.save_model",
    ]
    assert train_utils.save_model is executor.save_model is main.save_model is not original
    assert train_utils.save_model.__wenet_hooks_original__ is original
    assert patch_module.patch_train_utils(train_utils) == []  # idempotent
    assert train_utils.save_model.__wenet_hooks_original__ is original
    patch_module.uninstall()
    assert train_utils.save_model is executor.save_model is main.save_model is original
    assert not patch_module.is_installed()


def test_inactive_wrapper_calls_the_original(fake_wenet):
    train_utils, *_ = fake_wenet
    patch_module.patch_train_utils(train_utils)
    assert train_utils.save_model(object(), {"tag": "init", "train_engine": "torch_ddp"}) == "original"


def _python(code, **env):
    # The last line: DeepSpeed 0.14 prints a log line of its own on import.
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, **env}).stdout.strip().splitlines()[-1]


def test_startup_hook_costs_nothing_without_wenet():
    loaded = _python("import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in "
                     "('torch', 'wenet_hooks', 'hydra', 'deepspeed', 'omegaconf')))")
    # The .pth imports the finder alone: the package and adapter __init__s load nothing on import.
    assert loaded == "['wenet_hooks', 'wenet_hooks.wenet', 'wenet_hooks.wenet.autoload']"
    finders = _python("import sys; print([type(f).__name__ for f in sys.meta_path][0])")
    assert finders == "TrainUtilsFinder"


def test_startup_hook_patches_train_utils_on_import_and_env_switch_disables_it():
    code = ("import wenet.utils.train_utils as t; "
            "print(hasattr(t.save_model, '__wenet_hooks_original__'))")
    path = {"PYTHONPATH": os.pathsep.join([str(STANDIN), str(TESTS)])}
    assert _python(code, **path) == "True"
    assert _python(code, WENET_HOOKS_DISABLE="1", **path) == "False"
