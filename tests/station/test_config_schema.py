"""The running agent's configuration classes (agent/config.py) against the schema's
(agent/config_schema.py), and `load_config_isolated`: its child and its cache (issue #18,
point 3: pydantic out of the running agent)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import agent.config as runtime
import agent.config_schema as schema
from agent.config import CACHE_NAME, Config, decode, encode, load_config, load_config_isolated
from agent.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DEVICES = {"SerialDevice", "HidDevice", "PcscDevice", "CameraDevice"}


def render(tp: Any) -> str:
    """A type as one string, whichever side it comes from (class names, not classes)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin is typing.Annotated:
        return render(args[0])
    if origin is Literal:
        return "Literal[" + ", ".join(repr(a) for a in args) + "]"
    if origin in (typing.Union, types.UnionType):
        if {getattr(a, "__name__", "") for a in args} == DEVICES:
            return "DeviceConfig"
        return " | ".join(render(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(render(a) for a in args)}]"
    return str(tp.__name__)


def schema_fields(model: type[Any]) -> list[tuple[str, str, Any]]:
    out = []
    for name, f in model.model_fields.items():
        default = "required" if f.is_required() else f.get_default(call_default_factory=True)
        out.append((name, render(f.annotation), schema.to_runtime(default)))
    return out


def runtime_fields(cls: type[Any]) -> list[tuple[str, str, Any]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "required"
        out.append((f.name, render(hints[f.name]), default))
    return out


@pytest.mark.parametrize("name", sorted(runtime.CLASSES))
def test_each_runtime_class_has_the_schemas_fields_types_and_defaults(name: str) -> None:
    model = getattr(schema, name)
    assert runtime_fields(runtime.CLASSES[name]) == schema_fields(model), (
        f"agent/config.py {name} differs from agent/config_schema.py: write its fields as "
        "(name, type, default) " + repr(schema_fields(model))
    )


def test_every_schema_model_has_a_runtime_twin() -> None:
    models = {
        n
        for n, v in vars(schema).items()
        if isinstance(v, type) and issubclass(v, schema.Strict) and v is not schema.Strict
    }
    assert models == set(runtime.CLASSES)


def station_toml(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "agent.toml"
    path.write_text(
        '[agent]\nsite = "s"\nname = "a"\ndata_dir = "data"\n'
        '[mqtt]\nhosts = ["127.0.0.1:1884", "[::1]"]\n'
        "[api]\nport = 8800\n"
        '[[devices]]\nname = "scanner"\nprofile = "generic-serial-scanner"\n'
        'port = "/dev/ttyX"\n'
        '[[devices]]\nname = "cam"\nprofile = "generic-uvc-webcam"\n'
        '[[devices]]\nname = "reader"\nprofile = "generic-pcsc-reader"\n'
        '[devices.operators]\n"01:02" = "clerk"\n'
        '[[devices]]\nname = "hid"\nprofile = "generic-hid-scanner-us"\n'
        'path = "/dev/input/x"\n' + extra
    )
    return path


def test_the_wire_carries_every_value_back_equal(tmp_path: Path) -> None:
    config = load_config(station_toml(tmp_path))
    assert decode(Config, json.loads(json.dumps(encode(config))), "config") == config
    assert config.devices[2].operators == {"0102": "clerk"}  # type: ignore[union-attr]


def test_isolated_equals_in_process_and_the_second_start_uses_the_cache(tmp_path: Path) -> None:
    path = station_toml(tmp_path)
    first = load_config_isolated(path)
    assert first == load_config(path)
    cache = tmp_path / "data" / CACHE_NAME
    assert cache.stat().st_mode & 0o777 == 0o600
    entry = json.loads(cache.read_text())
    # mark the cached answer: a hit returns it, a miss would validate the file again
    entry["config"]["agent"]["telemetry_interval_s"] = 1234.0
    cache.write_text(json.dumps(entry))
    assert load_config_isolated(path).agent.telemetry_interval_s == 1234.0


def _marked(tmp_path: Path) -> Path:
    path = station_toml(tmp_path)
    load_config_isolated(path)
    cache = tmp_path / "data" / CACHE_NAME
    entry = json.loads(cache.read_text())
    entry["config"]["agent"]["telemetry_interval_s"] = 1234.0
    cache.write_text(json.dumps(entry))
    return path


def test_a_changed_config_file_misses(tmp_path: Path) -> None:
    path = _marked(tmp_path)
    path.write_text(path.read_text().replace('name = "a"', 'name = "b"'))
    got = load_config_isolated(path)
    assert (got.agent.name, got.agent.telemetry_interval_s) == ("b", 30.0)


def test_a_changed_profile_misses(tmp_path: Path) -> None:
    path = _marked(tmp_path)
    profiles = tmp_path / "device_profiles"
    profiles.mkdir()
    # a profile beside the config now shadows the bundled one the check found
    (profiles / "generic-serial-scanner.toml").write_text('driver = "serial"\nbaudrate = 115200\n')
    got = load_config_isolated(path)
    assert got.agent.telemetry_interval_s == 30.0
    assert got.devices[0].baudrate == 115200  # type: ignore[union-attr]
    (profiles / "generic-serial-scanner.toml").write_text('driver = "serial"\nbaudrate = 19200\n')
    assert load_config_isolated(path).devices[0].baudrate == 19200  # type: ignore[union-attr]


def test_other_code_misses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _marked(tmp_path)
    monkeypatch.setattr(runtime, "code_fingerprint", lambda: "another release")
    assert load_config_isolated(path).agent.telemetry_interval_s == 30.0


@pytest.mark.parametrize(
    "damage",
    [b"", b"{", b"[]", b'{"key": 1}', b"\xff\xfe", b'{"key": {}, "inputs": 5, "config": {}}'],
)
def test_a_torn_or_foreign_cache_is_a_miss_never_an_error(tmp_path: Path, damage: bytes) -> None:
    path = station_toml(tmp_path)
    (tmp_path / "data" / CACHE_NAME).write_bytes(damage)
    assert load_config_isolated(path) == load_config(path)


def test_a_cached_config_the_classes_no_longer_accept_is_a_miss(tmp_path: Path) -> None:
    path = _marked(tmp_path)
    cache = tmp_path / "data" / CACHE_NAME
    entry = json.loads(cache.read_text())
    entry["config"]["mqtt"]["port"] = "1883"  # a string where an int belongs
    cache.write_text(json.dumps(entry))
    assert load_config_isolated(path).mqtt.port == 1883


def test_the_childs_problems_are_every_line_of_check_config(tmp_path: Path) -> None:
    path = station_toml(tmp_path, "baudrate = -1\nbogus = 1\n")
    with pytest.raises(ConfigError) as here:
        load_config(path)
    with pytest.raises(ConfigError) as child:
        load_config_isolated(path)
    assert child.value.problems == here.value.problems
    assert len(child.value.problems) == 2
    assert not (tmp_path / "data" / CACHE_NAME).exists()


def test_a_child_that_dies_is_one_line_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = station_toml(tmp_path)
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'Segmentation fault' >&2\nexit 139\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    with pytest.raises(ConfigError) as e:
        load_config_isolated(path, cache=False)
    assert e.value.problems == [
        f"{path}: (file): the configuration check failed (exit 139): Segmentation fault"
    ]


def test_no_data_dir_yet_still_loads_and_writes_no_cache(tmp_path: Path) -> None:
    path = station_toml(tmp_path)
    (tmp_path / "data").rmdir()
    assert load_config_isolated(path).agent.name == "a"
    assert not (tmp_path / "data").exists()


def test_a_running_agent_process_never_loads_pydantic(tmp_path: Path) -> None:
    path = station_toml(tmp_path)
    code = (
        "import sys\n"
        "from agent.station.remote_config import load_or_roll_back\n"
        "import agent.cli.main, agent.station.app\n"
        f"config, problems = load_or_roll_back(__import__('pathlib').Path({str(path)!r}))\n"
        "assert config is not None and not problems, problems\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'pydantic_core')"
        " or m == 'agent.config_schema'))\n"
    )
    for _ in range(2):  # the child's run, then the cache's
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
        )
        assert out.stdout.strip() == "[]", out.stdout


hostile = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


@settings(max_examples=int(os.environ.get("MADOGUCHI_FUZZ_EXAMPLES", "200")), deadline=None)
@given(value=hostile, key=st.sampled_from(["agent", "mqtt", "devices", "api", "outbox"]))
def test_decode_of_hostile_json_raises_only_value_error(value: Any, key: str) -> None:
    good = encode(
        Config(
            agent=runtime.AgentSection(site="s", name="a"),
            mqtt=runtime.MqttSection(host="h"),
        )
    )
    for wire in (value, {**good, key: value}):
        try:
            got = decode(Config, wire, "config")
        except ValueError:
            continue
        assert isinstance(got, Config) and encode(got) == wire
