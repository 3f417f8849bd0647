"""The keys and shapes of the model a WeNet ``train.yaml`` builds (needs WeNet importable)."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from wenet_hooks.errors import WenetHooksError
from wenet_hooks.file.manifest import Manifest


def manifest_from_wenet_config(config_path: Path) -> Manifest:
    """Build the model with WeNet's own ``init_model`` and describe its ``state_dict()``."""
    try:
        from wenet.utils.init_model import init_model
    except ImportError as e:
        raise WenetHooksError(f"config={config_path} needs WeNet to build the model, but it cannot be imported "
                              f"({e}); HINT: export PYTHONPATH=/path/to/wenet, or leave config unset") from e
    try:
        with open(config_path) as fin:
            configs = yaml.load(fin, Loader=yaml.FullLoader)
    except OSError as e:
        raise WenetHooksError(f"config={config_path} cannot be read ({e.strerror})") from e
    # LoRA layers change the keys; WeNet records them in the train.yaml it writes to model_dir.
    args = argparse.Namespace(checkpoint=None, enc_init=None, jit=False, use_lora="lora_conf" in configs,
                              only_optimize_lora=False)
    model, _ = init_model(args, configs)
    return Manifest.from_state_dict(model.state_dict(), checksums=False)
