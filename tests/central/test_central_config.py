"""central.toml: validated once, every problem as `file: key: reason`, missing files
named, passwords only from files; `madoguchi check-config` knows a central file."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.central.config import load_central_config
from agent.cli.main import main as cli
from agent.errors import ConfigError
from agent.testing import Broker, LoggedProcess
from tests.support import ROOT
from tests.support.central import DESK_TOKEN
from tests.support.pki import TestCA

EXAMPLE = ROOT / "provisioning" / "central.example.toml"


def problems(path: Path, need: Any = None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_central_config(path, need)
    return e.value.problems


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "central.toml"
    p.write_text(text)
    return p


def identity(tmp_path: Path) -> tuple[Path, Path, Path]:
    ca = TestCA()
    cert, key = ca.identity("registry", tmp_path)
    return ca.write(tmp_path / "ca.crt"), cert, key


def test_the_shipped_example_is_valid_once_its_files_exist(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    path = write(tmp_path, text)
    # on a host without the fleet CA: that one file is named, nothing else is wrong
    assert problems(path) == [f"{path}: broker.tls_ca: /etc/madoguchi/ca.crt: no such file"]
    ca, _, _ = identity(tmp_path)
    path = write(tmp_path, text.replace("/etc/madoguchi/ca.crt", str(ca)))
    config = load_central_config(path)  # /run/credentials/... exist only in their unit
    assert config.broker.port == 8883 and config.registry and config.dashboard
    assert config.dashboard.remote_photo is False
    # the registry itself (need="registry") must find its credentials
    found = problems(path, "registry")
    assert found == [
        f"{path}: database.password_file: "
        "/run/credentials/madoguchi-registry.service/db.password: no such file",
        f"{path}: registry.tls_cert: "
        "/run/credentials/madoguchi-registry.service/tls.crt: no such file",
        f"{path}: registry.tls_key: "
        "/run/credentials/madoguchi-registry.service/tls.key: no such file",
    ]
    assert all("dashboard" not in p for p in found)


def test_every_problem_at_once_as_file_key_reason(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[broker]
port = 70000
colour = "blue"

[database]
dsn = "postgresql://reg:hunter2@db/madoguchi"

[registry]
tls_cert = "registry.crt"

[dashboard]
listen_port = 8780
""",
    )
    got = problems(path)
    assert f"{path}: broker.host: required" in got
    assert any(p.startswith(f"{path}: broker.port: ") for p in got)
    assert f"{path}: broker.colour: unknown key" in got
    assert f"{path}: database: the DSN holds a password: put it in a file (password_file)" in got
    assert f"{path}: registry: tls_cert and tls_key go together" in got
    assert (
        f"{path}: dashboard: set token_file or trusted_header: the dashboard needs a login" in got
    )
    assert all("hunter2" not in p for p in got)  # the password is never repeated
    ranged = write(tmp_path, '[broker]\nhost = "h"\n[registry]\nbatch_max_messages = 0\n')
    assert problems(ranged) == [
        f"{ranged}: registry.batch_max_messages: Input should be greater than or equal to 1"
    ]


def test_missing_files_are_named_relative_to_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[broker]
host = "localhost"
tls_ca = "ca.crt"

[dashboard]
tls_cert = "d.crt"
tls_key = "d.key"
token_file = "tokens"
""",
    )
    assert problems(path, "dashboard") == [
        f"{path}: broker.tls_ca: {tmp_path / 'ca.crt'}: no such file",
        f"{path}: dashboard.tls_cert: {tmp_path / 'd.crt'}: no such file",
        f"{path}: dashboard.tls_key: {tmp_path / 'd.key'}: no such file",
        f"{path}: dashboard.token_file: {tmp_path / 'tokens'}: no such file",
    ]
    assert problems(path, "registry") == [
        f"{path}: broker.tls_ca: {tmp_path / 'ca.crt'}: no such file",
        f"{path}: dashboard.tls_cert: {tmp_path / 'd.crt'}: no such file",
        f"{path}: dashboard.tls_key: {tmp_path / 'd.key'}: no such file",
        f"{path}: dashboard.token_file: {tmp_path / 'tokens'}: no such file",
        f"{path}: registry: missing (madoguchi registry needs this section)",
        f"{path}: database: missing (the registry stores records there)",
    ]


def test_database_password_comes_from_its_file(tmp_path: Path) -> None:
    (tmp_path / "db.password").write_text("p@ss:w/rd ü\n")
    path = write(
        tmp_path,
        """
