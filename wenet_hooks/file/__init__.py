"""The single file: how its bytes are laid out and written (``layout``), what it must
hold (``manifest``), how that is checked (``verify``) and how it appears at its final
path only once complete (``publish``)."""
