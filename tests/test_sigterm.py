"""SIGTERM (`ray job stop`, a scheduler's preemption, `kill`) ends the CLI and the benchmark as Ctrl-C does:
with the line that says what was kept, not with the default's silent death or Ray's stack dump."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import sigterm_as_interrupt

ROOT = Path(__file__).parents[1]


def test_sigterm_within_raises_keyboard_interrupt_and_the_handler_is_put_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 5)  # the handler runs at the next bytecode; this only bounds the wait
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_sigtermed_benchmark_says_its_runs_are_kept_for_the_same_command(tmp_path):
    """The benchmark runs the search in-process, not through the CLI: its seeds run under the same handler."""
    script = ("import os, signal, sys\n"
              "import bench.search as bench\n"
              "def terminated(args, seed):\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    signal.sigtimedwait([], 5)\n"
              "    raise AssertionError('SIGTERM did not interrupt the seed')\n"
              "bench.run_seed = terminated\n"
              f"sys.argv = ['bench.search', '--seeds', '0', '--out', {str(tmp_path)!r}]\n"
              "bench.main()\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 130, done.stderr[-2000:]
    assert f"each seed's run is kept under {tmp_path}: the same command resumes it" in done.stderr