[broker]
host = "localhost"

[database]
dsn = "postgresql://madoguchi_registry@db.example:5433/madoguchi?sslmode=require"
password_file = "db.password"

[registry]
""",
    )
    config = load_central_config(path, "registry")
    assert config.database_target("registry") == (
        "postgresql://madoguchi_registry:p%40ss%3Aw%2Frd%20%C3%BC@db.example:5433/madoguchi"
        "?sslmode=require"
    )
    (tmp_path / "db.password").write_text("\n")
    with pytest.raises(ConfigError, match=r"database\.password_file: .*db\.password: empty"):
        config.database_target("registry")
    sqlite = write(tmp_path, '[broker]\nhost = "h"\n[database]\ndsn = "reg.db"\n[registry]\n')
    assert load_central_config(sqlite).database_target("registry") == tmp_path / "reg.db"


def test_tls_identity_loads_and_a_bad_key_is_named(tmp_path: Path) -> None:
    ca, cert, key = identity(tmp_path)
    text = f"""
[broker]
host = "localhost"
tls_ca = "{ca}"

[database]
dsn = "r.db"

[registry]
tls_cert = "{cert}"
tls_key = "{key}"
"""
    config = load_central_config(write(tmp_path, text), "registry")
    ctx = config.tls_context("registry")
    assert ctx is not None and ctx.verify_mode.name == "CERT_REQUIRED"
    key.write_text("not a key")
    with pytest.raises(ConfigError, match=r"registry\.tls_cert: .*cannot load"):
        config.tls_context("registry")


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def test_check_config_recognises_a_central_file(tmp_path: Path) -> None:
    ca, cert, key = identity(tmp_path)
    (tmp_path / "tokens").write_text(f"desk {DESK_TOKEN}\n")
    good = write(
        tmp_path,
        f"""
[broker]
host = "localhost"
tls_ca = "{ca}"

[database]
dsn = "registry.db"

[registry]
tls_cert = "{cert}"
tls_key = "{key}"

