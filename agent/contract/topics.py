"""The topic grammar of the contract: the one place a topic is spelled or parsed.

    {prefix}/{site}/{agent}/records | ack | status | telemetry
    {prefix}/{site}/{agent}/cmd/{name} | cmd/{name}/result
    {prefix}/{site}/{agent}/blobs/{record_id}/manifest | {index} | missing
    {prefix}/_registry/{name}/status        (a registry consumer's own status)

`prefix` is `madoguchi/v1` unless a deployment chose another. A station builds
its own topics from `StationTopics`; the central side subscribes with the
wildcards of `Topics` (optionally as an MQTT 5 shared subscription) and turns
what arrives back into a `Topic` with `Topics.parse`, which never raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

DEFAULT_PREFIX = "madoguchi/v1"

#: a site or agent name: one topic level, no wildcards (as config and enrolment check)
NAME = re.compile(r"^[a-z0-9_-]+$")
#: a command name: one topic level
COMMAND = re.compile(r"^[a-z0-9_]{1,64}$")
#: a chunk index as a station writes it: decimal, no leading zero, at most 9 digits
_CHUNK = re.compile(r"0|[1-9][0-9]{0,8}")

Kind = Literal[
    "records",
    "ack",
    "status",
    "telemetry",
    "cmd",
    "cmd_result",
    "blob_manifest",
    "blob_chunk",
    "blob_missing",
    "registry_status",
    "registry_stations",
    "csr",
    "csr_signed",
]

#: the site level of the registry consumers' own topics: no station may use it
REGISTRY_SITE = "_registry"


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed topic: who it is about and what it carries."""

    site: str
    agent: str
    kind: Kind
    command: str | None = None  # cmd, cmd_result
    record_id: str | None = None  # blob_*
    chunk: int | None = None  # blob_chunk


@dataclass(frozen=True, slots=True)
class StationTopics:
    """Every topic of one station."""

    prefix: str
    site: str
    agent: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.site}/{self.agent}"

    @property
    def records(self) -> str:
        return f"{self.base}/records"

    @property
    def ack(self) -> str:
        return f"{self.base}/ack"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    @property
    def commands(self) -> str:
        """The station's subscription for every command."""
        return f"{self.base}/cmd/#"

    def command(self, name: str) -> str:
        return f"{self.base}/cmd/{name}"

    def command_result(self, name: str) -> str:
        return f"{self.base}/cmd/{name}/result"

    def command_name(self, topic: str) -> str | None:
        """The `{name}` of a command to this station, any name at all (so that an unknown
        one is answered "unknown command"); None for results and every other topic."""
        head = f"{self.base}/cmd/"
        if not topic.startswith(head) or topic.endswith("/result"):
            return None
        return topic[len(head) :]

    @property
    def blobs_missing(self) -> str:
        """The station's subscription for the registry's missing-chunk requests."""
        return f"{self.base}/blobs/+/missing"

    def blob_manifest(self, record_id: str) -> str:
        return f"{self.base}/blobs/{record_id}/manifest"

    def blob_chunk(self, record_id: str, index: int) -> str:
        return f"{self.base}/blobs/{record_id}/{index}"

    def blob_missing(self, record_id: str) -> str:
        return f"{self.base}/blobs/{record_id}/missing"

    @property
    def csr(self) -> str:
        """Certificate renewal: the station's CSR to the fleet signer (issue #22)."""
        return f"{self.base}/csr"

    @property
    def csr_signed(self) -> str:
        """Certificate renewal: the signer's answer (the certificate, or why not)."""
        return f"{self.base}/csr/signed"


@dataclass(frozen=True, slots=True)
class Topics:
    """The fleet's topics under one prefix: per-station topics, wildcards, parsing."""

    prefix: str = DEFAULT_PREFIX

    def station(self, site: str, agent: str) -> StationTopics:
        return StationTopics(self.prefix, site, agent)

    # -- wildcards the central side subscribes to ------------------------------------

    @property
    def all_records(self) -> str:
        return f"{self.prefix}/+/+/records"

    @property
    def all_blobs(self) -> str:
        return f"{self.prefix}/+/+/blobs/+/+"

    @property
    def all_status(self) -> str:
        return f"{self.prefix}/+/+/status"

    @property
    def all_telemetry(self) -> str:
        return f"{self.prefix}/+/+/telemetry"

    @property
    def all_acks(self) -> str:
        return f"{self.prefix}/+/+/ack"

    @property
    def all_csr(self) -> str:
        return f"{self.prefix}/+/+/csr"

    @property
    def all_command_results(self) -> str:
        return f"{self.prefix}/+/+/cmd/+/result"

    def registry_status(self, name: str) -> str:
        """A registry consumer's retained status (online + heartbeat, offline by will)."""
        return f"{self.prefix}/{REGISTRY_SITE}/{name}/status"

    def registry_stations(self, name: str) -> str:
        """The station states a registry consumer derived (agent/central/station_status.py)."""
        return f"{self.prefix}/{REGISTRY_SITE}/{name}/stations"

    @property
    def all_registry_status(self) -> str:
        return f"{self.prefix}/{REGISTRY_SITE}/+/status"

    @staticmethod
    def shared(group: str | None, topic: str) -> str:
        """`$share/{group}/{topic}` (MQTT 5 shared subscription), or the topic itself."""
        return topic if group is None else f"$share/{group}/{topic}"

    # -- parsing ----------------------------------------------------------------------

    def parse(self, topic: str) -> Topic | None:
        """What a topic under this prefix is, or None for anything else (never raises)."""
        if not isinstance(topic, str) or not topic.startswith(self.prefix + "/"):
            return None
        levels = topic[len(self.prefix) + 1 :].split("/")
        if len(levels) < 3:
            return None
        site, agent, rest = levels[0], levels[1], levels[2:]
        # fullmatch: `$` alone would let a trailing newline through
        if not NAME.fullmatch(site) or not NAME.fullmatch(agent):
            return None
        if site == REGISTRY_SITE:  # never a station's: the registry's own topics
            if rest == ["stations"]:
                return Topic(site, agent, "registry_stations")
            return Topic(site, agent, "registry_status") if rest == ["status"] else None
        match rest:
            case ["records" | "ack" | "status" | "telemetry" | "csr" as leaf]:
                return Topic(site, agent, leaf)
            case ["csr", "signed"]:
                return Topic(site, agent, "csr_signed")
            case ["cmd", name] if COMMAND.fullmatch(name):
                return Topic(site, agent, "cmd", command=name)
            case ["cmd", name, "result"] if COMMAND.fullmatch(name):
                return Topic(site, agent, "cmd_result", command=name)
            case ["blobs", rid, "manifest"] if rid:
                return Topic(site, agent, "blob_manifest", record_id=rid)
            case ["blobs", rid, "missing"] if rid:
                return Topic(site, agent, "blob_missing", record_id=rid)
            case ["blobs", rid, index] if rid and _CHUNK.fullmatch(index):
                return Topic(site, agent, "blob_chunk", record_id=rid, chunk=int(index))
        return None


def registry_name(client_id: str) -> str:
    """A registry consumer's client id as one topic level (`agent` of `registry_status`)."""
    name = re.sub(r"[^a-z0-9_-]", "-", client_id.lower())[:128]
    return name or "registry"
