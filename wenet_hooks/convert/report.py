"""What the offline command shows: a progress bar per tag, a plan, a summary table."""

from __future__ import annotations

import sys
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

from tqdm import tqdm

if TYPE_CHECKING:
    from wenet_hooks.convert.plan import Source
    from wenet_hooks.file.writer import Value


@dataclass
class Outcome:
    """One row of the summary table."""

    tag: str
    kind: str
    zero_stage: str = "-"
    world_size: str = "-"
    tensors: int = 0
    nbytes: int = 0
    dtype: str = "-"
    seconds: float = 0.0
    verified: str = "no"
    error: Optional[str] = None


class Progress:
    """Bytes and tensors read for one tag (shown on a terminal, silent in a pipe)."""

    def __init__(self, tag: str) -> None:
        self._bar = tqdm(desc=f"{tag}: reading", unit="B", unit_scale=True, unit_divisor=1024,
                         disable=None, leave=False, file=sys.stderr)
        self._tensors = 0

    def update(self, value: Value) -> None:
        self._tensors += 1
        self._bar.set_postfix(tensors=self._tensors, refresh=False)
        self._bar.update(value.nbytes)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)


def print_plan(sources: Sequence[Source], model_dir: Path) -> None:
    rows = [[s.tag, s.kind, str(s.path), str(model_dir / f"{s.tag}.pt")] for s in sources]
    print(table(["tag", "source", "read from", "would write"], rows) if rows else "nothing to convert")
    print(f"dry run: {len(rows)} tag(s) would be converted; nothing was written")


def print_summary(outcomes: Sequence[Outcome]) -> None:
    """One narrow row per tag; each failure's message listed under the table, not in it."""
    header = ["tag", "source", "zero", "world", "tensors", "MB", "dtype", "seconds", "verified"]
    rows = [[o.tag, o.kind, o.zero_stage, o.world_size, str(o.tensors), f"{o.nbytes / 1e6:.1f}", o.dtype,
             f"{o.seconds:.2f}", "FAILED" if o.error else o.verified] for o in outcomes]
    print(table(header, rows) if rows else "nothing to convert: every tag already has a valid single-file .pt")
    failed = [o for o in outcomes if o.error]
    print(f"{len(outcomes) - len(failed)} converted, {len(failed)} failed")
    for o in failed:
        print(f"  {o.tag}: {o.error}")
