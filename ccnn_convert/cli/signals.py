"""SIGTERM handled like Ctrl-C (no heavy imports: the entry points install it first thing).

``kill`` and ``timeout`` send SIGTERM, whose default action ends the process at once: no
``finally`` runs and temporary files stay behind. Raising an exception instead lets every
clean-up in :mod:`ccnn_convert.outputs` run, exactly as for Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` clean-up runs."""


def _raise_terminated(signum, frame) -> None:
    # Once clean-up has started, a second signal must not cut it short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Terminated()


def terminate_like_interrupt() -> None:
    """Make SIGTERM raise :class:`Terminated` (a KeyboardInterrupt) in the main thread."""
    signal.signal(signal.SIGTERM, _raise_terminated)


def exit_when_stopped() -> None:
    """Once a command is over (its files written, its clean-up run): a signal now, also one that
    arrives while the interpreter runs its atexit callbacks, ends the process at once with one
    line and the status that says it was stopped. Raising there would only print "Exception
    ignored in atexit callback" and keep the status 0."""
    signal.signal(signal.SIGTERM, _exit_stopped)
    signal.signal(signal.SIGINT, _exit_stopped)


def _exit_stopped(signum, frame) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed pipe: nothing more can be said on it
            pass
    word = "terminated" if signum == signal.SIGTERM else "interrupted"
    try:
        os.write(2, f"error: {word}\n".encode())
    except OSError:
        pass
    os._exit(EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED)


def exit_code(interrupt: KeyboardInterrupt) -> int:
    return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED


def describe(interrupt: KeyboardInterrupt) -> str:
    return "terminated" if isinstance(interrupt, Terminated) else "interrupted"
