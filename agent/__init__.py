"""madoguchi: the edge agent of municipal reception stations.

The public surface is small on purpose; everything else is private to its module.
"""

from agent.config import Config, load_config
from agent.contract.records import Read, ReadFault, Record
from agent.errors import (
    ConfigError,
    DeviceError,
    DeviceUnavailable,
    MadoguchiError,
    OutboxError,
    OutboxFull,
    UplinkError,
)

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "DeviceError",
    "DeviceUnavailable",
    "MadoguchiError",
    "OutboxError",
    "OutboxFull",
    "Read",
    "ReadFault",
    "Record",
    "UplinkError",
    "__version__",
    "load_config",
]
