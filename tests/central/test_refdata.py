"""`madoguchi refdata` on the central side without a broker: reading a city's CSV or
JSON file (every problem at once, one line each as file:row:column), the --scope
grammar, the station scope end to end through a station's receiver, and the
per-station states `refdata status` prints."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.central.datasets import public_hex, read_rows, signed_messages, status_rows
from agent.contract.datasets import parse_manifest, parse_scope, parse_topic, scope_label
from agent.errors import ConfigError
from agent.station.datasets import DatasetReceiver, DatasetStore

P = "madoguchi/v1"
KEY = Ed25519PrivateKey.generate()
STAFF = {"uid": "01010601cb095703", "operator": "staff-014"}


def problems(kind: str, path: Path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        read_rows(kind, path)
    return e.value.problems


def test_a_csv_reports_every_problem_with_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "used.csv"
    f.write_text(
        "municipality_code,ticket_number,dose,site,agent,colour\n"
        "112241,0000012345,1,goka-hall,st-1,red\n"  # line 2: only the unknown column
        "11224,0000012345,1,goka-hall,st-1\n"  # line 3: municipality_code is 5 digits
        "\n"  # a blank line is skipped
        "112241,,x,goka-hall,st-1,,extra\n"  # line 5: empty ticket, bad dose, a cell too many
    )
    assert problems("used_tickets", f) == [
        f"{f}:1:6: colour: unknown column",
        f"{f}:1:0: at: missing column",
        f"{f}:3:1: municipality_code: not a valid value",
        f"{f}:5:7: more cells than the header",
        f"{f}:5:2: ticket_number: missing",
        f"{f}:5:3: dose: not a valid value",
    ]


def test_a_json_file_reports_row_and_field_and_never_a_value(tmp_path: Path) -> None:
    f = tmp_path / "staff.json"
    f.write_text('[{"uid": "zz-secret", "operator": "a"}, 3, {"operator": "b", "x": 1}]')
    assert problems("staff", f) == [
        f"{f}:1:uid: not a valid value",
        f"{f}:2:-: not an object",
        f"{f}:3:x: unknown field",
        f"{f}:3:uid: missing",
    ]
    assert not any("zz-secret" in p for p in problems("staff", f))
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"uid": }\n]')
    (line,) = problems("staff", broken)
    assert line.startswith(f"{broken}:2:")


def test_good_files_give_their_rows(tmp_path: Path) -> None:
    f = tmp_path / "staff.csv"
    f.write_text("uid,operator\n01010601CB095703,staff-014\n")
    assert read_rows("staff", f) == [{"uid": "01010601CB095703", "operator": "staff-014"}]
    j = tmp_path / "staff.json"
    j.write_text('[{"uid": "01", "operator": "x"}]')
    assert read_rows("staff", j) == [{"uid": "01", "operator": "x"}]


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("fleet", ("fleet", None, None)),
        ("site:toda-1f", ("site", "toda-1f", None)),
        ("station:toda-1f/desk-2", ("station", "toda-1f", "desk-2")),
    ],
)
def test_scopes_round_trip(text: str, parsed: tuple[str, str | None, str | None]) -> None:
    assert parse_scope(text) == parsed
    assert scope_label(*parsed) == text


@pytest.mark.parametrize(
    "text", ["", "site", "site:", "site:Toda 1F", "station:toda", "station:a/b/c", "fleet:x", "x"]
)
def test_bad_scopes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not fleet, site:SITE or station:SITE/AGENT"):
        parse_scope(text)


def receiver(tmp: Path, site: str, agent: str) -> DatasetReceiver:
    tmp.mkdir()
    store = DatasetStore(tmp / "datasets.db")
    store.open()
    r = DatasetReceiver(
        store, bytes.fromhex(public_hex(KEY)), P, max_age_s=3600, site=site, agent=agent
    )
    r.load()
    return r


async def test_a_station_scope_applies_only_at_that_station(tmp_path: Path) -> None:
    a = receiver(tmp_path / "a", "toda-1f", "desk-1")
    b = receiver(tmp_path / "b", "toda-1f", "desk-2")  # same site, another station
    for_a = signed_messages(KEY, P, "staff", 5, [STAFF], site="toda-1f", agent="desk-1")
    assert all("/_datasets/station/toda-1f/desk-1/staff/" in t for t, _ in for_a)
    topic, manifest = for_a[-1]
    parsed = parse_manifest(manifest)
    assert (parsed.scope, parsed.site, parsed.agent) == ("station", "toda-1f", "desk-1")
    t = parse_topic(P, topic)
    assert t is not None and (t.scope, t.site, t.agent) == ("station", "toda-1f", "desk-1")
    for r in (a, b):
        for tp, payload in for_a:
            assert await r.handle(tp, payload)
    assert a.held["staff"].version == 5 and a.staff("01010601CB095703") == "staff-014"
    assert "staff" not in b.held and not b.refused  # ignored by topic
    # the signed manifest replayed on desk-2's topics: refused by its signed agent
    for tp, payload in for_a:
        await b.handle(tp.replace("/desk-1/", "/desk-2/"), payload)
    assert "staff" not in b.held
    assert "is for station 'desk-1'" in b.refused["staff"]["reason"]


def test_status_rows_say_current_behind_stale_refused_missing_offline() -> None:
    now = 1_800_000_000.0
    held = {"version": 7, "issued_at": "2027-01-15T07:50:00+00:00", "expires_at": None}
    report = {
        "published": {
            ("recalled_lots", "fleet"): {"version": 7, "rows": 1},
            ("staff", "site:toda-1f"): {"version": 9, "rows": 2},
            ("staff", "station:goka/desk"): {"version": 3, "rows": 1},
        },
        "stations": {
            "toda-1f/a": {
                "state": "online",
                "datasets": {
                    "held": {"recalled_lots": held, "staff": {**held, "version": 8}},
                    "refused": {},
                },
            },
            "goka/desk": {
                "state": "online",
                "datasets": {
                    "held": {"recalled_lots": {**held, "expires_at": "2027-01-15T07:00:00Z"}},
                    "refused": {"staff": {"version": 3, "reason": "signature does not verify"}},
                },
            },
            "goka/other": {"state": "online", "datasets": {"held": {}, "refused": {}}},
            "goka/gone": {"state": "offline"},
        },
    }
    rows = {(r["station"], r["kind"]): r for r in status_rows(report, now)}
    assert rows[("toda-1f/a", "recalled_lots")]["state"] == "current"
    assert rows[("toda-1f/a", "recalled_lots")]["age_s"] == 600.0
    assert (rows[("toda-1f/a", "staff")]["state"], rows[("toda-1f/a", "staff")]["published"]) == (
        "behind",
        9,
    )
    assert rows[("goka/desk", "recalled_lots")]["state"] == "stale"  # past its expiry
    assert rows[("goka/desk", "staff")]["state"] == "refused"
    assert rows[("goka/other", "recalled_lots")]["state"] == "missing"
    assert ("goka/other", "staff") not in rows  # goka/desk's station scope is not its
    assert rows[("goka/gone", None)]["state"] == "offline"
