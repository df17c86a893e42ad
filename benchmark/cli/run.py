"""``lesionbench run`` and ``lesionbench plan``: a study loaded, flags applied, run or planned.

The output goes to the console each command is given (the package's, which tests may replace).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from rich.table import Table

from lesionbench.cli.tables import print_table
from lesionbench.errors import LesionbenchError
from lesionbench.registry import get_registry

NOT_SCORED_EXIT = 3  # run: finished, but a model was not scored (clean accuracy at chance)


def executor_options(args) -> dict[str, str]:
    """``--executor-option KEY=VALUE`` pairs, with ``--ray-address`` as the alias of ``address``."""
    from lesionbench.executors import parse_options

    options = parse_options(args.executor_options)
    if args.ray_address is not None:
        if args.executor != "ray":
            raise LesionbenchError("--ray-address is for --executor ray")
        options["address"] = args.ray_address
    return options


def cmd_run(args, console, warn) -> int:
    """``lesionbench run``: load the study, apply flags, run it with a progress bar, publish."""
    from lesionbench.api import run_study
    from lesionbench.cli.progress import rich_progress
    from lesionbench.cli.report import print_summary
    from lesionbench.executors import create_executor
    from lesionbench.layer_score import get_score
    from lesionbench.publish import publish
    from lesionbench.store import RunDir
    from lesionbench.study import load_study, parse_study

    registry = get_registry()
    chosen = create_executor(args.executor, executor_options(args), registry)  # a bad name or option: nothing runs
    score = get_score(args.score, registry)
    presets = {k: c.obj for k, c in registry.contributions("studies").items()}
    resume = args.resume is not None and RunDir.exists(args.resume)
    if (
        args.resume is not None
        and not resume
        and args.resume.exists()
        and (not args.resume.is_dir() or any(args.resume.iterdir()))
    ):
        raise LesionbenchError(
            f"{str(args.resume)!r} is not a lesionbench run directory (no manifest.json) and not "
            "empty: refusing to start a run in it"
        )
    if getattr(args, "redo", None) and not resume:
        raise LesionbenchError("--redo needs --resume DIR naming a run that holds results")
    if args.resume is not None and not resume and args.study is None:  # never a default study in a --resume
        raise LesionbenchError(
            f"{str(args.resume)!r} holds no run yet: name the study to start it there "
            f"(lesionbench run STUDY --resume {shlex.quote(str(args.resume))})"
        )
    if resume:  # the study recorded in the run; a study named as well must be that one (the fingerprint says)
        with RunDir.open_existing(args.resume) as earlier:  # only to read the study; locked again to run
            study = parse_study(earlier.manifest()["study"])
        if args.study is not None:
            study = load_study(args.study, presets)
        out = args.resume
    else:  # --resume on a directory with no run yet starts it there: a pre-emptible job's script is one line
        study = load_study(args.study or "demo", presets)
        out = args.resume or args.out or Path("runs") / study.name
    study = _with_flags(study, args, warn)
    if args.dry_run:
        return _print_plan(study, registry, console)
    args.run_dir = out  # for the interruption message
    run = run_study(
        study,
        registry,
        out,
        resume=resume,
        progress=lambda total: rich_progress(console, total),
        debug=args.debug,
        executor=chosen.name,
        executor_options=executor_options(args),
        redo=getattr(args, "redo", None) or (),
    )
    board = run.path / "LEADERBOARD.md"  # written last by publish: its presence means the run is finished
    no_publish = getattr(args, "no_publish", False)
    if run.already_complete and (board.is_file() or no_publish):
        console.print(f"{out} is complete: nothing to resume")
        return 0
    if run.already_complete:
        console.print(f"{out}: every cell was done earlier; publishing its leaderboard (interrupted before)")
    unscored = print_summary(
        run.frame(), study, console, _bootstrapped_scores(run.results_path, study.metric, score), score=score
    )
    if no_publish:
        console.print(f"results: {run.results_path}")
        return NOT_SCORED_EXIT if unscored else 0
    draw = not getattr(args, "no_plots", False)
    try:
        board = publish([run.results_path], board, title=f"lesionbench: {study.name}", draw=draw, score=score.name)
    except LesionbenchError as exc:  # a full disk while drawing: the rows are whole, --resume publishes again
        raise LesionbenchError(
            f"{exc}; the rows are whole: free space and finish with lesionbench run --resume {shlex.quote(str(out))}"
        ) from None
    console.print(
        f"results: {run.results_path}\nleaderboard: {board}" + (f"\nplots: {run.path / 'plots'}" if draw else "")
    )
    return NOT_SCORED_EXIT if unscored else 0


def _bootstrapped_scores(results_path: Path, metric: str, score):
    """The run's layer scores with intervals and interval verdicts, or None without per-image outcomes."""
    from lesionbench.bootstrapping import bootstrap
    from lesionbench.store import read_results_with_outcomes

    df, outcomes = read_results_with_outcomes(results_path)
    if "outcome" not in df.columns or not (df["outcome"] >= 0).any():
        return None
    return bootstrap(df, outcomes, metric, score=score).layers


def _with_flags(study, args, warn):
    """``study`` with the flags of ``run``/``plan`` applied, warning about models that lost their weights."""
    from dataclasses import fields

    from lesionbench.study import Study, with_overrides

    options = {f.name: getattr(args, f.name) for f in fields(Study) if f.metadata.get("flag")}
    chosen = with_overrides(
        study,
        models=args.models,
        layers=args.layers,
        perturbations=args.perturbations,
        levels=args.levels,
        n_images=args.n_images,
        data=args.data,
        dataset=args.dataset,
        **options,
    )
    for text in weights_warnings(study.models, chosen.models):
        warn(text)
    return chosen


def cmd_plan(args, console, warn) -> int:
    """``lesionbench plan``: the study's cells and an estimate of its time; nothing evaluated or written."""
    from lesionbench.study import load_study

    registry = get_registry()
    presets = {k: c.obj for k, c in registry.contributions("studies").items()}
    return _print_plan(_with_flags(load_study(args.study or "demo", presets), args, warn), registry, console)


def _print_plan(study, registry, console) -> int:
    from lesionbench.estimate import clock_text, estimate
    from lesionbench.executors import create_executor

    plan = create_executor("local", registry=registry).prepare(study, registry)
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
    console.print(
        f"{total:,} cells{f' (+ up to {extra:,} adaptive draws)' if extra else ''} on {len(plan.indices):,} "
        f"images, {study.draws} draw(s); estimate at most {clock_text(seconds)} on {study.device} "
        "(every cell a full pass; the fast engine evaluates only what follows the damaged layer). "
        "Nothing was run.",
        highlight=False,
        soft_wrap=True,
    )
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
    listing = ", ".join(
        f"{m.ref} ({'weights' if m.weights else 'checkpoint'}={m.weights or m.checkpoint!r})" for m in carried
    )
    return [
        f"--models {','.join(bare)}: no weights named, where the study's models named theirs ({listing}); "
        f"the model source decides (timm and torchvision build random weights). To choose, list the model in "
        f'a study file: models = [{{ ref = "{bare[0]}", weights = "..." }}]'
    ]
