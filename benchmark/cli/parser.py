"""The ``lesionbench`` argument parser: commands, flags and their help (no command's logic).

Choices that plugins extend (``--executor``, ``--score``) are checked against the registry when a
command runs, not here, so that ``--help`` imports no plugin.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lesionbench.registry import KINDS, SINGULAR

DESCRIPTION = """\
lesionbench: damage a trained network one layer at a time and measure how much accuracy is left.

A study (models × layers × perturbations × levels × random draws) runs into a crash-safe run
directory (results.csv, manifest.json, run.log); its layer-robustness scores (1 = the layer's
damage never cost accuracy, 0 = chance at every damaged level), a Markdown leaderboard and figures
are written beside it."""

EPILOG = """\
examples:
  lesionbench run                          the offline demo: Fashion-MNIST AlexNet, 1,225 cells
  lesionbench run demo --draws 2 --layers conv1,fc8 --out runs/quick
  lesionbench run imagenet-track --data /path/to/imagenet/val
  lesionbench run --models fashion_vgg --dataset fashion_mnist --perturbations weight_noise
  lesionbench run --resume runs/demo       finish an interrupted run
  lesionbench run --resume runs/demo --redo weight_noise   evaluate its weight_noise cells again
  lesionbench list perturbations           what each one does, its levels, range and unit
  lesionbench leaderboard runs --out LEADERBOARD.md
  lesionbench compare runs/new runs/baseline
  lesionbench verify runs/demo --sample 20 re-run 20 random cells and the clean pass, compare

exit codes: 0 success, 1 compare found a regression, 2 bad input, 3 run finished but a model was not
scored (clean accuracy at chance), 130 interrupted (Ctrl-C),
143 terminated (SIGTERM); both print the command that finishes the run"""


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _default_text(value) -> str:
    """How a flag's help ends: the study's value, else the option's own default."""
    if value is None:
        return "(default: the study's value, if it sets one)"
    shown = ("on" if value else "off") if isinstance(value, bool) else str(value)
    return f"(default: the study's value, else {shown})"


