"""Configuration: every problem reported as `file: key: reason`, no device touched."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cli.checks import check_extras, unreadable_by
from agent.config import BUNDLED_PROFILE_DIR, PLACEHOLDER_USB_IDS, decode_text, load_config
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
    assert f'{p}: devices["ticket-scanner"].baud: unknown key' in problems
    r = check(p)
    assert r.returncode == 1
    assert f'{p}: devices["ticket-scanner"].baud: unknown key' in r.stderr.splitlines()


def test_missing_profile_lists_where_it_looked(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(GOOD.replace("generic-serial-scanner", "no-such-scanner"))
    r = check(p)
    assert r.returncode == 1
    assert f"{p}: devices[\"ticket-scanner\"].profile: no profile 'no-such-scanner' in" in r.stderr


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
    assert (
        f"{p}: mqtt.host: missing (required, or a list of brokers in mqtt.hosts)"
        in e.value.problems
    )


def test_a_window_that_could_never_grow_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(
        GOOD.replace(
            "port = 8883\n", "port = 8883\ninflight_messages = 8\ninflight_messages_max = 4\n"
        )
    )
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.problems == [
        f"{p}: mqtt.inflight_messages_max: 4 is less than inflight_messages (8): "
        "the window never grows"
    ]
    p.write_text(
        GOOD.replace(
            "port = 8883\n", "port = 8883\ninflight_messages = 4\ninflight_messages_max = 4\n"
        )
    )
    m = load_config(p).mqtt
    assert (m.inflight_messages, m.inflight_messages_max) == (4, 4)  # a fixed window


def test_duplicate_device_names_and_syntax_errors(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(GOOD + GOOD[GOOD.index("[[devices]]") :])
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert (
        f"{p}: devices[1].name: 'ticket-scanner' is used twice (first at devices[0])"
        in e.value.problems
    )
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
    from agent.config_schema import reference_markdown

    doc = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert doc.read_text() == reference_markdown() + "\n" + central_reference(), (
        "regenerate: python -c 'import agent.config_schema as c, agent.central.config as k; "
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
        f"{p}: agent.site: '_registry' is reserved for the registry's own topics"
    ]


# -- config files as people write them (issue #17, point 4) ------------------------------

JP_COMMENT = "# 戸田市役所 1階 受付窓口の設定\n"


def test_a_utf8_bom_is_accepted(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_bytes(b"\xef\xbb\xbf" + (JP_COMMENT + GOOD).encode())
    assert load_config(p).agent.name == "station-03"
    assert check(p).returncode == 0


def test_shift_jis_is_one_line_naming_the_encoding(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_bytes((JP_COMMENT + GOOD).encode("cp932"))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.problems == [f"{p}: not UTF-8 (it looks like Shift_JIS): save it as UTF-8"]
    r = check(p)
    assert r.returncode == 1
    assert r.stderr.splitlines() == e.value.problems
    assert "Traceback" not in r.stderr


def test_other_bytes_are_not_called_shift_jis(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_bytes(GOOD.encode() + b"\n# \x80\xff\xfe\n")  # not valid CP932 either
    with pytest.raises(ConfigError) as e:
        load_config(p)
    (line,) = e.value.problems
    assert line.startswith(f"{p}: not UTF-8 (byte 0x") and "Shift_JIS" not in line


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_text_or_one_config_error(data: bytes) -> None:
    try:
        text = decode_text(data, "agent.toml")
    except ConfigError as e:
        (line,) = e.problems
        assert line.startswith("agent.toml: not UTF-8") and line.endswith("save it as UTF-8")
    else:
        assert text == data.decode("utf-8-sig")


def with_devices(extra: str) -> str:
    return GOOD + extra


def test_booleans_are_toml_booleans_only(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(
        with_devices(
            '\n[[devices]]\nname = "card"\nprofile = "generic-pcsc-reader"\n'
            'read_my_number = "yes"\nnak_invalid = 1\n'
        )
    )
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert (
        f'{p}: devices["card"].read_my_number: must be true or false (a TOML boolean, '
        "no quotes), not 'yes'" in e.value.problems
    )
    assert any(
        x.startswith(f'{p}: devices["card"].nak_invalid: must be true') for x in e.value.problems
    )
    p.write_text(GOOD + '\n[api]\nallow_remote = "false"\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert any(
        x.startswith(f"{p}: api.allow_remote: must be true or false") for x in e.value.problems
    )


def test_errors_name_the_device_and_carry_no_library_prefix(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(
        with_devices(
            '\n[[devices]]\nname = "desk-2"\nprofile = "generic-hid-scanner-us"\n'
            '\n[[devices]]\nprofile = "generic-serial-scanner"\n'  # no name: by index
        )
    )
    with pytest.raises(ConfigError) as e:
        load_config(p)
    problems = e.value.problems
    assert any(
        x.startswith(f'{p}: devices["desk-2"].name_pattern: no way to find') for x in problems
    )
    assert f"{p}: devices[2].name: missing (required)" in problems
    assert not any("Value error" in x or "Assertion failed" in x for x in problems), problems


def test_a_duplicate_name_is_reported_where_it_is(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    second = '\n[[devices]]\nname = "other"\nprofile = "generic-serial-scanner"\nport = "/dev/x"\n'
    p.write_text(GOOD + second + GOOD[GOOD.index("[[devices]]") :])
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.problems == [
        f"{p}: devices[2].name: 'ticket-scanner' is used twice (first at devices[0])"
    ]


def test_placeholders_are_warned_about(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(GOOD.replace('host_ack = "\\u0006"', 'usb_id = "0000:0000"'))
    r = check(p)
    assert r.returncode == 0, r.stderr
    assert (
        f'{p}: devices["ticket-scanner"].usb_id: warning: "0000:0000" is a placeholder' in r.stdout
    )
    assert f"{p}: mqtt.host: warning: 'registry-broker.example' is a placeholder" in r.stdout
    good = (
        p.read_text()
        .replace('"0000:0000"', '"0c2e:0b81"')
        .replace("registry-broker.example", "broker.city.local")
    )
    p.write_text(good)
    assert "warning" not in check(p).stdout


def test_the_example_configuration_is_valid_but_warned_about() -> None:
    example = Path(__file__).resolve().parents[2] / "provisioning" / "agent.example.toml"
    r = subprocess.run(
        [sys.executable, "-m", "agent", "check-config", "--config-only", str(example)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "usb_id: warning" in r.stdout


def test_every_bundled_profile_with_a_known_usb_id_has_it() -> None:
    for path in sorted(BUNDLED_PROFILE_DIR.glob("*.toml")):
        raw = tomllib.loads(path.read_text())
        text = path.read_text()
        if "vendor_id" in raw:
            assert raw.get("usb_id") == f"{raw['vendor_id']:04x}:{raw['product_id']:04x}", path
        elif re.search(r"USB [0-9a-f]{4}:[0-9a-f]{4}", text):  # named in the profile's notes
            first = re.search(r"USB ([0-9a-f]{4}:[0-9a-f]{4})", text)
            assert first is not None and raw.get("usb_id") == first.group(1), path
        if "usb_id" in raw:
            assert raw["usb_id"] not in PLACEHOLDER_USB_IDS, path


# -- referenced files and extras (check-config, and run before it starts) -------------------


def test_missing_and_unreadable_referenced_files(tmp_path: Path, open_dir: Path) -> None:
    p = tmp_path / "agent.toml"
    ca = tmp_path / "ca.crt"
    key = tmp_path / "data.key"
    key.write_bytes(bytes(32))
    key.chmod(0o600)
    p.write_text(
        GOOD.replace(
            "port = 8883", f'port = 8883\ntls_ca = "{ca}"\npassword_file = "{tmp_path}"'
        ).replace("retention_days = 7", f'retention_days = 7\nkey_file = "{key}"')
        + '\n[api]\ntoken_file = "/run/credentials/madoguchi.service/api-token"\n'
    )
    r = check(p)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert f"{p}: mqtt.tls_ca: {ca}: not found" in lines
    assert f"{p}: mqtt.password_file: {tmp_path}: is a directory, not a file" in lines
    assert not any("key_file" in x for x in lines)  # readable by us (root or owner)
    assert "Traceback" not in r.stderr
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    p.write_text(p.read_text().replace(f'password_file = "{tmp_path}"\n', ""))
    r = check(p)
    assert r.returncode == 0, r.stderr
    assert "api.token_file" in r.stdout and "systemd credential" in r.stdout
    if os.geteuid() != 0:
        pytest.skip("checking another user's access needs root to make files for it")
    shared = open_dir
    (shared / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    (shared / "ca.crt").chmod(0o644)
    (shared / "data.key").write_bytes(bytes(32))
    (shared / "data.key").chmod(0o600)
    p.write_text(p.read_text().replace(str(tmp_path), str(shared)))
    r = subprocess.run(
        [sys.executable, "-m", "agent", "check-config", "--user", "nobody", str(p)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 1
    key = shared / "data.key"
    assert r.stderr.splitlines() == [
        f"{p}: outbox.key_file: {key}: not readable by nobody (mode -rw-------, owner root)"
    ]
    bad_user = subprocess.run(
        [sys.executable, "-m", "agent", "check-config", "--user", "no-such-user-x", str(p)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad_user.returncode == 1
    assert bad_user.stderr.strip() == "--user no-such-user-x: no such user on this host"


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's tmp_path sits in a 0700 directory)."""
    shared = Path(tempfile.mkdtemp(prefix="madoguchi-cfg-", dir="/tmp"))
    shared.chmod(0o755)
    yield shared
    shutil.rmtree(shared)


