"""``python -m wenet_hooks.train <WeNet's train.py arguments>``: WeNet's train.py with the
hook installed explicitly (the entry itself lives in :mod:`wenet_hooks.wenet.train`)."""

from wenet_hooks.wenet.train import main

if __name__ == "__main__":
    main()
