"""
L{benchmarks.rates}' choice of the round that stands for a kind.
"""

from twisted.trial.unittest import SynchronousTestCase

from benchmarks.rates import lookup_means, median_round


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


class LookupMeansTests(SynchronousTestCase):

    def test_mean_milliseconds_by_where_the_lookups_ended(self):
        changed = {"lookup:peer.count": 4, "lookup:peer.seconds": 0.006,
                   "lookup:local.count": 2, "lookup:local.seconds": 0.0001,
                   "resumed_peer": 4, "commands:FetchSession": 4}
        means = lookup_means(changed)
        self.assertEqual(set(means), {"peer", "local"})
        self.assertAlmostEqual(means["peer"], 1.5)
        self.assertAlmostEqual(means["local"], 0.05)
