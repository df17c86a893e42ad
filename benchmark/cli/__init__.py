"""The ``lesionbench`` command line: the only place that knows argparse, rich and publishing.

Exit codes: 0 success, 1 a regression found by ``compare``, 2 bad input (one line on stderr),
3 ``run`` finished but a model was not scored (its clean accuracy is not beyond chance), 130 interrupted, 143 terminated (SIGTERM): the last line says how to finish the run. Heavy
libraries (torch, pandas, matplotlib…) are imported by the commands that use them, so ``--help``
answers at once.
"""

from __future__ import annotations

from lesionbench.cli import interrupts  # os, signal and threading only: first, before anything heavy

if interrupts.is_command_line_process():  # an interrupt while importing ends the process with one line
    interrupts.guard_start_up()

import logging
import os
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lesionbench.cli.parser import build_parser
from lesionbench.cli.run import NOT_SCORED_EXIT, weights_warnings
from lesionbench.cli.tables import print_table
from lesionbench.errors import LesionbenchError
from lesionbench.registry import KINDS, SINGULAR, get_registry

__all__ = ["NOT_SCORED_EXIT", "build_parser", "main", "make_console", "weights_warnings"]
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
        elif args.kind == "executors":  # with the options --executor-option KEY=VALUE takes
            options = "; ".join(f"{k}: {v}" for k, v in c.obj.options.items())
            table.add_row(name, c.plugin, escape(c.description + (f" Options: {options}." if options else "")))
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
    notes = [axis.kind.note] if axis.kind.note else []
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
        table.add_row(
            name,
            info.module,
            f"{info.distribution} {info.version}".strip(" -") or "-",
            ", ".join(sorted(contributed[name])) or "(nothing)",
        )
    for failure in registry.failures:
        table.add_row(failure.plugin, "[red]failed[/red]", "", f"{failure.stage}: {failure.message}")
    print_table(console, table)
    return 0


def cmd_train(args) -> int:
    from lesionbench.models.fashion import weights_path
    from lesionbench.train import TrainConfig, train

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
    from lesionbench.layer_score import get_score
    from lesionbench.leaderboard import reporter
    from lesionbench.publish import publish

    score = get_score(args.score).name  # an unknown name: one line, nothing written
    out = args.out or Path("leaderboard") / f"LEADERBOARD{reporter(args.format).suffix}"  # unknown format: exit 2
    out = publish(
        args.results,
        out,
        args.plots,
        draw=not args.no_plots,
        title=args.title,
        metric=args.metric,
        format=args.format,
        score=score,
    )
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
    result = compare(new, base, args.max_drop, metric, new_outcomes, base_outcomes, score=args.score)
    print(to_markdown(result, args.max_drop, show_all=args.all))
    return 1 if result.failed else 0


def cmd_run(args) -> int:
    from lesionbench.cli.run import cmd_run as run

    return run(args, console, warn)


def cmd_plan(args) -> int:
    from lesionbench.cli.run import cmd_plan as plan

    return plan(args, console, warn)


def cmd_verify(args) -> int:
    from lesionbench.cli.verify import cmd_verify as verify

    return verify(args, console)


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
    if where is None:
        return ""
    # Not RunDir.exists (lesionbench.store imports torch): a SIGTERM during start-up can interrupt torch's
    # own import, and importing it again then fails ("duplicate registrations") with a traceback.
    from lesionbench.columns import holds_run

    if holds_run(where):
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
    disabled = [p[3:] for p in args.plugin_switches if p.startswith("no:")]
    bad = [p for p in args.plugin_switches if not p.startswith("no:") or not p[3:]]
    if bad:
        parser.error(f"-p takes no:NAME (switch the plugin NAME off), got {bad[0]!r}")

    # the command line's own process: SIGTERM and Ctrl-C end it until the imports are done
    guarded = interrupts.starting()
    previous = interrupts.handler_before(signal.SIGTERM) if guarded else signal.signal(signal.SIGTERM, _terminate)
    if not any(isinstance(h, _WarningsToConsole) for h in log.handlers):
        log.addHandler(_WarningsToConsole(logging.WARNING))

    def stopped(terminated: bool) -> str:  # the cell in flight is dropped: rows are written whole or not at all
        try:
            hint = _resume_hint(getattr(args, "run_dir", None), argv if argv is not None else sys.argv[1:])
        except Exception:  # noqa: BLE001 - an interrupted import can leave anything half-done: the line without the hint
            hint = ""
        return f"lesionbench: {'terminated (SIGTERM)' if terminated else 'interrupted'}{hint}"

    try:  # a main thread stuck in native code is not waited for (see lesionbench.cli.interrupts)
        with interrupts.exit_promptly(lambda signum: stopped(signum == signal.SIGTERM)) as handled:
            try:
                get_registry(disable=disabled)  # the registry every command then uses (-p no:NAME left out)
                if guarded:  # torch and every plugin imported: from here an interrupt drops the cell in flight
                    interrupts.started(_terminate)
                return COMMANDS[args.command](args)
            except LesionbenchError as exc:
                err_console.print(f"lesionbench: error: {exc}", highlight=False, markup=False, soft_wrap=True)
                return 2
            except KeyboardInterrupt as exc:
                handled.set()
                err_console.print(stopped(isinstance(exc, Terminated)), highlight=False, markup=False, soft_wrap=True)
                return 143 if isinstance(exc, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
