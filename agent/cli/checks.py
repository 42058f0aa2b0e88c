"""The host checks live in agent/station/checks.py (the station's `cmd/config` runs them
too); re-exported here for the CLI."""

from agent.station.checks import (
    Checked,
    check_config_file,
    check_extras,
    check_files,
    referenced_files,
    unreadable_by,
)

__all__ = [
    "Checked",
    "check_config_file",
    "check_extras",
    "check_files",
    "referenced_files",
    "unreadable_by",
]
