"""
L{benchmarks.rates}' choice of the round that stands for a kind.
"""

from twisted.trial.unittest import SynchronousTestCase

from benchmarks.rates import median_round


class MedianRoundTests(SynchronousTestCase):

    def test_the_median_round_is_reported_whole_with_every_rounds_cpu(self):
        rounds = [{"server_cpu_us_per_handshake": cpu, "handshakes": count}
                  for cpu, count in ((5000, 10), (3000, 30), (4000, 20))]
        self.assertEqual(median_round(rounds),
                         {"server_cpu_us_per_handshake": 4000, "handshakes": 20,
                          "rounds_server_cpu_us": [5000, 3000, 4000]})

    def test_of_two_rounds_the_lower_is_reported(self):
        rounds = [{"server_cpu_us_per_handshake": cpu} for cpu in (5000, 3000)]
        self.assertEqual(median_round(rounds)["server_cpu_us_per_handshake"],
                         3000)
