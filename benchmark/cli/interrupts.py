"""Prompt exit on SIGTERM and Ctrl-C, even while native code runs for minutes.

Python runs a signal's handler in the main thread between bytecodes, so a run inside one long
native call (a C extension's loop, one large operator of a language model on the CPU) raised its
KeyboardInterrupt only when that call returned: SIGTERM waited for the cell in flight. The C-level
handler, though, writes the signal's number to the file descriptor given to
:func:`signal.set_wakeup_fd` at once. A watcher thread reading it gives the main thread
:data:`GRACE_S` seconds to stop the ordinary way (KeyboardInterrupt: the cell in flight dropped,
the lock removed, one line), and otherwise writes that line itself and ends the process with
:func:`os._exit` and the same exit code (143 SIGTERM, 130 SIGINT). That leaves what a SIGKILL at
the same instant leaves, which ``--resume`` finishes (``docs/explanation/result-files.md``): rows
are whole lines written in one ``write``, a run directory appears by a rename, an interrupted
publish is redone. Native code that holds the GIL keeps the watcher waiting too (no worse than
before).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

GRACE_S = 1.0  # seconds the main thread has to stop by itself
EXIT_CODES = {int(signal.SIGTERM): 143, int(signal.SIGINT): 130}


@contextmanager
def exit_promptly(message: Callable[[int], str]) -> Iterator[threading.Event]:
    """Within the block, SIGTERM or SIGINT not handled by the main thread within GRACE_S seconds
    ends the process: ``message(signum)`` (one line) on stderr, then exit 143 or 130.

    Yields an event the caller sets once it handles the interrupt itself (its own line, its exit
    code). Only from the main thread (elsewhere, where a wakeup descriptor is already in use — an
    event loop's — and where pipes cannot be one, the block runs unwatched)."""
    done = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield done
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    except (ValueError, OSError):
        previous = None
    if previous != -1:  # someone else's descriptor (left in place), or none possible
        if previous is not None:
            signal.set_wakeup_fd(previous)
        os.close(read_end)
        os.close(write_end)
        yield done
        return

    def watch() -> None:
        try:
            while data := os.read(read_end, 64):
                signum = next((s for s in data if s in EXIT_CODES), None)
                if signum is not None and not done.wait(GRACE_S):
                    os.write(2, (message(signum) + "\n").encode())
                    os._exit(EXIT_CODES[signum])
        finally:
            os.close(read_end)

    threading.Thread(target=watch, name="lesionbench-exit-promptly", daemon=True).start()
    try:
        yield done
    finally:
        done.set()
        signal.set_wakeup_fd(-1)
        os.close(write_end)  # the watcher reads end-of-file and ends


_BEFORE: dict[int, object] = {}  # the handlers guard_start_up found


def _while_starting(signum: int, frame) -> None:
    """SIGTERM or Ctrl-C while the command line imports torch and the plugins: nothing is written
    yet, and raising KeyboardInterrupt inside a C extension's import can leave it half-initialised
    (a later import then fails, or the process crashes): end the process here, with one line."""
    what = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
    again = " ".join(["lesionbench", *sys.argv[1:]])
    os.write(2, f"lesionbench: {what} while starting; nothing was written: start it again with: {again}\n".encode())
    os._exit(EXIT_CODES[signum])


def is_command_line_process() -> bool:
    """Whether this process is the ``lesionbench`` command (the console script, or ``python -m
    lesionbench.cli`` while the package is being imported, when ``sys.argv[0]`` is ``-m``), not a
    program or test that imports the package."""
    return bool(sys.argv) and (sys.argv[0] == "-m" or os.path.basename(sys.argv[0]) == "lesionbench")


def guard_start_up() -> None:
    """Until :func:`started`, SIGTERM and SIGINT end the process at once with one line (exit 143, 130)."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            _BEFORE[signum] = signal.getsignal(signum)
            if _BEFORE[signum] is not signal.SIG_IGN:  # an ignored signal (nohup, a background job) stays ignored
                signal.signal(signum, _while_starting)


def starting() -> bool:
    """Whether :func:`guard_start_up` is in force (for SIGINT, SIGTERM or both)."""
    return any(signal.getsignal(signum) is _while_starting for signum in (signal.SIGINT, signal.SIGTERM))


def handler_before(signum: int):
    """The handler :func:`guard_start_up` found for ``signum`` (the default if it ran before none)."""
    return _BEFORE.get(signum, signal.SIG_DFL)


def started(on_sigterm: Callable) -> None:
    """Start-up is over: Ctrl-C raises KeyboardInterrupt again, SIGTERM calls ``on_sigterm``."""
    if _BEFORE.get(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if _BEFORE.get(signal.SIGTERM) is not signal.SIG_IGN:
        signal.signal(signal.SIGTERM, on_sigterm)
