"""The property harness's long mode (issue #23): many generated models, every layer × built-in
perturbation at two levels, both engines, the six invariants a–f of ``tests/property_oracles.py``.

    nice python perf/properties.py --examples 300 --max-blocks 5 > properties.log

Prints one line per model that fails (its spec and failures) as it goes, and a last line
``M models, C cells, F failures (K kinds)``. Exit status 1 when anything failed. Failures are not
shrunk here: re-run one spec with ``tests/property_oracles.check`` and keep the smallest model that
still fails as a test in ``tests/test_properties_regressions.py``.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from property_models import specs  # noqa: E402
from property_oracles import ABSENT, check  # noqa: E402

QUOTED = re.compile(r"'[^']*'")  # a layer's name in a refusal: one line per kind of refusal


def kind_of(failure: str) -> str:
    """A failure without its numbers and paths: '(c) node_knockout p=1 loss …' per invariant and pattern."""
    kind = re.sub(r"blocks\.\d+\.|[-\d.]+\d|\[.*|(, [^,]*)? ?(at its strongest|loss|p=).*", "", failure)
    return re.sub(r"activation_\w+", "activation perturbations", kind)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=200, help="generated models (default 200)")
    ap.add_argument("--max-blocks", type=int, default=5, help="blocks per model at most (default 5)")
    ap.add_argument("--seed", type=int, default=0, help="Hypothesis seed (default 0)")
    args = ap.parse_args(argv)
    logger, level = logging.getLogger("lesionbench"), logging.getLogger("lesionbench").level
    logger.setLevel(logging.ERROR)  # cells that fail are in the results' error column
    try:
        return _run(args)
    finally:
        logger.setLevel(level)


def _run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    totals, kinds, refusals, t0 = Counter(), Counter(), Counter(), time.perf_counter()

    @seed(args.seed)
    @settings(
        max_examples=args.examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(specs(max_blocks=args.max_blocks))
    def one(spec):
        cells, failures, refused = check(spec, long=True)
        refusals.update(f"{name}: {QUOTED.sub('…', why)}" for name, why in refused.items() if why != ABSENT)
        totals["models"] += 1
        totals["cells"] += cells
        totals["failures"] += len(failures)
        totals["failed models"] += bool(failures)
        kinds.update({kind_of(f) for f in failures})
        if failures:
            print(f"FAIL {spec}", *(f"  {f}" for f in failures), sep="\n", flush=True)
        if totals["models"] % 10 == 0:
            print(
                f"... {totals['models']} models, {totals['cells']} cells, {totals['failures']} failures "
                f"({totals['failed models']} models), {time.perf_counter() - t0:.0f} s",
                flush=True,
            )

    one()
    for kind, n in kinds.most_common():
        print(f"  {n:5d} models: {kind}")
    for why, n in refusals.most_common():
        print(f"  {n:5d} models: refused before the run (not a failure) by {why}")
    print(f"{time.perf_counter() - t0:.0f} s")
    print(
        f"{totals['models']} models, {totals['cells']} cells, {totals['failures']} failures "
        f"({totals['failed models']} models, {len(kinds)} kinds)"
    )
    return 1 if totals["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
