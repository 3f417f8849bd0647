"""Explicit entry: ``python -m wenet_hooks.train <WeNet's train.py arguments>``.

The same as ``python wenet/bin/train.py ...`` with wenet_hooks installed
first, for people who prefer that to the start-up hook (or run with
``WENET_HOOKS_DISABLE=1``). WeNet must be importable (on PYTHONPATH)::

    torchrun --nproc_per_node 8 -m wenet_hooks.train --train_engine deepspeed \\
        --deepspeed_config conf/ds_stage2.json --config conf/train.yaml ...
"""

from __future__ import annotations

import runpy
import sys

WENET_TRAIN = "wenet.bin.train"


def main() -> None:
    from wenet_hooks.wenet.patch import install

    try:
        install()
    except ModuleNotFoundError as e:
        raise SystemExit(
            f"wenet_hooks.train: cannot import WeNet ({e}); HINT: put your WeNet checkout on "
            "PYTHONPATH, e.g. `export PYTHONPATH=/path/to/wenet:$PYTHONPATH`"
        ) from e
    sys.argv = [WENET_TRAIN.replace(".", "/") + ".py", *sys.argv[1:]]
    runpy.run_module(WENET_TRAIN, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
