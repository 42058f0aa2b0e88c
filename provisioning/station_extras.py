#!/usr/bin/env python3
"""Which extras of madoguchi a station's agent.toml needs (called by install.sh).

    station_extras.py --config agent.toml --profile-dir DIR... [--kiosk]

Prints `extras=serial,interpret` and `api_port=8765` (empty when there is no [api]).
Reads the TOML with tomllib and the device profiles (first match in the --profile-dir
list, the station's own device_profiles/ first, like the agent) only for each device's
`driver`: `madoguchi check-config` has already validated everything else.

    serial -> serial, interpret      hid    -> hid, interpret
    pcsc   -> card                   camera -> camera, interpret
    [api] (enabled)                  -> kiosk

With --kiosk the config must serve the kiosk page: an enabled [api] whose token is the
one install.sh provisions (LoadCredential= api-token); every problem is printed.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

EXTRAS = {
    "serial": ("serial", "interpret"),
    "hid": ("hid", "interpret"),
    "pcsc": ("card",),
    "camera": ("camera", "interpret"),
}
#: Where systemd hands the kiosk token to the agent (install.sh --kiosk, docs/kiosk.md).
KIOSK_TOKEN = "/run/credentials/madoguchi.service/api-token"


def read_toml(path: Path) -> dict[str, object]:
    with path.open("rb") as f:
        data = f.read()
    return tomllib.loads(data.decode("utf-8-sig"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--profile-dir", type=Path, action="append", default=[])
    ap.add_argument("--kiosk", action="store_true", help="check the [api] the kiosk needs")
    args = ap.parse_args(argv)
    file = args.config
    try:
        raw = read_toml(file)
    except UnicodeDecodeError:
        return 1  # check-config has said it in one line (not UTF-8, looks like Shift_JIS)
    except (OSError, tomllib.TOMLDecodeError) as e:
        print(f"{file}: {e}", file=sys.stderr)
        return 1
    agent = raw.get("agent") if isinstance(raw.get("agent"), dict) else {}
    assert isinstance(agent, dict)
    dirs = [file.parent / str(d) for d in agent.get("profile_dirs", [])]
    dirs += [file.parent / "device_profiles", *args.profile_dir]

    problems: list[str] = []
    extras: set[str] = set()
    devices = raw.get("devices", [])
    for i, dev in enumerate(devices if isinstance(devices, list) else []):
        name = dev.get("name", f"devices[{i}]") if isinstance(dev, dict) else f"devices[{i}]"
        driver = dev.get("driver") if isinstance(dev, dict) else None
        profile = dev.get("profile") if isinstance(dev, dict) else None
        if driver is None and isinstance(profile, str):
            found = next(
                (d / f"{profile}.toml" for d in dirs if (d / f"{profile}.toml").is_file()), None
            )
            if found is not None:
                driver = read_toml(found).get("driver")
        if driver not in EXTRAS:
            problems.append(f'{file}: devices["{name}"]: no known driver (profile {profile!r})')
            continue
        extras.update(EXTRAS[str(driver)])

    api = raw.get("api")
    port = ""
    if isinstance(api, dict) and api.get("enabled", True) is not False:
        extras.add("kiosk")
        port = str(api.get("port", 8765))
    if args.kiosk:
        if not isinstance(api, dict):
            problems.append(f"{file}: api: missing: --kiosk needs the local API ([api] section)")
        elif api.get("enabled", True) is False:
            problems.append(f"{file}: api.enabled: false: --kiosk needs the local API")
        elif api.get("token_file") != KIOSK_TOKEN:
            problems.append(
                f'{file}: api.token_file: must be "{KIOSK_TOKEN}" for the kiosk launcher '
                "(install.sh --kiosk hands the token to the agent there, see docs/kiosk.md)"
            )
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    print("extras=" + ",".join(sorted(extras)))
    print("api_port=" + port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
