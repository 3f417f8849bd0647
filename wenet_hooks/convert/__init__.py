"""``wenet-hooks-convert``: existing checkpoints of a WeNet ``model_dir`` into single files.

``plan`` finds what to convert, ``run`` reads each tag (:mod:`wenet_hooks.readers`)
and publishes it (:mod:`wenet_hooks.file`), ``report`` shows progress and the
summary, ``cli`` is the Hydra application and ``options`` its schema.
"""
