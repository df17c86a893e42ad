"""How much memory and disk a study may use: the budgets of the evaluation set and the fast engine.

The budget comes from the memory the system has available (``MemAvailable`` in
``/proc/meminfo``, as ``free`` reports it), not from a fixed constant: a quarter of it, at most
2 GiB. ``$LESIONBENCH_MEMORY_BUDGET`` (bytes, or with a ``K``/``M``/``G`` suffix, powers of
1024) overrides it. Disk space is checked before anything large is written, so a study that
cannot fit says so in one line before it starts rather than failing half-way.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from lesionbench.errors import LesionbenchError

MAX_BUDGET_BYTES = 2 * 1024**3
MIN_BUDGET_BYTES = 64 * 1024**2
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def available_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes; None where there is no such file (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def parse_bytes(text: str) -> int:
    """``"1536M"`` → 1610612736; a plain number is bytes. Raises LesionbenchError on anything else."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _UNITS and value[-1:] else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise LesionbenchError(f"not a size in bytes: {text!r} (e.g. 1500000000, 1536M, 2G)") from None
    if number <= 0:
        raise LesionbenchError(f"a memory budget must be positive, got {text!r}")
    return int(number * _UNITS[unit])


def memory_budget(available: int | None = None) -> int:
    """Bytes the fast engine's cache (and an in-memory evaluation set) may take, each.

    ``$LESIONBENCH_MEMORY_BUDGET`` when set; else a quarter of ``available`` (default: the
    system's available memory; the engine passes a GPU's free memory for caches on it), between
    64 MiB and 2 GiB (2 GiB where the available memory is unknown).
    """
    override = os.environ.get("LESIONBENCH_MEMORY_BUDGET")
    if override:
        return parse_bytes(override)
    if available is None:
        available = available_bytes()
    if available is None:
        return MAX_BUDGET_BYTES
    return max(MIN_BUDGET_BYTES, min(MAX_BUDGET_BYTES, available // 4))


def scratch_dir() -> str:
    """Where large temporary files go: ``$LESIONBENCH_SPILL_DIR`` or the system's temporary directory."""
    return os.environ.get("LESIONBENCH_SPILL_DIR") or tempfile.gettempdir()


def check_disk(need: int, what: str, where: str | None = None) -> None:
    """Raise LesionbenchError (one line) when ``need`` bytes for ``what`` do not fit on the disk of
    ``where`` (default :func:`scratch_dir`), keeping 1 GiB free for everything else."""
    where = where or scratch_dir()
    free = shutil.disk_usage(where).free
    if need + 1024**3 > free:
        raise LesionbenchError(
            f"{what} needs {need / 1024**3:.1f} GiB on disk but {where} has {free / 1024**3:.1f} GiB free: "
            "free some space, or point LESIONBENCH_SPILL_DIR at a larger disk"
        )
