"""Configuration: every problem reported as `file: key: reason`, no device touched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import ConfigError

GOOD = """
[agent]
site = "toda-city-hall-1f"
name = "station-03"
data_dir = "data"

[mqtt]
host = "registry-broker.example"
port = 8883

[outbox]
max_bytes = 2_000_000_000
resend_after_s = 30
retention_days = 7

[[devices]]
name = "ticket-scanner"
profile = "generic-serial-scanner"
port = "/dev/serial/by-id/usb-does-not-exist-if00"
host_ack = "\\u0006"
"""


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "check-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_design_example_loads_with_profile_and_override(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(GOOD)
    cfg = load_config(p)
    dev = cfg.devices[0]
    assert dev.driver == "serial"
    assert dev.baudrate == 9600  # from the profile
    assert dev.terminator == "\r"
    assert dev.host_ack == "\x06"  # overridden on the device entry
    assert cfg.agent.data_dir == (tmp_path / "data").resolve()
    assert cfg.topic_base == "madoguchi/v1/toda-city-hall-1f/station-03"
    r = check(p)
    assert r.returncode == 0, r.stderr
    assert "ticket-scanner" in r.stdout


def test_every_problem_names_file_and_key(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    bad = (
        GOOD.replace('site = "toda-city-hall-1f"', 'site = "Toda City"')
        .replace("port = 8883", "port = 99999\ncolour = 'blue'")
        .replace('host_ack = "\\u0006"', 'host_ack = "\\u0006"\nbaud = 9600')
    )
    p.write_text(bad)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    problems = e.value.problems
    assert f"{p}: agent.site: String should match pattern '^[a-z0-9_-]+$'" in problems
    assert any(x.startswith(f"{p}: mqtt.port: ") for x in problems)
    assert f"{p}: mqtt.colour: unknown key" in problems
    assert f"{p}: devices[0].baud: unknown key" in problems
    r = check(p)
    assert r.returncode == 1
    assert f"{p}: devices[0].baud: unknown key" in r.stderr.splitlines()


def test_missing_profile_lists_where_it_looked(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(GOOD.replace("generic-serial-scanner", "no-such-scanner"))
    r = check(p)
    assert r.returncode == 1
    assert f"{p}: devices[0].profile: no profile 'no-such-scanner' in" in r.stderr


def test_bad_value_in_profile_names_the_profile_file(tmp_path: Path) -> None:
    profiles = tmp_path / "device_profiles"
    profiles.mkdir()
    (profiles / "odd-scanner.toml").write_text('driver = "serial"\nbaudrate = -5\nspeed = 1\n')
    p = tmp_path / "agent.toml"
    p.write_text(GOOD.replace("generic-serial-scanner", "odd-scanner"))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    prof = profiles / "odd-scanner.toml"
    assert f"{prof}: baudrate: Input should be greater than 0" in e.value.problems
    assert f"{prof}: speed: unknown key" in e.value.problems


def test_unknown_driver_and_missing_required(tmp_path: Path) -> None:
    profiles = tmp_path / "device_profiles"
    profiles.mkdir()
    (profiles / "future.toml").write_text('driver = "telepathy"\n')
    p = tmp_path / "agent.toml"
    p.write_text(GOOD.replace("generic-serial-scanner", "future").replace("[mqtt]\n", "[mqtt]\n#"))
    text = p.read_text().replace('host = "registry-broker.example"\n', "")
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    prof = profiles / "future.toml"
    assert any(x.startswith(f"{prof}: driver: Input tag 'telepathy'") for x in e.value.problems), (
        e.value.problems
    )
    assert f"{p}: mqtt.host: missing (required)" in e.value.problems


def test_duplicate_device_names_and_syntax_errors(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(GOOD + GOOD[GOOD.index("[[devices]]") :])
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"{p}: devices[1].name: 'ticket-scanner' is used twice" in e.value.problems
    p.write_text("[agent\nsite=")
    r = check(p)
    assert r.returncode == 1
    assert r.stderr.startswith(f"{p}: (syntax): ")
    r = check(tmp_path / "nope.toml")
    assert r.returncode == 1
    assert "nope.toml: (file): not found" in r.stderr


def test_check_config_opens_no_device(tmp_path: Path) -> None:
    """The configured port does not exist, and check-config does not care."""
    p = tmp_path / "agent.toml"
    p.write_text(GOOD)
    assert check(p).returncode == 0
    assert not (tmp_path / "data").exists()


def test_configuration_reference_is_current() -> None:
    """docs/configuration.md is generated from the models: a new key must show up there."""
    from agent.central.config import reference_markdown as central_reference
    from agent.config import reference_markdown

    doc = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert doc.read_text() == reference_markdown() + "\n" + central_reference(), (
        "regenerate: python -c 'import agent.config as c, agent.central.config as k; "
        'print(c.reference_markdown() + chr(10) + k.reference_markdown(), end="")\''
        " > docs/configuration.md"
    )


def test_kiosk_label_and_role(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        GOOD.replace('host_ack = "\\u0006"', 'host_ack = "\\u0006"\nlabel = "接種券スキャナ"')
        + '\n[api]\nrole = "mynumber"\n',
        encoding="utf-8",
    )
    cfg = load_config(path)
    assert cfg.devices[0].label == "接種券スキャナ"
    assert cfg.api is not None and cfg.api.role == "mynumber"
    for bad, key in (('role = "pharmacy"', "role"), ('role = "general"\nextra = 1', "extra")):
        path.write_text(GOOD + f"\n[api]\n{bad}\n", encoding="utf-8")
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert key in str(e.value)
    path.write_text(
        GOOD.replace('host_ack = "\\u0006"', 'host_ack = "\\u0006"\nlabel = "a\\u001bb"'),
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "label" in str(e.value)


def test_the_registry_s_site_level_is_no_station_s(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(GOOD.replace('site = "toda-city-hall-1f"', 'site = "_registry"'))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.problems == [
        f"{p}: agent.site: Value error, '_registry' is reserved for the registry's own topics"
    ]