def add_study_options(parser: argparse.ArgumentParser) -> None:
    """A ``--flag`` for each study option declared with one (see lesionbench.study.option); its
    help ends with the default a study gets when it does not set the option."""
    from dataclasses import MISSING

    from lesionbench.study import Study, option_fields, option_type

    for f in option_fields(Study):
        meta = f.metadata
        if not meta.get("flag"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        text = f"{meta['help']} {_default_text(default)}"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", default=None, help=text)
        else:
            kind = option_type(f.name) or str
            metavar = None if meta.get("choices") else f.name.upper().split("_")[-1]
            parser.add_argument(flag, type=kind, choices=meta.get("choices"), metavar=metavar, help=text)


def _add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """The study and the flags that override it: shared by ``run`` and ``plan``."""
    from lesionbench.study import DatasetSpec

    parser.add_argument(
        "study",
        nargs="?",
        help="preset name (lesionbench list studies) or path to a study TOML file (default: demo; "
        "with --resume: the study recorded in the run directory)",
    )
    parser.add_argument(
        "--models",
        type=_names,
        metavar="A,B",
        help="comma-separated model references replacing the study's (lesionbench list models); "
        "one the study lists keeps its weights, a new one gets its source's default weights "
        "(default: the study's models)",
    )
    parser.add_argument(
        "--dataset",
        metavar="NAME",
        help="dataset plugin (lesionbench list datasets); another dataset than the study's drops "
        "the study's path and split, so give --data (default: the study's dataset)",
    )
    parser.add_argument("--data", metavar="PATH", help="dataset path (default: the study's, else the plugin's own)")
    parser.add_argument(
        "--n-images",
        type=int,
        metavar="N",
        help=f"size of the seeded, class-balanced evaluation subset {_default_text(DatasetSpec().n_images)}",
    )
    parser.add_argument(
        "--layers",
        type=_names,
        metavar="A,B",
        help="comma-separated layer names or aliases (default: the study's value, else every Conv/Linear layer)",
    )
    parser.add_argument(
        "--perturbations",
        type=_names,
        metavar="A,B",
        help="comma-separated perturbation names, see lesionbench list perturbations (default: the study's)",
    )
    parser.add_argument(
        "--levels",
        type=_floats,
        metavar="X,Y",
        help="comma-separated levels for every perturbation (default: each perturbation's own)",
    )
    add_study_options(parser)


def add_score_option(parser: argparse.ArgumentParser) -> None:
    from lesionbench.layer_score import DEFAULT_SCORE

    parser.add_argument(
        "--score",
        default=DEFAULT_SCORE,
        metavar="NAME",
        help=f"the layer score, one of lesionbench list scores (default: {DEFAULT_SCORE})",
    )


def _kind(text: str) -> str:
    """``list``'s kind: the plural, or its singular (``model`` → ``models``)."""
    plural = {singular: kind for kind, singular in SINGULAR.items()}
    return plural.get(text, text)


def _sub(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help,
        description=description or help[0].upper() + help[1:] + ".",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lesionbench", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from lesionbench import __version__

    parser.add_argument("--version", action="version", version=f"lesionbench {__version__}")
    parser.add_argument(
        "-p",
        dest="plugin_switches",
        action="append",
        default=[],
        metavar="no:NAME",
        help="switch a plugin off by name, as pytest's -p no:NAME (repeatable; lesionbench plugins "
        "lists the names); its models, perturbations, executors… are then unknown (default: "
        "every plugin on)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    run = _sub(
        sub,
        "run",
        "run a study (default: the offline 'demo' preset)",
        "Run a study: every model × layer × perturbation × level × draw, one row per cell in\n"
        "DIR/results.csv (appended and fsynced, so an interrupted run resumes with --resume DIR),\n"
        "then the scores table here and DIR/LEADERBOARD.md with figures in DIR/plots.\n"
        "Flags override the study; those not given keep the study's values.",
    )
    _add_study_arguments(run)
    run.add_argument("--out", type=Path, metavar="DIR", help="run directory (default: runs/<study name>)")
    run.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="finish the cells missing from the run in DIR; starts the study there if DIR holds no run "
        "yet, and says so (exit 0) if the run is complete (default: start a new run in --out)",
    )
    run.add_argument(
        "--redo",
        type=_names,
        metavar="A,B",
        help="with --resume: drop every cell of these perturbations and evaluate them again with this "
        "lesionbench, keeping the other rows (after a perturbation's definition changed; the "
        "manifest records it) (default: none)",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the cells and an estimate of the time, as lesionbench plan does; run nothing (default: off)",
    )
    run.add_argument("--debug", action="store_true", help="verify the model checksum after every cell (default: off)")
    run.add_argument(
        "--no-plots",
        action="store_true",
        help="write DIR/LEADERBOARD.md without figures (default: with figures in DIR/plots)",
    )
    run.add_argument(
        "--no-publish",
        action="store_true",
        help="neither leaderboard nor figures: publish later with `lesionbench leaderboard DIR "
        "--out DIR/LEADERBOARD.md` (default: publish when the run ends)",
    )
    run.add_argument(
        "--executor",
        default="local",
        metavar="NAME",
        help="where the blocks run, one of lesionbench list executors: local evaluates here, ray runs "
        "one task per block on a Ray cluster, pip install 'lesionbench[ray]' (default: local)",
    )
    run.add_argument(
        "--executor-option",
        dest="executor_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the chosen executor, repeatable; lesionbench list executors names each "
        "executor's options (default: none)",
    )
    run.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="Ray cluster for --executor ray: auto (this node's cluster) or ray://host:10001; the same "
        "as --executor-option address=ADDRESS (default: start a local one)",
    )
    add_score_option(run)

    plan = _sub(
        sub,
        "plan",
        "the cells of a study and an estimate of its time, before anything runs",
        "Prepare a study as run does (every check, the models built, the evaluation subset chosen),\n"
        "then print its cells per model and an estimate of the time: one forward pass of each model\n"
        "timed on a few images, scaled to the subset, times its cells (an upper bound: the fast engine\n"
        "evaluates only what follows the damaged layer). Nothing is evaluated or written.",
    )
    _add_study_arguments(plan)

    lst = _sub(sub, "list", "list models, perturbations, datasets or studies")
    lst.add_argument(
        "kind",
        type=_kind,
        choices=sorted(KINDS),
        metavar="{" + ",".join(sorted(KINDS)) + "}",
        help="what to list (the singular works too: list model)",
    )

    _sub(sub, "plugins", "list loaded plugins, their distributions and what each contributes")

    board = _sub(sub, "leaderboard", "render the leaderboard (and figures) from result files: Markdown, JSON, HTML")
    board.add_argument("results", nargs="+", type=Path, help="results.csv files or directories holding them")
    board.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="the leaderboard's file (default: leaderboard/LEADERBOARD.md, .json, .html: the format's)",
    )
    board.add_argument(
        "--format",
        default="md",
        metavar="NAME",
        help="a reporter: md, json, html or a plugin's (lesionbench list reporters; default: md)",
    )
    board.add_argument("--plots", type=Path, metavar="DIR", help="figure directory (default: plots/ beside --out)")
    board.add_argument(
        "--no-plots", action="store_true", help="only the leaderboard's documents (default: draw the figures)"
    )
    board.add_argument(
        "--metric",
        choices=["top1", "top5"],
        help="score from this metric (default: the one each run's manifest records)",
    )
    board.add_argument(
        "--title", default="lesionbench leaderboard", help="the leaderboard's title (default: lesionbench leaderboard)"
    )
    add_score_option(board)

    cmp = _sub(sub, "compare", "CI gate: exit 1 when a layer score or clean accuracy drops, significantly")
    cmp.add_argument("new", type=Path, help="new results.csv or run directory")
    cmp.add_argument("baseline", type=Path, help="baseline results.csv or run directory")
    cmp.add_argument(
        "--max-drop", type=float, default=0.05, metavar="D", help="largest tolerated drop, absolute (default: 0.05)"
    )
    cmp.add_argument("--metric", choices=["top1", "top5"], help="default: the new run's study metric")
    cmp.add_argument("--all", action="store_true", help="show unchanged quantities too (default: off)")
    add_score_option(cmp)

    from lesionbench.cli.verify import add_verify

    add_verify(sub, _sub)

    train = _sub(sub, "train", "train a model from scratch and save its weights")
    train.add_argument("model", help="model reference, e.g. fashion_alexnet")
    train.add_argument("--dataset", default="fashion_mnist", help="dataset plugin (default: fashion_mnist)")
    train.add_argument("--data", metavar="PATH", help="dataset path (default: the plugin's own)")
    train.add_argument("--epochs", type=int, default=8, help="passes over the training set (default: 8)")
    train.add_argument("--batch-size", type=int, default=128, help="training batch size (default: 128)")
    train.add_argument("--lr", type=float, default=2e-3, help="learning rate (default: 0.002)")
    train.add_argument("--seed", type=int, default=0, help="seed of initialisation and shuffling (default: 0)")
    train.add_argument("--out", type=Path, metavar="FILE", help="weights file (default: models/weights/<model>.pt)")
    return parser