[dashboard]
token_file = "tokens"
""",
    )
    r = run_cli("check-config", str(good))
    assert r.returncode == 0, r.stderr
    assert r.stdout == (
        f"{good}: ok: central: broker localhost:8883 (TLS), database SQLite, registry, dashboard\n"
    )
    bad = tmp_path / "bad.toml"
    bad.write_text('[broker]\nhost = "h"\nport = "x"\n[registry]\nshared = "a b"\n')
    r = run_cli("check-config", str(bad))
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert lines and all(line.startswith(f"{bad}: ") for line in lines)
    assert any(line.startswith(f"{bad}: broker.port: ") for line in lines)


def test_no_password_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["registry", "--db", "postgresql://u:secret@h/db"]) == 1
    err = capsys.readouterr().err
    assert "database: the DSN holds a password: put it in a file" in err
    assert "secret" not in err


@settings(max_examples=60, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=400),
        st.dictionaries(
            st.sampled_from(["broker", "database", "registry", "dashboard", "agent", "x"]),
            st.dictionaries(
                st.sampled_from(["host", "port", "dsn", "tls_ca", "token_file", "shared"]),
                st.one_of(st.integers(), st.text(max_size=20), st.booleans()),
                max_size=4,
            ),
            max_size=4,
        ).map(lambda d: _toml(d).encode()),
    )
)
def test_hostile_files_give_config_errors_only(tmp_path_factory: Any, data: bytes) -> None:
    path = tmp_path_factory.mktemp("c") / "central.toml"
    path.write_bytes(data)
    try:
        load_central_config(path)
    except ConfigError as e:
        assert e.problems
        assert all(p.startswith(f"{path}: ") and "\n" not in p for p in e.problems)


def _toml(d: dict[str, dict[str, Any]]) -> str:
    import json

    out = []
    for section, keys in d.items():
        out.append(f"[{section}]")
        for k, v in keys.items():
            out.append(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}")
    return "\n".join(out) + "\n"


def test_flags_that_the_file_says_are_refused_with_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, '[broker]\nhost = "h"\n[database]\ndsn = "r.db"\n[registry]\n')
    assert cli(["registry", "--config", str(path), "--shared", "g", "--port", "1"]) == 1
    assert capsys.readouterr().err == (
        f"{path}: (command line): --port, --shared with --config: put them in the file\n"
    )


def test_personal_retention_in_the_file_and_refused_beside_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = '[broker]\nhost = "h"\n[database]\ndsn = "r.db"\n[registry]\n'
    assert load_central_config(write(tmp_path, base)).registry.personal_retention_hours == 72.0
    path = write(tmp_path, base + "personal_retention_hours = 0\n")
    assert load_central_config(path).registry.personal_retention_hours == 0.0  # kept
    bad = write(tmp_path, base + "personal_retention_hours = -1\n")
    assert any("registry.personal_retention_hours" in p for p in problems(bad))
    assert cli(["registry", "--config", str(path), "--personal-retention-hours", "5"]) == 1
    assert "--personal-retention-hours with --config" in capsys.readouterr().err


def test_heartbeat_in_the_file_bounded_and_refused_beside_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = '[broker]\nhost = "h"\n[database]\ndsn = "r.db"\n[registry]\n'
    assert load_central_config(write(tmp_path, base)).registry.heartbeat_s == 10.0
    path = write(tmp_path, base + "heartbeat_s = 2.5\n")
    assert load_central_config(path).registry.heartbeat_s == 2.5
    for bad in ("0", "-1", "86400", '"often"'):
        wrong = write(tmp_path, base + f"heartbeat_s = {bad}\n")
        assert any(p.startswith(f"{wrong}: registry.heartbeat_s: ") for p in problems(wrong)), bad
    assert cli(["registry", "--config", str(path), "--heartbeat", "5"]) == 1
    assert capsys.readouterr().err == (
        f"{path}: (command line): --heartbeat with --config: put them in the file\n"
    )


async def test_the_heartbeat_flag_reaches_the_running_registry(
    tmp_path: Path, broker: Broker
) -> None:
    """`madoguchi registry --heartbeat 0.3` publishes its retained status that often."""
    import json
    import time

    import aiomqtt

    from agent.contract.topics import DEFAULT_PREFIX, Topics

    registry = LoggedProcess(
        [
            *(sys.executable, "-m", "agent", "registry", "--port", str(broker.port), "--quiet"),
            *("--db", str(tmp_path / "r.db"), "--heartbeat", "0.3"),
        ],
        tmp_path / "registry.log",
        cwd=ROOT,
    )
    registry.start()
    beats: list[float] = []
    try:
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.subscribe(Topics(DEFAULT_PREFIX).all_registry_status)
            async with asyncio.timeout(20):
                async for message in client.messages:
                    body = json.loads(bytes(message.payload))  # type: ignore[arg-type,unused-ignore]
                    if body.get("state") == "online":
                        assert body["heartbeat_s"] == 0.3
                        beats.append(time.monotonic())
                    if len(beats) >= 4:
                        break
    finally:
        registry.stop()
        registry.close()
    spacing = (beats[-1] - beats[1]) / (len(beats) - 2)
    assert 0.2 < spacing < 1.0, beats  # 0.3 s apart, not the default 10 s


def test_station_status_section_has_its_own_identity(tmp_path: Path) -> None:
    ca, cert, key = identity(tmp_path)
    path = write(
        tmp_path,
        f'[broker]\nhost = "h"\ntls_ca = "{ca}"\n[database]\ndsn = "r.db"\n[registry]\n'
        f'[station_status]\ninterval_s = 5\ntls_cert = "{cert.name}"\ntls_key = "{key.name}"\n',
    )
    config = load_central_config(path, "registry")
    assert config.station_status is not None
    assert config.station_status.interval_s == 5
    assert config.station_status.tls_cert == cert
    assert config.tls_context("station_status") is not None
    bad = write(
        tmp_path,
        '[broker]\nhost = "h"\n[database]\ndsn = "r.db"\n[registry]\n'
        "[station_status]\ninterval_s = 0.1\n",
    )
    assert problems(bad, "registry") == [
        f"{bad}: station_status.interval_s: Input should be greater than or equal to 1",
    ]
    bad.write_text(bad.read_text().replace("interval_s = 0.1", 'tls_cert = "nope.crt"'))
    assert problems(bad, "registry") == [f"{bad}: station_status: tls_cert and tls_key go together"]
    bad.write_text(bad.read_text().replace('"nope.crt"', '"nope.crt"\ntls_key = "nope.key"'))
    assert problems(bad, "registry") == [
        f"{bad}: station_status.tls_{k}: {tmp_path}/nope.{ext}: no such file"
        for k, ext in (("cert", "crt"), ("key", "key"))
    ]


AMQP_BASE = """[broker]
host = "mq1"
port = 8883

