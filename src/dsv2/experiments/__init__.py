"""Small-scale reproductions of DeepSeek-V2's design choices: `dsv2 ablate SUITE`.

    suites.py   what each suite trains: its variants (model configs, matched in parameters where the paper's
                comparison is), its claims, and the budgets (default, --quick, flags)
    runner.py   the runs: ordinary, resumable run directories of dsv2.training, one per (variant, seed), then the
                measurements a suite adds (decode ms/token, cross-device traffic), stored in the run directories
    report.py   the report, read back from the run directories only: tables, verdicts, plots
"""

from .runner import run_suite
from .suites import SUITES

__all__ = ["SUITES", "run_suite"]
