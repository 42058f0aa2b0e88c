"""The config loader's answers for wrong types found by fuzzing (issue #15 point 9): one
`file: key: reason` line each, never a TypeError traceback from check-config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import ConfigError

HEAD = """
[agent]
site = "s"
name = "a"
data_dir = "data"
{agent}
[mqtt]
host = "127.0.0.1"
{rest}
"""
SCANNER = """
[[devices]]
name = "x"
profile = "generic-serial-scanner"
port = "/dev/ttyX"
{extra}
"""


@pytest.mark.parametrize(
    ("agent", "rest", "key"),
    [
        ("profile_dirs = 5", "", "agent.profile_dirs"),
        ('profile_dirs = "dir"', "", "agent.profile_dirs"),
        ("", "[api]\nmanual_device = [1]", "api.manual_device"),
        ("", "[api]\nmanual_device = {a = 1}", "api.manual_device"),
        ("", SCANNER.format(extra='terminator = "あ"'), 'devices["x"].terminator'),
        ("", SCANNER.format(extra='host_ack = "\\u3042"'), 'devices["x"].host_ack'),
        ("", SCANNER.format(extra='encoding = "rot13"'), 'devices["x"].encoding'),
        ("", SCANNER.format(extra='encoding = "no-such-codec"'), 'devices["x"].encoding'),
    ],
)
def test_wrong_types_are_config_errors(tmp_path: Path, agent: str, rest: str, key: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(HEAD.format(agent=agent, rest=rest))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert any(p.startswith(f"{path}: {key}: ") for p in err.value.problems), err.value.problems


def test_a_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(b'[agent]\nsite = "\xff"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems == [f"{path}: not UTF-8 (byte 0xff at offset 16): save it as UTF-8"]


def test_check_config_prints_the_problem_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(HEAD.format(agent="profile_dirs = 5", rest="[api]\nmanual_device = [1]"))
    out = subprocess.run(
        [sys.executable, "-m", "agent", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert {line.split(": ")[1] for line in lines} == {"agent.profile_dirs", "api.manual_device"}
