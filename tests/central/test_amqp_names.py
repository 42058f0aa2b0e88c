"""The AMQP side's names (agent/central/amqp.py): RabbitMQ's MQTT plugin swaps `/` and
`.` between an MQTT topic and a routing key; the registry must map them back exactly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.central.amqp import AmqpTransport, records_binding, routing_key, safe_url, topic_of


def test_records_binding_and_ack_key_as_the_cluster_routes_them() -> None:
    assert records_binding() == "madoguchi.v1.*.*.records"
    assert records_binding("city/x.y") == "city.x/y.*.*.records"
    assert routing_key("madoguchi/v1/site1/st1/ack") == "madoguchi.v1.site1.st1.ack"
    assert topic_of("madoguchi.v1.site1.st1.records") == "madoguchi/v1/site1/st1/records"


@given(st.text(alphabet="ab./-_", max_size=30))
def test_topic_and_routing_key_map_back_exactly(topic: str) -> None:
    assert topic_of(routing_key(topic)) == topic


def test_a_log_line_never_shows_the_password() -> None:
    assert safe_url("amqps://registry:s3cret@mq1.city.example/") == "mq1.city.example:5671"
    assert safe_url("amqp://u:p@10.0.0.2:5673/vh") == "10.0.0.2:5673"
    t = AmqpTransport(["amqp://u:pw@mq1/", "amqp://u:pw@mq2:5673/"])
    assert "pw" not in t.describe() and "mq2:5673" in t.describe()
    with pytest.raises(ValueError, match="at least one URL"):
        AmqpTransport([])
