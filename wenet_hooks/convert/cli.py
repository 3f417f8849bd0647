"""``wenet-hooks-convert``: the offline command, a Hydra application.

    wenet-hooks-convert model_dir=exp/whisper tag=epoch_7
    wenet-hooks-convert model_dir=exp/whisper dry_run=true
    wenet-hooks-convert model_dir=exp/whisper dtype=bf16 keep_sharded=none

Exit status: 0 when everything asked for was converted (or, with dry_run,
could be); 2 otherwise. Never "skipping" with status 0.

A command line of plain ``key=value`` words is read without Hydra
(:mod:`wenet_hooks.convert.plain_args`: the same config, 0.5 s sooner);
everything else goes through Hydra.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from wenet_hooks.convert.options import ConvertConfig

# Hydra finds the packaged conf/ (installed as the package wenet_hooks.conf).
CONFIG_PATH = "pkg://wenet_hooks.conf"
CONFIG_NAME = "convert"


def main() -> None:
    """Console entry point of ``wenet-hooks-convert``."""
    from wenet_hooks.convert.plain_args import configure_logging, plain_config

    config = plain_config(sys.argv[1:])
    if config is not None:  # plain key=value words: the same config, without Hydra's 0.5 s
        configure_logging()
        _run(config)
        return
    import hydra

    from wenet_hooks.convert.options import register_schema

    register_schema()
    # Built here, not at import: importing this module looks nothing up.
    hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=CONFIG_NAME)(_run_config)()


def _run_config(cfg) -> Optional[int]:
    from omegaconf import OmegaConf

    _run(OmegaConf.to_object(cfg))
    return None


def _run(config: ConvertConfig) -> None:
    from wenet_hooks.convert.run import run

    status = run(config)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
