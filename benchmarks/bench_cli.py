"""The command line's start-up, tracked over commits: ``estbench --help`` and ``estbench cases`` import no torch
and build no case, so each should answer in well under a second (a fresh interpreter each)."""
import subprocess
import sys


def _estbench(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "reports.cli", *args], check=True, capture_output=True, timeout=60)


class CommandLine:
    repeat = (3, 10, 20.0)
    number = 1

    def time_help(self):
        _estbench("--help")

    def time_gate_help(self):
        _estbench("gate", "--help")

    def time_cases(self):
        _estbench("cases")
