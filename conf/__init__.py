"""Hydra configs shipped with wenet_hooks (installed as the package ``wenet_hooks.conf``)."""
