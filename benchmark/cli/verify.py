"""``lesionbench verify DIR``: its options and its report (the check itself is :mod:`lesionbench.verify`)."""

from __future__ import annotations

from pathlib import Path


def add_verify(sub, make) -> None:
    """The ``verify`` subcommand; ``make(sub, name, help, description)`` builds a subparser."""
    ver = make(
        sub,
        "verify",
        "re-run a random sample of a run's cells and its clean passes here, and compare",
        "Re-run N randomly chosen cells and every clean pass of the study recorded in DIR's manifest,\n"
        "and compare rows and per-image outcomes with DIR's: exactly on the run's device with the\n"
        "manifest's torch and lesionbench versions, else within --tolerance per image. Exit 0 when\n"
        "they match, 1 with what differs (a file that breaks the results schema differs too).",
    )
    ver.add_argument("run", type=Path, metavar="DIR", help="the run directory to verify")
    ver.add_argument("--sample", type=int, default=5, metavar="N", help="perturbed cells to re-run (default: 5)")
    ver.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the sample (default: 0)")
    ver.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        metavar="F",
        help="across devices or versions: largest fraction of images whose top-1 class or top-5 hit "
        "may differ (default: 0.01)",
    )
    ver.add_argument("--device", metavar="DEVICE", help="evaluate on this device (default: the study's)")


def cmd_verify(args, console) -> int:
    """Exit 0 when the re-run cells match, 1 with what differs (at most 20 lines of it), printed on
    ``console`` (the CLI's, passed in: this module does not import its package back)."""
    from lesionbench.verify import pass_probability, verify

    verdict = verify(args.run, args.sample, args.seed, args.tolerance, args.device)
    how = "exactly (same device and versions)" if verdict.exact else f"within {args.tolerance:g} of the images per cell"
    if not verdict.ok:
        console.print(f"{args.run}: REJECTED — {len(verdict.differences)} differences:", markup=False, highlight=False)
        for line in verdict.differences[:20]:
            console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
        return 1
    n = verdict.n_cells
    console.print(
        f"{args.run}: accepted — {len(verdict.checked)} cells re-run (clean passes included) match {how}; "
        f"a file with 1 forged cell of its {n} would pass with probability "
        f"{pass_probability(n, min(1, n), args.sample):.3f}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return 0
