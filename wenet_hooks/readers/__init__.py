"""Readers of checkpoints that already exist: DeepSpeed's sharded ``<tag>/``
(``sharded``), ``zero_to_fp32``'s folder-shaped ``<tag>.pt/`` (``folder``), both
through one loader that never runs code from a file (``safe_load``)."""
