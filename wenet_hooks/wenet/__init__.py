"""The WeNet adapter: installs into WeNet's save path (see ``install``)."""

from wenet_hooks.wenet.patch import install, is_installed, uninstall

__all__ = ["install", "is_installed", "uninstall"]
