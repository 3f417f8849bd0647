"""The single file: how its bytes are laid out and written (``writer``), what it must
hold (``manifest``), how that is checked (``verify``), how it appears at its final
path only once complete (``publish``) and how a save's files commit as a whole (``commit``)."""
