"""The ``lesionbench`` command line: the only place that knows argparse, rich and publishing.

Exit codes: 0 success, 1 a regression found by ``compare``, 2 bad input (one line on stderr),
3 ``run`` finished but a model was not scored (its clean accuracy is not beyond chance), 130 interrupted, 143 terminated (SIGTERM): the last line says how to finish the run. Heavy
libraries (torch, pandas, matplotlib…) are imported by the commands that use them, so ``--help``
answers at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lesionbench.cli.tables import print_table
from lesionbench.errors import LesionbenchError
from lesionbench.registry import KINDS, SINGULAR, get_registry

DESCRIPTION = """\
lesionbench: damage a trained network one layer at a time and measure how much accuracy is left.

A study (models × layers × perturbations × levels × random draws) runs into a crash-safe run
directory (results.csv, manifest.json, run.log); its layer-robustness scores (1 = the layer's
damage never cost accuracy, 0 = chance from the first step), a Markdown leaderboard and figures
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

NOT_SCORED_EXIT = 3  # run: finished, but a model was not scored (clean accuracy at chance)
WIDE = 1000  # columns for output that is not a terminal: tables are never cut to 80


def make_console(stderr: bool = False) -> Console:
    """A console; where output is not a terminal (CI, ``> log``) and COLUMNS is not set, wide
    enough that tables keep their natural width instead of rich's default of 80 columns."""
    out = Console(stderr=stderr)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out = Console(stderr=stderr, width=WIDE)
    return out


console = make_console()
err_console = make_console(stderr=True)
log = logging.getLogger("lesionbench")


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

    parser.add_argument("study", nargs="?",
                        help="preset name (lesionbench list studies) or path to a study TOML file (default: demo; "
                             "with --resume: the study recorded in the run directory)")  # fmt: skip
    parser.add_argument("--models", type=_names, metavar="A,B",
                        help="comma-separated model references replacing the study's (lesionbench list models); "
                             "one the study lists keeps its weights, a new one gets its source's default weights "
                             "(default: the study's models)")  # fmt: skip
    parser.add_argument("--dataset", metavar="NAME",
                        help="dataset plugin (lesionbench list datasets); another dataset than the study's drops "
                             "the study's path and split, so give --data (default: the study's dataset)")  # fmt: skip
    parser.add_argument("--data", metavar="PATH", help="dataset path (default: the study's, else the plugin's own)")
    parser.add_argument("--n-images", type=int, metavar="N",
                        help=f"size of the seeded, class-balanced evaluation subset {_default_text(DatasetSpec().n_images)}")
    parser.add_argument("--layers", type=_names, metavar="A,B",
                        help="comma-separated layer names or aliases (default: the study's value, else every Conv/Linear layer)")
    parser.add_argument("--perturbations", type=_names, metavar="A,B",
                        help="comma-separated perturbation names, see lesionbench list perturbations (default: the study's)")
    parser.add_argument("--levels", type=_floats, metavar="X,Y",
                        help="comma-separated levels for every perturbation (default: each perturbation's own)")
    add_study_options(parser)


def _kind(text: str) -> str:
    """``list``'s kind: the plural, or its singular (``model`` → ``models``)."""
    plural = {singular: kind for kind, singular in SINGULAR.items()}
    return plural.get(text, text)


