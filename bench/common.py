"""Shared pieces of the benchmarks: a model of a given size, timing, tables."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch
from torch import nn

WIDTH = 2048  # each layer holds WIDTH * WIDTH + WIDTH parameters (about 4.2 M)


def sized_model(params: float) -> nn.Module:
    """A stack of Linear layers holding about ``params`` parameters (plus a tied pair)."""
    torch.manual_seed(0)
    layers = max(1, round(params / (WIDTH * WIDTH + WIDTH)))
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)])


def median(values: list[float]) -> float:
    return statistics.median(values)


@contextmanager
def timer(out: list[float]):
    started = time.perf_counter()
    yield
    out.append(time.perf_counter() - started)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
