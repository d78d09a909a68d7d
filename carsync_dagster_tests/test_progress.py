from __future__ import annotations

from carsync_dagster.orchestration.progress import throughput_chart


def test_throughput_chart_keeps_few_bars_and_scales_to_the_peak() -> None:
    chart = throughput_chart({second: 10 + second % 7 for second in range(600)}).splitlines()
    assert len(chart) == 2 + 30
    assert max(line.count("█") for line in chart) == 40
    assert throughput_chart({}) == "_no pages fetched_"
