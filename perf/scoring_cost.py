"""Scoring the committed leaderboard with intervals: seconds for ``publish`` (read, bootstrap, render).

    python perf/scoring_cost.py [--replicates 1000]

Copies the committed runs (``leaderboard/results/``, each with its per-image ``outcomes.arrow``) to a
temporary directory and times :func:`lesionbench.publish.publish` (no plots) over all of them twice:
with the outcomes (every score with its bootstrap interval) and with the outcomes removed (point
scores only), and prints both.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from lesionbench.publish import publish
from lesionbench.store import OUTCOMES, read_results

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "results"
        shutil.copytree(REPO / "leaderboard" / "results", copy)
        cells = sum(len(read_results(run)) for run in sorted(copy.iterdir()))
        started = time.perf_counter()
        out = publish([copy], Path(tmp) / "with.md", draw=False)
        with_ci = time.perf_counter() - started
        assert "[" in out.read_text()  # intervals
        for run in list(copy.iterdir()):
            manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").exists() else {}
            if manifest.get("results_schema", 1) >= 2:  # its rows point into their outcomes: unreadable without
                shutil.rmtree(run)
            else:
                (run / OUTCOMES).unlink(missing_ok=True)
        started = time.perf_counter()
        publish([copy], Path(tmp) / "plain.md", draw=False)
        plain = time.perf_counter() - started
    print(
        f"{cells} cells; publish without outcomes (runs of results schema 1 only) {plain:.1f} s; with outcomes and their bootstrap intervals "
        f"{with_ci:.1f} s"
    )


if __name__ == "__main__":
    main()