def test_unreadable_by_follows_the_directories(open_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to own files for another user")
    d = open_dir / "secret"
    d.mkdir(mode=0o700)
    f = d / "ca.crt"
    f.write_text("x")
    f.chmod(0o644)
    why = unreadable_by(f, "nobody")
    assert why is not None and "cannot enter" in why and str(d) in why
    d.chmod(0o755)
    assert unreadable_by(f, "nobody") is None
    assert unreadable_by(f, "root") is None


def test_missing_extras_are_named_per_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(
        GOOD
        + '\n[[devices]]\nname = "desk-hid"\nprofile = "zebra-symbol-hid"\n'
        + '\n[[devices]]\nname = "card"\nprofile = "generic-pcsc-reader"\n'
        + "\n[api]\n"
    )
    config = load_config(p)
    assert check_extras(config).problems == []  # the dev venv has every extra
    for module in ("evdev", "smartcard", "uvicorn"):
        monkeypatch.setitem(sys.modules, module, None)  # import -> ModuleNotFoundError
    problems = check_extras(config).problems
    assert problems == [
        f"{p}: devices[\"desk-hid\"]: driver hid needs Python module 'evdev' "
        "(install the 'hid' extra: pip install 'madoguchi[hid]')",
        f"{p}: devices[\"card\"]: driver pcsc needs Python module 'smartcard' "
        "(install the 'card' extra: pip install 'madoguchi[card]')",
        f"{p}: api: the kiosk API needs Python module 'uvicorn' "
        "(install the 'kiosk' extra: pip install 'madoguchi[kiosk]')",
    ]


def test_several_brokers_are_host_or_host_port_and_exclude_host(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(
        GOOD.replace(
            'host = "registry-broker.example"',
            'hosts = ["b1.city.lan:8884", "b2.city.lan", "[fd00::3]:8885", "10.0.0.4"]\n'
            "persistent_session = true",
        )
    )
    cfg = load_config(p)
    assert cfg.mqtt.brokers() == [
        ("b1.city.lan", 8884),
        ("b2.city.lan", 8883),
        ("fd00::3", 8885),
        ("10.0.0.4", 8883),
    ]
    assert cfg.mqtt.persistent_session is True
    assert cfg.mqtt.host is None
    both = GOOD.replace("port = 8883", 'port = 8883\nhosts = ["b1:1"]')
    p.write_text(both)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.problems == [f"{p}: mqtt.host: set host or hosts, not both"]
    for entry, why in [
        ("b1:0", "the port must be a number from 1 to 65535"),
        ("b1:x", "the port must be a number from 1 to 65535"),
        ("fd00::1", "write an IPv6 address as [address]:port"),
        ("", "a broker is host or host:port, without spaces"),
        ("user@b1", "not a host name or address"),
    ]:
        p.write_text(
            GOOD.replace('host = "registry-broker.example"', f'hosts = ["ok:1", "{entry}"]')
        )
        with pytest.raises(ConfigError) as e:
            load_config(p)
        assert e.value.problems == [f"{p}: mqtt.hosts: [1] {entry!r}: {why}"], entry
    p.write_text(GOOD.replace('host = "registry-broker.example"', "hosts = []"))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert [x.split(": ")[1] for x in e.value.problems] == ["mqtt.hosts"]