[database]
dsn = "registry.db"

[registry]
transport = "amqp"
"""


def test_amqp_transport_needs_its_section_and_takes_the_password_from_a_file(
    tmp_path: Path,
) -> None:
    assert problems(write(tmp_path, AMQP_BASE)) == [
        f"{tmp_path / 'central.toml'}: (file): registry.transport = 'amqp' needs an [amqp] section"
    ]
    (tmp_path / "amqp.pw").write_text("s3cret/:@\n")
    path = write(
        tmp_path,
        AMQP_BASE + '\n[amqp]\nurl = ["amqp://registry@mq1/", "amqp://registry@mq2:5673/"]\n'
        'password_file = "amqp.pw"\nprefetch = 64\n',
    )
    config = load_central_config(path, "registry")
    assert config.amqp is not None and config.amqp.queue == "madoguchi.records"
    assert config.amqp.prefetch == 64
    assert config.amqp_urls() == [
        "amqp://registry:s3cret%2F%3A%40@mq1/",
        "amqp://registry:s3cret%2F%3A%40@mq2:5673/",
    ]


@pytest.mark.parametrize(
    ("amqp", "reason"),
    [
        ('url = "amqp://registry:pw@mq1/"', "url holds a password: put it in a file"),
        ('url = "http://mq1/"', "not amqp://host or amqps://host"),
        ('url = "amqp://mq1/"\ntls = true', "amqps:// goes with tls = true"),
        ('url = "amqps://mq1/"', "amqps:// goes with tls = true"),
        ('url = "amqp://mq1/"\nprefetch = 0', "greater than or equal to 1"),
        ('url = "amqp://mq1/"\nqueue = "a b"', "should match pattern"),
        ('url = "amqp://mq1/"\nhost = "x"', "unknown key"),
    ],
)
def test_amqp_section_refusals_name_the_key(tmp_path: Path, amqp: str, reason: str) -> None:
    found = problems(write(tmp_path, AMQP_BASE + "\n[amqp]\n" + amqp + "\n"))
    assert len(found) == 1 and found[0].startswith(f"{tmp_path / 'central.toml'}: amqp")
    assert reason in found[0], found
