"""What every benchmark shares: the machine header, timing statistics, and the JSON + Markdown writer."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags_of_interest() -> list[str]:
    try:
        from cliplens._cpu import cpu_flags  # no torch import for a flag

        flags = cpu_flags()
    except ImportError:
        flags = frozenset()
    return sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"})


def machine() -> dict[str, Any]:
    """The header every result carries: CPU, cores, library versions, date, load."""
    import numpy
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_flags": cpu_flags_of_interest(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }
    for mod in ("open_clip", "onnxruntime"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


@dataclass(frozen=True)
class Stats:
    """Summary of repeated measurements: median and spread (min, max), all in the measurement's unit."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Stats":
        if not values:
            raise ValueError("no measurements")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def to_json(self) -> dict:
        return {"median": self.median, "min": self.low, "max": self.high, "n": self.n}

    def text(self, fmt: str = "{:.1f}") -> str:
        return f"{fmt.format(self.median)} ({fmt.format(self.low)}-{fmt.format(self.high)})"


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@dataclass
class Report:
    """One benchmark's results: tables (for Markdown) plus raw data (for JSON)."""

    name: str
    title: str
    config: dict
    machine: dict = field(default_factory=machine)
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def table(self, caption: str, header: list[str], rows: list[list[str]]) -> None:
        self.tables.append((caption, header, rows))

    def markdown(self) -> str:
        m = self.machine
        lines = [f"## {self.title}", "",
                 f"Machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['cpu_flags']) or 'no flags read'}), "
                 f"GPU: {m['gpu'] or 'none'}; torch {m['torch']} ({m['torch_threads']} threads), "
                 f"open_clip {m['open_clip']}, onnxruntime {m['onnxruntime'] or 'not installed'}, numpy {m['numpy']}, "
                 f"Python {m['python']}; {m['date']}; load average at start {m['load_average_start']}"
                 + (f", at end {m['load_average_end']}" if "load_average_end" in m else "") + ".", "",
                 f"Command: `{self.config.get('command', '')}`", ""]
        for caption, header, rows in self.tables:
            lines += [f"**{caption}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
            lines.append("")
        for note in self.notes:
            lines.append(f"- {note}")
        return "\n".join(lines).rstrip() + "\n"

    def to_json(self) -> dict:
        return {"benchmark": self.name, "title": self.title, "machine": self.machine, "config": self.config,
                "tables": [{"caption": c, "header": h, "rows": r} for c, h, r in self.tables],
                "data": self.data, "notes": self.notes}

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        """Write ``<name>.json`` and ``<name>.md`` into ``out_dir``; return both paths."""
        self.machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        out_dir.mkdir(parents=True, exist_ok=True)
        js, md = out_dir / f"{self.name}.json", out_dir / f"{self.name}.md"
        js.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        md.write_text(self.markdown())
        return js, md


def ratio(ours: float, reference: float) -> str:
    return f"{ours / reference:.2f}x" if reference > 0 else "n/a"


def peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS counter for this process (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def status_mb(field: str) -> float | None:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM, RssAnon, ...) in MiB; None without it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB since the last reset (VmHWM), else since start."""
    peak = status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (or another /proc/self/status ``field``) in MiB; NaN where unknown."""
    value = status_mb(field)
    return float("nan") if value is None else value
