"""Every outage is defined once (`outages.OUTAGES`): whatever lists outages follows the table."""

from __future__ import annotations

import json

import pytest

from pytest_depfence import options, outages
from pytest_depfence.errors import ConfigError
from pytest_depfence.plugin.markers import MARKERS
from pytest_depfence.report import SCHEMA_PATH


def test_the_report_schema_lists_exactly_the_outages_of_the_table() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["$defs"]["run"]["properties"]["outage"]["enum"] == list(outages.OUTAGES)


def test_the_fence_marker_help_names_every_outage() -> None:
    for name in outages.OUTAGES:
        assert f"'{name}'" in MARKERS["fence"]


def test_dns_outages_answer_with_an_rcode_or_not_at_all_and_refuse_connections() -> None:
    for outage in outages.OUTAGES.values():
        assert outage.kernel in outages.KERNEL_ACTIONS
        if outage.layer == "dns":
            assert outage.kernel == "refuse"
        else:
            assert outage.rcode is None and outage.kernel == outage.name


def test_an_unknown_outage_names_the_value_the_choices_and_where() -> None:
    with pytest.raises(ConfigError) as info:
        options.validate("outage", "drop", "marker at test_x.py:3")
    assert str(info.value) == (
        "invalid value 'drop' from marker at test_x.py:3: outage must be one of "
        + ", ".join(outages.OUTAGES)
    )
