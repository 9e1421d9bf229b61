"""Running a command-line tool as a program (``python process.py``, ``python -m training.train``)."""
from __future__ import annotations

import os
import signal


def die_of_ctrl_c(exc: SystemExit) -> None:
    """A tool stopped by Ctrl-C exits 130 (128 + SIGINT) after saying what it kept; run as a program it
    then ends by SIGINT itself (the shell still shows 130), so that a shell loop over runs stops too
    (bash goes on after a child that merely exits 130). In-process callers (tests, notebooks) get the
    SystemExit(130) alone."""
    if exc.code == 128 + signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)


def run_program(command, **kwargs) -> None:
    """``command(**kwargs)`` (a click command) as the program's main, ending by SIGINT after Ctrl-C."""
    try:
        command(**kwargs)
    except SystemExit as exc:
        die_of_ctrl_c(exc)
        raise


def silence(stream) -> None:
    """Send what is still written to ``stream`` (stdout, stderr) to /dev/null: it failed (a full disk, a
    closed pipe), and Python would report that again when it flushes the stream at exit (exit 120)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no file descriptor (a stream in memory)
        pass
