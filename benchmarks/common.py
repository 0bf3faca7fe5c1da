"""Shared parts of the benchmarks: a table row, the table, the machine line, the README block."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


@dataclass
class Row:
    """One line of the benchmark table: a measured figure, what it is held against, the ratio.

    ``target`` is a goal (the verdict says whether it is met); ``anchor`` is a reference value
    the figure is compared with but not judged by. ``label`` names the target or anchor.
    """

    figure: str
    value: float
    unit: str = ""
    target: float | None = None
    anchor: float | None = None
    label: str = ""
    higher_is_better: bool = True
    digits: int = 1
    passed: bool | None = None  # the verdict of a figure judged by a condition, not a number

    def verdict(self) -> str:
        if self.target is None:
            return "" if self.passed is None else ("met" if self.passed else "NOT met")
        ok = self.value >= self.target if self.higher_is_better else self.value <= self.target
        return "met" if ok else "NOT met"

    def _fmt(self, value: float) -> str:
        return f"{value:,.{self.digits}f}" + (f" {self.unit}" if self.unit else "")

    def cells(self) -> list[str]:
        reference = self.target if self.target is not None else self.anchor
        if reference is None:
            against, ratio = self.label, ""
        else:
            sign = ("≥ " if self.higher_is_better else "≤ ") if self.target is not None else ""
            against = f"{sign}{self._fmt(reference)}" + (f" ({self.label})" if self.label else "")
            ratio = f"{self.value / reference:.2f}" if reference else ""
        return [self.figure, self._fmt(self.value), against, ratio, self.verdict()]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    mem = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        kib = int(meminfo.read_text().split()[1])
        mem = f", {kib / 2**20:.0f} GiB RAM"
    import torch

    from taxonomist.data.auto import choose_precision

    caps = torch.cpu.get_capabilities()
    flags = [f for f in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16") if caps.get(f)]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA device)"
    precision, _ = choose_precision()
    return (
        f"{cpu} ({', '.join(flags) or 'no AVX2'}; bf16 instructions: "
        f"{'yes' if {'avx512_bf16', 'amx_bf16'} & set(flags) else 'no'}), {os.cpu_count()} cores{mem}, "
        f"Python {platform.python_version()}, torch {torch.__version__}; device: {device}, "
        f"precision auto = {precision}"
    )


def table(rows: list[Row]) -> str:
    header = ["figure", "measured", "target or anchor", "ratio", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def show_in_readme(body: str, markers: tuple[str, str]) -> None:
    """Replace the README's text between ``markers`` (the benchmark block) with ``body``."""
    text = README.read_text()
    start, end = markers
    if start not in text or end not in text:
        print(f"README.md has no {start} ... {end} block; not updated", file=sys.stderr)
        return
    head, rest = text.split(start, 1)
    README.write_text(f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}")
