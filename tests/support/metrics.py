"""
A node's metrics page as a test reads it: scraped with C{curl}, parsed by
prometheus_client's own parser.
"""

from __future__ import annotations

import os

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.utils import getProcessOutputAndValue

# Sample name -> {frozenset of label items: value}.
Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


async def scrape_metrics(port: int) -> Samples:
    """
    C{curl} the metrics page on C{port} of 127.0.0.1, and parse it with
    prometheus_client's parser.
    """
    output, error, code = await getProcessOutputAndValue(
        "curl", ["--silent", "--show-error", "--fail", "--max-time", "10",
                 f"http://127.0.0.1:{port}/metrics"], env=os.environ)
    if code != 0:
        raise AssertionError(f"curl failed ({code}): {error.decode()}")
    samples: Samples = {}
    for family in text_string_to_metric_families(output.decode("utf-8")):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[
                frozenset(sample.labels.items())] = sample.value
    return samples


async def probe(port: int, path: str) -> tuple[int, str]:
    """
    C{curl} C{path} on C{port} of 127.0.0.1, as a load balancer's or
    Kubernetes' probe does: the HTTP status and the body.
    """
    output, error, code = await getProcessOutputAndValue(
        "curl", ["--silent", "--show-error", "--max-time", "10",
                 "--write-out", "\n%{http_code}",
                 f"http://127.0.0.1:{port}{path}"], env=os.environ)
    if code != 0:
        raise AssertionError(f"curl failed ({code}): {error.decode()}")
    body, _, status = output.decode("utf-8").rpartition("\n")
    return int(status), body
