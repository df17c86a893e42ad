"""The one driver every executor shares: what is left to do, rows written, progress ticked.

An executor says only *where* a block is evaluated (a :data:`Backend`); this loop decides what is
left (resume: a cell already in the store is neither evaluated nor written again, adaptive draws
included, through ``Store.completed()``), hands the blocks to the backend as :class:`Job` objects
(the cell's identity: model and :class:`lesionbench.plan.Block`, never a display label), appends
each model's clean row once and each block's rows as its results come back, ticks progress once
per cell and keeps the run log's notes, each once. So ``--resume`` works across executors and
every executor writes the same rows in the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from lesionbench.plan import Block, Plan
from lesionbench.store import Store


@dataclass(frozen=True)
class Job:
    """One block to evaluate: ``model``'s ``block`` (None: only the model's clean row is needed),
    with ``done`` the block's entries of ``Store.completed()`` (cells not to evaluate again)."""

    model: str
    block: Block | None
    done: dict = field(default_factory=dict, hash=False, compare=False)

    def describe(self) -> str:
        """The job for a message: ``model · layer · perturbation`` (or ``model · clean``)."""
        if self.block is None:
            return f"{self.model} · clean"
        return f"{self.model} · {self.block.layer} · {self.block.perturbation}"


@dataclass
class Finished:
    """A job's results, as a backend returns them.

    ``clean()``: the model's clean row (called only when the store lacks it); ``rows``: (row, label)
    per cell of the block in the order evaluated, row None for a cell done earlier; ``notes()``:
    lines for the run log (called after ``rows`` is consumed; repeated lines are written once).
    """

    job: Job
    clean: Callable[[], dict]
    rows: Iterable[tuple[dict | None, str]]
    notes: Callable[[], list[str]] = lambda: []


# (plan, jobs in model order, debug, note) -> results, in any order (each job exactly once)
Backend = Callable[[Plan, Sequence[Job], bool, Callable[[str], None]], Iterator[Finished]]


def pending_jobs(plan: Plan, store: Store, tick: Callable[[str], None]) -> list[Job]:
    """The jobs left to do, model by model in plan order; cells already in ``store`` are ticked here."""
    done = store.completed()
    jobs: list[Job] = []
    for prepared in plan.models:
        name = prepared.loaded.name
        clean_done = plan.key(name) in done
        todo = []
        for block in plan.blocks(prepared):
            if plan.settled(prepared, block, done):  # adaptive draws included
                for cell in plan.block_cells(prepared, block):
                    tick(plan.label(name, cell))
            else:
                todo.append(Job(name, block, plan.done_of(name, block, done)))
        if clean_done:
            tick(f"{name}: clean (done earlier)")
            if not todo:
                continue
        for note in prepared.notes:
            store.note(note)
        jobs.extend(todo or [Job(name, None)])  # every cell written earlier but the clean row: a job for it alone
    return jobs


def drive(plan: Plan, store: Store, tick: Callable[[str], None] | None, debug: bool, backend: Backend) -> None:
    """Evaluate every cell of ``plan`` not already in ``store`` through ``backend``, appending rows.

    The clean row of a model is appended before any of its block's rows (when the store lacks it);
    a block's rows are appended as the backend yields them, so an interrupted run keeps every
    whole row written so far.
    """
    tick = tick or (lambda _desc: None)
    done = store.completed()
    jobs = pending_jobs(plan, store, tick)
    clean_needed = {job.model for job in jobs if plan.key(job.model) not in done}
    notes_seen: set[str] = set()
    results = backend(plan, jobs, debug, store.note)
    try:
        for result in results:
            name = result.job.model
            if name in clean_needed:
                store.append(result.clean())
                clean_needed.discard(name)
                tick(f"{name}: clean")
            for row, label in result.rows:
                if row is not None:
                    store.append(row)
                tick(label)
            for note in result.notes():
                if note not in notes_seen:
                    notes_seen.add(note)
                    store.note(note)
    finally:  # a backend holding workers or models lets them go, however the run ends
        close = getattr(results, "close", None)
        if close is not None:
            close()
