"""The ``lesionbench`` command line: the only place that knows argparse, rich and publishing.

Exit codes: 0 success, 1 a regression found by ``compare``, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lesionbench.errors import LesionbenchError
from lesionbench.registry import KINDS, SINGULAR, get_registry

console = Console()
err_console = Console(stderr=True)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_study_options(parser: argparse.ArgumentParser) -> None:
    """A ``--flag`` for each study option declared with one (see lesionbench.study.option)."""
    from lesionbench.study import Study, option_fields, option_type

    for f in option_fields(Study):
        meta = f.metadata
        if not meta.get("flag"):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = option_type(f) or str
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=meta["help"])
        else:
            parser.add_argument(flag, type=kind, choices=meta.get("choices"), help=meta["help"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lesionbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a study (default: the offline 'demo' preset)")
    run.add_argument("study", nargs="?", default="demo", help="preset name or path to a study TOML file")
    run.add_argument("--out", type=Path, help="run directory (default: runs/<study name>)")
    run.add_argument("--resume", type=Path, metavar="DIR", help="finish the cells missing from an earlier run")
    run.add_argument("--data", help="dataset path (overrides the study)")
    run.add_argument("--models", type=_names, help="comma-separated model references")
    run.add_argument("--layers", type=_names, help="comma-separated layer names or aliases")
    run.add_argument("--perturbations", type=_names, help="comma-separated perturbation names")
    run.add_argument("--levels", type=_floats, help="comma-separated levels for every perturbation")
    run.add_argument("--n-images", type=int, help="size of the evaluation subset")
    add_study_options(run)
    run.add_argument("--debug", action="store_true", help="verify the model checksum after every cell")
    run.add_argument("--executor", choices=["local", "ray"], default="local",
                     help="local: evaluate here (default); ray: one task per block on a Ray cluster (pip install lesionbench[ray])")
    run.add_argument("--ray-address", metavar="ADDRESS",
                     help="Ray cluster for --executor ray: auto (this node's cluster) or ray://host:10001 (default: start a local one)")

    lst = sub.add_parser("list", help="list models, perturbations, datasets or studies")
    lst.add_argument("kind", choices=sorted(KINDS))

    sub.add_parser("plugins", help="list loaded plugins and what each contributes")

    board = sub.add_parser("leaderboard", help="render the Markdown leaderboard (and plots) from result files")
    board.add_argument("results", nargs="+", type=Path, help="results.csv files or directories holding them")
    board.add_argument("--out", type=Path, default=Path("leaderboard/LEADERBOARD.md"))
    board.add_argument("--plots", type=Path, help="plot directory (default: plots/ beside --out)")
    board.add_argument("--no-plots", action="store_true", help="only the Markdown")
    board.add_argument("--metric", choices=["top1", "top5"], help="override the metric recorded in manifests")
    board.add_argument("--title", default="lesionbench leaderboard")

    cmp = sub.add_parser("compare", help="CI gate: exit 1 when a layer score or clean accuracy drops")
    cmp.add_argument("new", type=Path, help="new results.csv or run directory")
    cmp.add_argument("baseline", type=Path, help="baseline results.csv or run directory")
    cmp.add_argument("--max-drop", type=float, default=0.05, help="largest tolerated drop (absolute)")
    cmp.add_argument("--metric", choices=["top1", "top5"], help="default: the new run's study metric")
    cmp.add_argument("--all", action="store_true", help="show unchanged quantities too")

    train = sub.add_parser("train", help="train a model from scratch and save its weights")
    train.add_argument("model", help="model reference, e.g. fashion_alexnet")
    train.add_argument("--dataset", default="fashion_mnist")
    train.add_argument("--data", help="dataset path")
    train.add_argument("--epochs", type=int, default=8)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", type=Path, help="weights file (default: models/weights/<model>.pt)")
    return parser


def cmd_list(args) -> int:
    registry = get_registry()
    items = registry.contributions(args.kind)
    table = Table(title=f"lesionbench {args.kind}")
    table.add_column("name")
    table.add_column("plugin")
    table.add_column("description")
    for name in sorted(items):
        c = items[name]
        if args.kind == "models":  # a source: its own names first, then what its prefix reaches
            for arch in c.obj.examples():
                ref = arch if c.obj.claims(arch) else f"{name}:{arch}"
                table.add_row(ref, c.plugin, c.description if c.obj.claims(arch) else "example")
            table.add_row(f"{name}:<name>", c.plugin, c.description)
        else:
            table.add_row(name, c.plugin, c.description)
    console.print(table)
    _report_failures(registry)
    return 0


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
    console.print(table)
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
    from lesionbench.store import read_results

    new_files, base_files = resolve_results([args.new]), resolve_results([args.baseline])
    metric = args.metric or metric_of(new_files[0])
    result = compare(read_results(new_files), read_results(base_files), args.max_drop, metric)
    print(to_markdown(result, args.max_drop, show_all=args.all))
    return 1 if len(result.regressions) else 0


def cmd_run(args) -> int:
    """``lesionbench run``: load the study, apply flags, run it with a progress bar, publish."""
    from dataclasses import fields

    from lesionbench.api import run_study
    from lesionbench.cli.progress import rich_progress
    from lesionbench.cli.report import print_summary
    from lesionbench.publish import publish
    from lesionbench.store import RunDir
    from lesionbench.study import Study, load_study, parse_study, with_overrides

    registry = get_registry()
    presets = {k: c.obj for k, c in registry.contributions("studies").items()}
    if args.resume is not None:
        with RunDir.open_existing(args.resume) as earlier:  # only to read the study; locked again to run
            study = parse_study(earlier.manifest()["study"])
        out = args.resume
    else:
        study = load_study(args.study, presets)
        out = args.out or Path("runs") / study.name
    options = {f.name: getattr(args, f.name) for f in fields(Study) if f.metadata.get("flag")}
    study = with_overrides(study, models=args.models, layers=args.layers, perturbations=args.perturbations,
                           levels=args.levels, n_images=args.n_images, data=args.data, **options)  # fmt: skip
    run = run_study(study, registry, out, resume=args.resume is not None,
                    progress=lambda total: rich_progress(console, total), debug=args.debug,
                    executor=args.executor, ray_address=args.ray_address)  # fmt: skip
    print_summary(run.frame(), study, console)
    board = publish([run.results_path], run.path / "LEADERBOARD.md", title=f"lesionbench: {study.name}")
    console.print(f"results: {run.results_path}\nleaderboard: {board}\nplots: {run.path / 'plots'}")
    return 0


def _report_failures(registry) -> None:
    for failure in registry.failures:
        err_console.print(f"[yellow]warning:[/yellow] {failure}")


COMMANDS = {
    "run": cmd_run,
    "list": cmd_list,
    "plugins": cmd_plugins,
    "train": cmd_train,
    "leaderboard": cmd_leaderboard,
    "compare": cmd_compare,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["run", *(argv or [])])
    try:
        return COMMANDS[args.command](args)
    except LesionbenchError as exc:
        err_console.print(f"lesionbench: error: {exc}", highlight=False, markup=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("lesionbench: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
