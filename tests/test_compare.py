"""
L{benchmarks.compare}'s summary of interleaved rounds.
"""

from twisted.trial.unittest import SynchronousTestCase

from benchmarks.compare import summary


def _run(cpu, commands=None):
    return {"kinds": {"tls1.3": {"local": {
        "server_cpu_us_per_handshake": cpu,
        "messages_per_connection": commands or {"Deliver": 1.0},
        "items_per_connection": {"Backup": 1.0}}}}}


class SummaryTests(SynchronousTestCase):

    def test_medians_of_each_side_and_their_ratio(self):
        table = summary({"before": [_run(3000), _run(5000), _run(3100)],
                         "after": [_run(2500, {"Deliver": 0.5}), _run(2400),
                                   _run(4000)]})
        row = table["tls1.3 local"]
        self.assertEqual(row["before"]["server_cpu_us"], [3000, 5000, 3100])
        self.assertEqual((row["before"]["median"], row["after"]["median"]),
                         (3100, 2500))
        self.assertEqual(row["after_over_before"], round(2500 / 3100, 3))
        self.assertEqual(row["after"]["commands"], {"Deliver": 0.5})
        self.assertEqual(row["after"]["items"], {"Backup": 1.0})
