"""
.ci/trial-summary.awk turns trial's closing line into the line CI counts.
"""

import subprocess

from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

SCRIPT = FilePath(__file__).parent().sibling(".ci").child("trial-summary.awk")


def _summarize(output: str) -> tuple[str, int]:
    result = subprocess.run(["awk", "-f", SCRIPT.path], input=output,
                            capture_output=True, text=True, check=False)
    return result.stdout, result.returncode


class TrialSummaryTests(TestCase):

    def test_passed_run_counts_successes_and_skips(self):
        self.assertEqual(
            _summarize("Ran 13 tests in 1.0s\n\nPASSED (skips=1, successes=12)\n"),
            ("12 passed, 0 failed, 1 skipped\n", 0))

    def test_failures_and_errors_both_count_as_failed(self):
        self.assertEqual(
            _summarize("FAILED (skips=1, failures=2, errors=1, successes=9)\n"),
            ("9 passed, 3 failed, 1 skipped\n", 0))

    def test_unexpected_success_fails_and_expected_failure_is_neither(self):
        self.assertEqual(
            _summarize("FAILED (expectedFailures=2, unexpectedSuccesses=1, successes=3)\n"),
            ("3 passed, 1 failed, 0 skipped\n", 0))

    def test_run_without_tests_counts_nothing(self):
        self.assertEqual(_summarize("Ran 0 tests in 0.0s\n\nPASSED\n"),
                         ("0 passed, 0 failed, 0 skipped\n", 0))

    def test_last_summary_wins(self):
        self.assertEqual(
            _summarize("PASSED (successes=1)\nFAILED (failures=1, successes=2)\n"),
            ("2 passed, 1 failed, 0 skipped\n", 0))

    def test_missing_summary_is_one_failure(self):
        self.assertEqual(_summarize("make: *** [Makefile:18: test] Error 2\n"),
                         ("0 passed, 1 failed\n", 1))

    def test_summary_must_stand_alone_on_its_line(self):
        self.assertEqual(_summarize("the log said PASSED (successes=1)\n"),
                         ("0 passed, 1 failed\n", 1))
