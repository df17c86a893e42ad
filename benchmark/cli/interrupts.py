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
