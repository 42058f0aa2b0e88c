"""The topic grammar: every topic a station builds parses back to what it was built from,
and `Topics.parse` accepts nothing else, whatever text arrives."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.contract.topics import (
    COMMAND,
    DEFAULT_PREFIX,
    NAME,
    REGISTRY_SITE,
    Topic,
    Topics,
    registry_name,
)

# `_registry` is the registry consumers' own site level (REGISTRY_SITE), never a station's
names = st.from_regex(NAME, fullmatch=True).filter(lambda s: "\n" not in s and s != REGISTRY_SITE)
commands = st.from_regex(COMMAND, fullmatch=True).filter(lambda s: "\n" not in s)
record_ids = st.text(st.characters(exclude_characters="/"), min_size=1, max_size=40)
prefixes = st.sampled_from([DEFAULT_PREFIX, "city", "a/b/c"])


def build(topics: Topics, t: Topic) -> str:
    """The topic a station would write for `t`, with `StationTopics` only."""
    s = topics.station(t.site, t.agent)
    match t.kind:
        case "records" | "ack" | "status" | "telemetry":
            built: str = getattr(s, t.kind)
            return built
        case "cmd":
            return s.command(str(t.command))
        case "cmd_result":
            return s.command_result(str(t.command))
        case "blob_manifest":
            return s.blob_manifest(str(t.record_id))
        case "blob_missing":
            return s.blob_missing(str(t.record_id))
        case "blob_chunk":
            assert t.chunk is not None
            return s.blob_chunk(str(t.record_id), t.chunk)
        case "registry_status":
            return topics.registry_status(t.agent)
    raise AssertionError(t.kind)


def test_the_default_prefix_is_the_contract_s() -> None:
    assert Topics().prefix == DEFAULT_PREFIX == "madoguchi/v1"
    assert Topics().station("s", "a").records == "madoguchi/v1/s/a/records"


@given(prefixes, names, names)
def test_every_leaf_kind_round_trips(prefix: str, site: str, agent: str) -> None:
    topics = Topics(prefix)
    for kind in ("records", "ack", "status", "telemetry"):
        t = Topic(site, agent, kind)  # type: ignore[arg-type]
        assert topics.parse(build(topics, t)) == t


@given(prefixes, names, names, commands)
def test_commands_and_results_round_trip(prefix: str, site: str, agent: str, name: str) -> None:
    topics = Topics(prefix)
    for t in (
        Topic(site, agent, "cmd", command=name),
        Topic(site, agent, "cmd_result", command=name),
    ):
        assert topics.parse(build(topics, t)) == t


@given(prefixes, names, names, record_ids, st.integers(0, 999_999_999))
def test_blob_topics_round_trip(prefix: str, site: str, agent: str, rid: str, index: int) -> None:
    topics = Topics(prefix)
    for t in (
        Topic(site, agent, "blob_manifest", record_id=rid),
        Topic(site, agent, "blob_missing", record_id=rid),
        Topic(site, agent, "blob_chunk", record_id=rid, chunk=index),
    ):
        assert topics.parse(build(topics, t)) == t


def test_wildcards_and_shared_subscriptions() -> None:
    topics = Topics()
    assert topics.all_records == "madoguchi/v1/+/+/records"
    assert topics.all_blobs == "madoguchi/v1/+/+/blobs/+/+"
    assert topics.all_status == "madoguchi/v1/+/+/status"
    assert topics.all_telemetry == "madoguchi/v1/+/+/telemetry"
    assert topics.all_command_results == "madoguchi/v1/+/+/cmd/+/result"
    assert Topics.shared(None, topics.all_records) == topics.all_records
    assert Topics.shared("reg", topics.all_records) == "$share/reg/madoguchi/v1/+/+/records"


@pytest.mark.parametrize(
    "topic",
    [
        "madoguchi/v1/s/a",  # no leaf
        "madoguchi/v1/s/a/records/x",
        "madoguchi/v1/S/a/records",  # not a config name
        "madoguchi/v1/s\n/a/records",  # `$` alone would let the newline through
        "madoguchi/v1/s/a/cmd/ping\n",
        "madoguchi/v1/s/a/cmd/Ping",
        "madoguchi/v1/s/a/blobs//manifest",
        "madoguchi/v1/s/a/blobs/r/007",  # a station writes 7
        "madoguchi/v1/s/a/blobs/r/1234567890",
        "madoguchi/v1/s/a/blobs/r/\u0661",  # a digit, but not an ASCII one
        "madoguchi/v2/s/a/records",
        "$share/g/madoguchi/v1/s/a/records",
        "madoguchi/v1/+/+/records",
    ],
)
def test_what_no_station_builds_is_refused(topic: str) -> None:
    assert Topics().parse(topic) is None


# topics shaped like the grammar, one part sometimes wrong, so that the search reaches every
# case of the parser (plain random text almost never starts with the prefix)
_junk = st.text(max_size=12)
_index = st.one_of(
    st.sampled_from(["0", "7", "007", "00", "123456789", "1234567890", "\u0661", "-1", "+"]),
    st.from_regex(r"[0-9]{1,11}", fullmatch=True),
)
_tails = st.one_of(
    st.tuples(st.sampled_from(["records", "ack", "status", "telemetry", "cmd", "blobs"])),
    st.tuples(st.just("cmd"), st.one_of(commands, _junk)),
    st.tuples(st.just("cmd"), st.one_of(commands, _junk), st.one_of(st.just("result"), _junk)),
    st.tuples(
        st.just("blobs"),
        st.one_of(record_ids, st.just("")),
        st.one_of(st.sampled_from(["manifest", "missing"]), _index, _junk),
    ),
    st.lists(_junk, max_size=5).map(tuple),
)


@st.composite
def topics_for(draw: st.DrawFn, prefix: str) -> str:
    """Under the right prefix with valid names, or with exactly one of the three wrong."""
    head, site, agent = prefix, draw(names), draw(names)
    match draw(st.integers(0, 5)):
        case 0:
            head = draw(st.one_of(prefixes, _junk))
        case 1:
            site = draw(_junk)
        case 2:
            agent = draw(_junk)
    return "/".join([head, site, agent, *draw(_tails)])


@given(prefixes, st.text())
def test_parse_never_raises_on_any_text(prefix: str, topic: str) -> None:
    parsed = Topics(prefix).parse(topic)
    assert parsed is None or isinstance(parsed, Topic)


@settings(max_examples=500)
@given(prefixes, st.data())
def test_parse_accepts_only_what_a_station_builds(prefix: str, data: st.DataObject) -> None:
    topic = data.draw(topics_for(prefix))
    topics = Topics(prefix)
    parsed = topics.parse(topic)
    if parsed is not None:
        assert build(topics, parsed) == topic


def test_parse_of_something_that_is_not_text_is_none() -> None:
    assert Topics().parse(b"madoguchi/v1/s/a/records") is None  # type: ignore[arg-type]


@given(prefixes, names, st.text(max_size=80))
def test_registry_status_round_trips_and_is_never_a_station_s(
    prefix: str, station: str, client_id: str
) -> None:
    topics = Topics(prefix)
    name = registry_name(client_id)
    assert NAME.fullmatch(name)
    assert topics.parse(topics.registry_status(name)) == Topic(
        REGISTRY_SITE, name, "registry_status"
    )
    assert topics.parse(f"{prefix}/{REGISTRY_SITE}/{station}/records") is None
    assert topics.all_registry_status == f"{prefix}/{REGISTRY_SITE}/+/status"


def test_registry_name_of_the_default_client_ids() -> None:
    assert registry_name("madoguchi-registry") == "madoguchi-registry"
    assert registry_name("madoguchi-registry-grp-Host.example-42") == (
        "madoguchi-registry-grp-host-example-42"
    )
    assert registry_name("") == "registry"