def _sub(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description or help[0].upper() + help[1:] + ".",
                          formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lesionbench", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    from lesionbench import __version__

    parser.add_argument("--version", action="version", version=f"lesionbench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    run = _sub(sub, "run", "run a study (default: the offline 'demo' preset)",
               "Run a study: every model × layer × perturbation × level × draw, one row per cell in\n"
               "DIR/results.csv (appended and fsynced, so an interrupted run resumes with --resume DIR),\n"
               "then the scores table here and DIR/LEADERBOARD.md with figures in DIR/plots.\n"
               "Flags override the study; those not given keep the study's values.")  # fmt: skip
    _add_study_arguments(run)
    run.add_argument("--out", type=Path, metavar="DIR", help="run directory (default: runs/<study name>)")
    run.add_argument("--resume", type=Path, metavar="DIR",
                     help="finish the cells missing from the run in DIR; starts the study there if DIR holds no run "
                          "yet, and says so (exit 0) if the run is complete (default: start a new run in --out)")
    run.add_argument("--redo", type=_names, metavar="A,B",
                     help="with --resume: drop every cell of these perturbations and evaluate them again with this "
                          "lesionbench, keeping the other rows (after a perturbation's definition changed; the "
                          "manifest records it) (default: none)")  # fmt: skip
    run.add_argument("--dry-run", action="store_true",
                     help="print the cells and an estimate of the time, as lesionbench plan does; run nothing (default: off)")
    run.add_argument("--debug", action="store_true",
                     help="verify the model checksum after every cell (default: off)")
    run.add_argument("--no-plots", action="store_true",
                     help="write DIR/LEADERBOARD.md without figures (default: with figures in DIR/plots)")
    run.add_argument("--no-publish", action="store_true",
                     help="neither leaderboard nor figures: publish later with `lesionbench leaderboard DIR "
                          "--out DIR/LEADERBOARD.md` (default: publish when the run ends)")  # fmt: skip
    run.add_argument("--executor", choices=["local", "ray"], default="local",
                     help="local: evaluate here; ray: one task per block on a Ray cluster, "
                          "pip install 'lesionbench[ray]' (default: local)")  # fmt: skip
    run.add_argument("--ray-address", metavar="ADDRESS",
                     help="Ray cluster for --executor ray: auto (this node's cluster) or ray://host:10001 "
                          "(default: start a local one)")  # fmt: skip

    plan = _sub(sub, "plan", "the cells of a study and an estimate of its time, before anything runs",
                "Prepare a study as run does (every check, the models built, the evaluation subset chosen),\n"
                "then print its cells per model and an estimate of the time: one forward pass of each model\n"
                "timed on a few images, scaled to the subset, times its cells (an upper bound: the fast engine\n"
                "evaluates only what follows the damaged layer). Nothing is evaluated or written.")  # fmt: skip
    _add_study_arguments(plan)

    lst = _sub(sub, "list", "list models, perturbations, datasets or studies")
    lst.add_argument("kind", type=_kind, choices=sorted(KINDS), metavar="{" + ",".join(sorted(KINDS)) + "}",
                     help="what to list (the singular works too: list model)")

    _sub(sub, "plugins", "list loaded plugins, their distributions and what each contributes")

    board = _sub(sub, "leaderboard", "render the Markdown leaderboard (and figures) from result files")
    board.add_argument("results", nargs="+", type=Path, help="results.csv files or directories holding them")
    board.add_argument("--out", type=Path, default=Path("leaderboard/LEADERBOARD.md"), metavar="FILE",
                       help="the Markdown file (default: leaderboard/LEADERBOARD.md)")
    board.add_argument("--plots", type=Path, metavar="DIR", help="figure directory (default: plots/ beside --out)")
    board.add_argument("--no-plots", action="store_true", help="only the Markdown (default: draw the figures)")
    board.add_argument("--metric", choices=["top1", "top5"],
                       help="score from this metric (default: the one each run's manifest records)")
    board.add_argument("--title", default="lesionbench leaderboard",
                       help="the Markdown title (default: lesionbench leaderboard)")

    cmp = _sub(sub, "compare", "CI gate: exit 1 when a layer score or clean accuracy drops, significantly")
    cmp.add_argument("new", type=Path, help="new results.csv or run directory")
    cmp.add_argument("baseline", type=Path, help="baseline results.csv or run directory")
    cmp.add_argument("--max-drop", type=float, default=0.05, metavar="D",
                     help="largest tolerated drop, absolute (default: 0.05)")
    cmp.add_argument("--metric", choices=["top1", "top5"], help="default: the new run's study metric")
    cmp.add_argument("--all", action="store_true", help="show unchanged quantities too (default: off)")

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


def cmd_list(args) -> int:
    registry = get_registry()
    items = registry.contributions(args.kind)
    table = Table(title=f"lesionbench {args.kind}")
    table.add_column("name", no_wrap=True)
    table.add_column("plugin")
    if args.kind == "perturbations":
        for column in ("levels (default)", "range", "level axis"):
            table.add_column(column)
    table.add_column("description")
    for name in sorted(items):
        c = items[name]
        if args.kind == "models":  # a source: the names it claims, then what its prefix reaches
            claimed = [arch for arch in c.obj.examples() if c.obj.claims(arch)]
            for arch in claimed:
                table.add_row(arch, c.plugin, c.description)
            others = [f"{name}:{arch}" for arch in c.obj.examples() if not c.obj.claims(arch)]
            table.add_row(f"{name}:<name>", c.plugin, c.description + (f" E.g. {', '.join(others)}." if others else ""))
        elif args.kind == "perturbations":
            table.add_row(name, c.plugin, *_level_columns(c.obj), c.description)
        else:
            table.add_row(name, c.plugin, c.description)
    print_table(console, table)
    _report_failures(registry)
    return 0


def _level_columns(perturbation) -> tuple[str, str, str]:
    """Default levels (shortened past six), range and level axis of a perturbation, for listings."""
    levels = [f"{x:g}" for x in perturbation.default_levels]
    shown = ", ".join(levels if len(levels) <= 6 else [*levels[:2], "…", levels[-1]])
    lo, hi = perturbation.level_range
    axis = perturbation.axis
    notes = ["log scale"] if axis.scale == "log" else []
    if not axis.damage_grows:
        notes.append("damage grows as it falls")
    if perturbation.deterministic:
        notes.append("deterministic: one draw")
    return f"{shown} ({len(levels)})", f"{lo:g} – {hi:g}", axis.label + (f" ({'; '.join(notes)})" if notes else "")


def cmd_plugins(args) -> int:
    registry = get_registry()
    contributed: dict[str, list[str]] = {name: [] for name in registry.plugin_names()}
    for kind in KINDS:
        for name, c in registry.contributions(kind).items():
            contributed.setdefault(c.plugin, []).append(f"{SINGULAR[kind]} {name}")
    table = Table(title="lesionbench plugins")
    table.add_column("plugin")
    table.add_column("module")
    table.add_column("distribution")
    table.add_column("contributes")
    for name in sorted(contributed):
        info = registry.info(name)
        table.add_row(name, info.module, f"{info.distribution} {info.version}".strip(" -") or "-",
                      ", ".join(sorted(contributed[name])) or "(nothing)")  # fmt: skip
    for failure in registry.failures:
        table.add_row(failure.plugin, "[red]failed[/red]", "", f"{failure.stage}: {failure.message}")
    print_table(console, table)
    return 0


def cmd_train(args) -> int:
    from lesionbench.train import TrainConfig, train
    from lesionbench.models.fashion import weights_path

    out = args.out or weights_path(args.model.split(":")[-1])
    config = TrainConfig(
        model=args.model,
        dataset=args.dataset,
        data=args.data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
    )
    record = train(config, get_registry(), out, log=console.print)
    console.print(f"wrote {out} — test top-1 {record['test_top1']:.4f}")
    return 0


def cmd_leaderboard(args) -> int:
    from lesionbench.publish import publish

    out = publish(args.results, args.out, args.plots, draw=not args.no_plots, title=args.title, metric=args.metric)
    console.print(f"wrote {out}")
    return 0


def cmd_compare(args) -> int:
    from lesionbench.compare import compare, to_markdown
    from lesionbench.leaderboard import metric_of
    from lesionbench.publish import resolve_results
    from lesionbench.store import read_results_with_outcomes

    new_files, base_files = resolve_results([args.new]), resolve_results([args.baseline])
    metric = args.metric or metric_of(new_files[0])
    new, new_outcomes = read_results_with_outcomes(new_files, allow_empty=False)
    base, base_outcomes = read_results_with_outcomes(base_files, allow_empty=False)
    result = compare(new, base, args.max_drop, metric, new_outcomes, base_outcomes)
    print(to_markdown(result, args.max_drop, show_all=args.all))
    return 1 if result.failed else 0


def cmd_verify(args) -> int:
    from lesionbench.cli.verify import cmd_verify as verify

    return verify(args, console)


def cmd_run(args) -> int:
    """``lesionbench run``: load the study, apply flags, run it with a progress bar, publish."""
    from lesionbench.api import run_study
    from lesionbench.cli.progress import rich_progress
    from lesionbench.cli.report import print_summary
    from lesionbench.publish import publish
    from lesionbench.store import RunDir
    from lesionbench.study import load_study, parse_study

    registry = get_registry()
    presets = {k: c.obj for k, c in registry.contributions("studies").items()}
    resume = args.resume is not None and RunDir.exists(args.resume)
    if args.resume is not None and not resume and args.resume.exists() and (not args.resume.is_dir()
                                                                            or any(args.resume.iterdir())):  # fmt: skip
        raise LesionbenchError(f"{str(args.resume)!r} is not a lesionbench run directory (no manifest.json) and not "
                               "empty: refusing to start a run in it")  # fmt: skip
    if args.resume is not None and not resume and args.study is None:  # never a default study in a --resume
        raise LesionbenchError(f"{str(args.resume)!r} holds no run yet: name the study to start it there "
                               f"(lesionbench run STUDY --resume {shlex.quote(str(args.resume))})")  # fmt: skip
    if getattr(args, "redo", None) and not resume:
        raise LesionbenchError("--redo needs --resume DIR naming a run that holds results")
    if resume:  # the study recorded in the run; a study named as well must be that one (the fingerprint says)
        with RunDir.open_existing(args.resume) as earlier:  # only to read the study; locked again to run
            study = parse_study(earlier.manifest()["study"])
        if args.study is not None:
            study = load_study(args.study, presets)
        out = args.resume
    else:  # --resume on a directory with no run yet starts it there: a pre-emptible job's script is one line
        study = load_study(args.study or "demo", presets)
        out = args.resume or args.out or Path("runs") / study.name
    study = _with_flags(study, args)
    if args.dry_run:
        return _print_plan(study, registry)
    args.run_dir = out  # for the interruption message
    run = run_study(study, registry, out, resume=resume,
                    progress=lambda total: rich_progress(console, total), debug=args.debug,
                    executor=args.executor, ray_address=args.ray_address, redo=getattr(args, "redo", None) or ())  # fmt: skip
    board = run.path / "LEADERBOARD.md"  # written last by publish: its presence means the run is finished
    no_publish = getattr(args, "no_publish", False)
    if run.already_complete and (board.is_file() or no_publish):
        console.print(f"{out} is complete: nothing to resume")
        return 0
    if run.already_complete:
        console.print(f"{out}: every cell was done earlier; publishing its leaderboard (interrupted before)")
    unscored = print_summary(run.frame(), study, console, _bootstrapped_scores(run.results_path, study.metric))
    if no_publish:
        console.print(f"results: {run.results_path}")
        return NOT_SCORED_EXIT if unscored else 0
    draw = not getattr(args, "no_plots", False)
    try:
        board = publish([run.results_path], board, title=f"lesionbench: {study.name}", draw=draw)
    except LesionbenchError as exc:  # a full disk while drawing: the rows are whole, --resume publishes again
        raise LesionbenchError(f"{exc}; the rows are whole: free space and finish with lesionbench run --resume "
                               f"{shlex.quote(str(out))}") from None  # fmt: skip
    console.print(f"results: {run.results_path}\nleaderboard: {board}" + (f"\nplots: {run.path / 'plots'}" if draw else ""))
    return NOT_SCORED_EXIT if unscored else 0


def _bootstrapped_scores(results_path: Path, metric: str):
    """The run's layer scores with intervals and interval verdicts, or None without per-image outcomes."""
    from lesionbench.scores import bootstrap
    from lesionbench.store import read_results_with_outcomes

    df, outcomes = read_results_with_outcomes(results_path)
    if "outcome" not in df.columns or not (df["outcome"] >= 0).any():
        return None
    return bootstrap(df, outcomes, metric).layers


def _with_flags(study, args):
    """``study`` with the flags of ``run``/``plan`` applied, warning about models that lost their weights."""
    from dataclasses import fields

    from lesionbench.study import Study, with_overrides

    options = {f.name: getattr(args, f.name) for f in fields(Study) if f.metadata.get("flag")}
    chosen = with_overrides(study, models=args.models, layers=args.layers, perturbations=args.perturbations,
                            levels=args.levels, n_images=args.n_images, data=args.data, dataset=args.dataset,
                            **options)  # fmt: skip
    for text in weights_warnings(study.models, chosen.models):
        warn(text)
    return chosen


def cmd_plan(args) -> int:
    """``lesionbench plan``: the study's cells and an estimate of its time; nothing evaluated or written."""
    from lesionbench.study import load_study

    registry = get_registry()
    presets = {k: c.obj for k, c in registry.contributions("studies").items()}
    return _print_plan(_with_flags(load_study(args.study or "demo", presets), args), registry)


def _print_plan(study, registry) -> int:
    from lesionbench.estimate import clock_text, estimate
    from lesionbench.executors import create_executor

    plan = create_executor("local").prepare(study, registry)
    rows = estimate(plan)
    table = Table(title=f"lesionbench plan: {study.name}", title_justify="left")
    for column in ("model", "layers", "blocks", "cells", "one pass", "estimate"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        cells = f"{r.cells:,}" + (f" (+ up to {r.extra_cells:,})" if r.extra_cells else "")
        table.add_row(r.model, str(r.layers), str(r.blocks), cells, f"{r.pass_seconds:.2f} s", clock_text(r.seconds))
    print_table(console, table)
    total = sum(r.cells for r in rows)
    seconds = sum(r.seconds for r in rows)
    extra = sum(r.extra_cells for r in rows)
    console.print(f"{total:,} cells{f' (+ up to {extra:,} adaptive draws)' if extra else ''} on {len(plan.indices):,} "
                  f"images, {study.draws} draw(s); estimate at most {clock_text(seconds)} on {study.device} "
                  "(every cell a full pass; the fast engine evaluates only what follows the damaged layer). "
                  "Nothing was run.", highlight=False, soft_wrap=True)  # fmt: skip
    return 0


def weights_warnings(given, chosen) -> list[str]:
    """Warnings for ``--models`` entries that name no weights where the study's own models did:
    their source then picks (timm and torchvision build random weights), and a study would run
    for minutes at chance. ``given``/``chosen``: the ModelSpecs before and after the flags."""
    def named(m) -> bool:
        return m.weights not in (None, "none") or bool(m.checkpoint)

    carried = [m for m in given if named(m) and m not in chosen]
    bare = [m.ref for m in chosen if not named(m) and m not in given]
    if not carried or not bare:
        return []
    listing = ", ".join(f"{m.ref} ({'weights' if m.weights else 'checkpoint'}={m.weights or m.checkpoint!r})" for m in carried)
    return [
        f"--models {','.join(bare)}: no weights named, where the study's models named theirs ({listing}); "
        f"the model source decides (timm and torchvision build random weights). To choose, list the model in "
        f'a study file: models = [{{ ref = "{bare[0]}", weights = "..." }}]'
    ]


def warn(text: str) -> None:
    """One warning line on stderr (above the progress bar when there is one)."""
    err_console.print(f"lesionbench: warning: {text}", markup=False, highlight=False, soft_wrap=True)


class _WarningsToConsole(logging.Handler):
    """Warnings the library logs while a study runs (a model at chance, unreadable images)."""

    def emit(self, record: logging.LogRecord) -> None:
        warn(record.getMessage())


def _report_failures(registry) -> None:
    for failure in registry.failures:
        err_console.print(f"[yellow]warning:[/yellow] {failure}")


COMMANDS = {
    "run": cmd_run,
    "plan": cmd_plan,
    "list": cmd_list,
    "plugins": cmd_plugins,
    "train": cmd_train,
    "leaderboard": cmd_leaderboard,
    "compare": cmd_compare,
    "verify": cmd_verify,
}


def _resume_hint(where: Path | None, argv: list[str]) -> str:
    """How an interrupted ``run`` is finished: ``--resume DIR`` where DIR holds a run (the study
    comes from its manifest), else the same command again (nothing was written)."""
    from lesionbench.store import RunDir

    if where is None:
        return ""
    if RunDir.exists(where):
        return f"; finish it with: lesionbench run --resume {shlex.quote(str(where))}"
    return f"; nothing was written: start it again with: lesionbench {shlex.join(argv)}"


class Terminated(KeyboardInterrupt):
    """SIGTERM, as a scheduler sends it before killing a job: handled like Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["run", *(argv or [])])
    previous = signal.signal(signal.SIGTERM, _terminate)
    if not any(isinstance(h, _WarningsToConsole) for h in log.handlers):
        log.addHandler(_WarningsToConsole(logging.WARNING))
    try:
        return COMMANDS[args.command](args)
    except LesionbenchError as exc:
        err_console.print(f"lesionbench: error: {exc}", highlight=False, markup=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt as exc:  # the cell in flight is dropped: rows are written whole or not at all
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        hint = _resume_hint(getattr(args, "run_dir", None), argv if argv is not None else sys.argv[1:])
        err_console.print(f"lesionbench: {what}{hint}", highlight=False, markup=False, soft_wrap=True)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
