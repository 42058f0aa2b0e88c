"""central.toml: the registry's and the dashboard's configuration, validated once at load.

One file for the central host (`madoguchi registry --config`, `madoguchi dashboard
--config`, `madoguchi check-config`). Like the station's agent.toml, every problem is
reported as `file: key: reason`, all at once, and every file it names is checked to
exist and be readable. Secrets never live in it: the database password, the MQTT
password and the dashboard's tokens are files it points at (under systemd, the
unit's `/run/credentials/...` paths), so nothing secret reaches a command line.

The central side may not import `agent.config` (the station's), so the small
helpers it shares in spirit are repeated here.
"""

from __future__ import annotations

import ssl
import tomllib
from pathlib import Path
from typing import Any, Literal, Self, TypedDict
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent._configdoc import field_row
from agent.contract.topics import DEFAULT_PREFIX
from agent.errors import ConfigError

CENTRAL_SECTIONS = frozenset({"broker", "database", "registry", "dashboard", "amqp"})
Role = Literal["registry", "dashboard", "station_status"]
# under systemd the secrets exist only while their unit runs (LoadCredential=)
CREDENTIALS_DIR = Path("/run/credentials")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerSection(_Strict):
    """The fleet broker, as both the registry and the dashboard reach it."""

    host: str = Field(description="Broker host name (must match the broker certificate).")
    port: int = Field(default=8883, ge=1, le=65535, description="Broker port.")
    topic_prefix: str = Field(default=DEFAULT_PREFIX, description="First topic levels.")
    tls_ca: Path | None = Field(
        default=None, description="Fleet CA bundle (PEM); enables TLS. Not secret."
    )


class _Identity(_Strict):
    """How one central process proves who it is to the broker: its certificate (the
    shipped broker makes the CN its user name and client id), or a user name + password
    on a broker with password files."""

    tls_cert: Path | None = Field(
        default=None,
        description="This process's certificate (PEM); its CN is its identity. Under "
        "systemd: /run/credentials/<unit>/tls.crt.",
    )
    tls_key: Path | None = Field(default=None, description="Private key of tls_cert (PEM).")
    username: str | None = Field(
        default=None,
        description="MQTT user name, for a broker with password files; the shipped broker "
        "ignores it and uses the certificate CN.",
    )
    password_file: Path | None = Field(
        default=None, description="File holding the MQTT password (first line)."
    )

    @model_validator(mode="after")
    def _pairs(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs username")
        return self


class DatabaseSection(_Strict):
    """The registry database: PostgreSQL DSN (password from a file) or a SQLite path."""

    dsn: str = Field(
        description="postgresql://user@host/db (no password in it) or a SQLite file path."
    )
    password_file: Path | None = Field(
        default=None,
        description="File holding the PostgreSQL password (first line); put in the DSN at "
        "connect time, never on a command line.",
    )

    @model_validator(mode="after")
    def _no_password_inline(self) -> Self:
        check_dsn(self.dsn, self.password_file, "password_file")
        return self


def check_dsn(dsn: str, password_file: Path | None, key: str) -> None:
    if is_postgres(dsn):
        parts = urlsplit(dsn)
        if parts.password is not None or "password=" in parts.query:
            raise ValueError(f"the DSN holds a password: put it in a file ({key})")
    elif password_file is not None:
        raise ValueError(f"{key} is for a postgresql:// DSN only")


class RegistrySection(_Identity):
    """`madoguchi registry`: the consumer that stores, then acks."""

    transport: Literal["mqtt", "amqp"] = Field(
        default="mqtt",
        description="Where records come from: `mqtt` (the broker above, e.g. one mosquitto "
        "with shared subscriptions) or `amqp` (the quorum queue of a RabbitMQ cluster, "
        "[amqp]; docs/cluster.md).",
    )

    shared: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="MQTT 5 shared-subscription group; each member needs its own certificate.",
    )
    gap_timeout_s: float = Field(
        default=300.0, gt=0, description="Seconds a seq gap may stay open before it is an alert."
    )
    batch_max_messages: int = Field(
        default=512,
        ge=1,
        le=10_000,
        description="Messages committed together at most (and at most 8 MiB of them).",
    )
    quiet: bool = Field(default=False, description="Do not print each stored record.")
    blob_dir: Path | None = Field(
        default=None,
        description="Where photo chunks are put together. Default: beside a SQLite database, "
        "else madoguchi-registry-blobs in the working directory.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING"] = Field(
        default="INFO", description="Log level on stderr."
    )
    personal_retention_hours: float = Field(
        default=72.0,
        ge=0,
        description="Hours a record's sealed personal part is kept, then purged "
        "(0: kept until `madoguchi registry purge-personal`).",
    )
    dataset_key: Path | None = Field(
        default=None,
        description="Ed25519 private key (PEM, `madoguchi registry dataset-keygen`): the "
        "registry keeps and publishes the signed `used_tickets` dataset. Off when unset.",
    )
    heartbeat_s: float = Field(
        default=10.0,
        ge=0.1,
        le=3600,
        description="Seconds between the registry's retained status heartbeats; the dashboard "
        "calls the registry down after 3 missed.",
    )


class AmqpSection(_Strict):
    """The RabbitMQ cluster's AMQP side, for `[registry] transport = "amqp"`."""

    url: str | list[str] = Field(
        description="amqp://user@host:5672/vhost (or amqps://), or a list with one per "
        "cluster node, tried in turn. No password in it: password_file."
    )
    password_file: Path | None = Field(
        default=None, description="File holding the AMQP password (first line)."
    )
    tls: bool = Field(
        default=False,
        description="TLS with broker.tls_ca (and the registry's tls_cert/tls_key if set); "
        "needs amqps:// URLs.",
    )
    queue: str = Field(
        default="madoguchi.records",
        pattern=r"^[A-Za-z0-9_.:-]{1,200}$",
        description="The records quorum queue (provisioning/cluster/declare-records-queue "
        "declares and binds it).",
    )
    prefetch: int = Field(
        default=256,
        ge=1,
        le=10_000,
        description="Messages a registry process holds unsettled at most (basic.qos).",
    )

    @property
    def urls(self) -> list[str]:
        return [self.url] if isinstance(self.url, str) else list(self.url)

    @model_validator(mode="after")
    def _urls(self) -> Self:
        if not self.urls:
            raise ValueError("url: at least one")
        for u in self.urls:
            parts = urlsplit(u)
            if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
                raise ValueError(f"url {u!r}: not amqp://host or amqps://host")
            if parts.password is not None:
                raise ValueError("url holds a password: put it in a file (password_file)")
            if self.tls != (parts.scheme == "amqps"):
                raise ValueError(f"url {parts.hostname}: amqps:// goes with tls = true")
        return self


class DashboardSection(_Identity):
    """`madoguchi dashboard`: the desk's page, its authentication and its audit log."""

    database_dsn: str | None = Field(
        default=None,
        description="The registry database for the counts and gaps (a SELECT-only role); "
        "default: none shown. No password in it.",
    )
    database_password_file: Path | None = Field(
        default=None, description="File holding the password of database_dsn (first line)."
    )
    listen_host: str = Field(default="127.0.0.1", description="Address the web page listens on.")
    listen_port: int = Field(default=8780, ge=0, le=65535, description="Port of the web page.")
    token_file: Path | None = Field(
        default=None,
        description="Access tokens, one a line: `name token` (or just a token, name 'token'); "
        "each >= 32 characters. Sent as `Authorization: Bearer` or by the login page.",
    )
    trusted_header: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9-]+$",
        description="Header an authenticating reverse proxy sets to the user name (e.g. "
        "X-Remote-User); believed only from trusted_proxies.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "::1"],
        description="Peer addresses whose trusted_header is believed.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host header values answered besides loopback:port (e.g. "
        "dashboard.city.example); anything else gets 421 (DNS rebinding).",
    )
    allowed_origin: str | None = Field(
        default=None,
        pattern=r"^https?://[A-Za-z0-9.\-\[\]:]+$",
        description="The one Origin browsers may send (scheme://host[:port]). Default: "
        "http://<listen_host>:<listen_port>.",
    )
    audit_file: Path = Field(
        default=Path("/var/lib/madoguchi-dashboard/audit.jsonl"),
        description="Append-only JSONL log of every command: who, station, what, when, result.",
    )
    remote_photo: bool = Field(
        default=False,
        description="Offer capture_photo as a remote command (the station must also opt in "
        "with [agent] remote_photo).",
    )
    stuck_after_s: float = Field(default=120.0, gt=0, description="Seconds: outbox stuck.")
    gap_timeout_s: float = Field(default=300.0, gt=0, description="Seconds: seq gap alert.")
    log_level: Literal["DEBUG", "INFO", "WARNING"] = Field(
        default="INFO", description="Log level on stderr."
    )

    @model_validator(mode="after")
    def _some_authentication(self) -> Self:
        if self.token_file is None and self.trusted_header is None:
            raise ValueError("set token_file or trusted_header: the dashboard needs a login")
        if self.database_dsn is not None:
            check_dsn(self.database_dsn, self.database_password_file, "database_password_file")
        return self


class StationStatusSection(_Identity):
    """The station states the registry derives and publishes (issue #19, docs/CONTRACT.md)."""

    interval_s: float = Field(
        default=10.0,
        ge=1,
        le=3600,
        description="Seconds between `{prefix}/_registry/{consumer}/stations` messages "
        "(retained; online / offline / unreachable per station).",
    )


class MqttLogin(TypedDict):
    """How one role logs in to the broker: the keyword arguments of the MQTT clients."""

    tls_context: ssl.SSLContext | None
    username: str | None
    password: str | None


class CentralConfig(_Strict):
    """central.toml as a whole."""

    broker: BrokerSection = Field(description="The fleet broker.")
    database: DatabaseSection | None = Field(
        default=None, description="The registry database (the dashboard reads it, optional)."
    )
    registry: RegistrySection | None = Field(default=None, description="The registry consumer.")
    dashboard: DashboardSection | None = Field(default=None, description="The fleet dashboard.")
    station_status: StationStatusSection | None = Field(
        default=None,
        description="The registry's derived station status; off without this section.",
    )
    amqp: AmqpSection | None = Field(
        default=None, description="The RabbitMQ cluster's AMQP side (registry on amqp)."
    )
    source: Path = Field(default=Path("central.toml"), description="The file this came from.")

    @model_validator(mode="after")
    def _transport(self) -> Self:
        reg = self.registry
        if reg is None or reg.transport != "amqp":
            return self
        if self.amqp is None:
            raise ValueError("registry.transport = 'amqp' needs an [amqp] section")
        if reg.dataset_key is not None:
            raise ValueError("registry.dataset_key needs transport = 'mqtt'")
        return self

    def amqp_urls(self) -> list[str]:
        """The [amqp] URLs with the password from its file."""
        if self.amqp is None:
            raise ConfigError([f"{self.source}: amqp: missing"])
        pf = self.amqp.password_file
        if pf is None:
            return self.amqp.urls
        password = _first_line(self.source, "amqp.password_file", pf)
        return [dsn_with_password(u, password) for u in self.amqp.urls]

    def identity(self, role: Role) -> _Identity:
        section = getattr(self, role)
        if section is None:
            raise ConfigError([f"{self.source}: {role}: missing"])
        assert isinstance(section, _Identity)
        return section

    def tls_context(self, role: Role) -> ssl.SSLContext | None:
        """The broker TLS context for `role`: the fleet CA and its certificate."""
        ident = self.identity(role)
        ca = self.broker.tls_ca
        if ca is None:
            if ident.tls_cert is not None:
                raise ConfigError([f"{self.source}: {role}.tls_cert: needs broker.tls_ca"])
            return None
        try:
            ctx = ssl.create_default_context(cafile=str(ca))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError([f"{self.source}: broker.tls_ca: {ca}: cannot load: {e}"]) from None
        if ident.tls_cert is not None and ident.tls_key is not None:
            try:
                ctx.load_cert_chain(str(ident.tls_cert), str(ident.tls_key))
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(
                    [f"{self.source}: {role}.tls_cert: {ident.tls_cert}: cannot load: {e}"]
                ) from None
        return ctx

    def mqtt_login(self, role: Role) -> MqttLogin:
        """`tls_context`, `username` and `password` of `role` for an MQTT client, all None
        where central.toml has no section for it (an anonymous client)."""
        if getattr(self, role) is None:
            return MqttLogin(tls_context=None, username=None, password=None)
        return MqttLogin(
            tls_context=self.tls_context(role),
            username=self.identity(role).username,
            password=self.mqtt_password(role),
        )

    def mqtt_password(self, role: Role) -> str | None:
        pf = self.identity(role).password_file
        return None if pf is None else _first_line(self.source, f"{role}.password_file", pf)

    def database_target(self, role: Role) -> str | Path | None:
        """What `open_store` takes: the DSN with the password from its file, or a Path."""
        if role == "dashboard":
            d = self.dashboard
            if d is None or d.database_dsn is None:
                return None
            dsn, pf, key = (
                d.database_dsn,
                d.database_password_file,
                "dashboard.database_password_file",
            )
        else:
            if self.database is None:
                raise ConfigError([f"{self.source}: database: missing"])
            dsn, pf, key = self.database.dsn, self.database.password_file, "database.password_file"
        if not is_postgres(dsn):
            p = Path(dsn)
            return p if p.is_absolute() else self.source.parent / p
        if pf is None:
            return dsn
        return dsn_with_password(dsn, _first_line(self.source, key, pf))


def dsn_with_password(dsn: str, password: str) -> str:
    parts = urlsplit(dsn)
    user = quote(unquote(parts.username or ""), safe="")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def is_postgres(dsn: str) -> bool:
    return dsn.startswith(("postgresql://", "postgres://"))


def is_central_file(raw: dict[str, Any]) -> bool:
    """A central.toml has [broker] and no station [agent] section."""
    return "broker" in raw and "agent" not in raw


def _first_line(source: Path, key: str, path: Path) -> str:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ConfigError([f"{source}: {key}: {path}: {e.strerror}"]) from None
    value = lines[0].strip() if lines else ""
    if not value:
        raise ConfigError([f"{source}: {key}: {path}: empty"])
    return value


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(file)"


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"{path}: (file): not found"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: (file): {e.strerror}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: (file): not valid TOML: {e}"]) from None


FILE_KEYS = (
    ("broker", "tls_ca"),
    ("database", "password_file"),
    ("registry", "tls_cert"),
    ("registry", "tls_key"),
    ("registry", "password_file"),
    ("dashboard", "tls_cert"),
    ("dashboard", "tls_key"),
    ("dashboard", "password_file"),
    ("dashboard", "database_password_file"),
    ("dashboard", "token_file"),
    ("station_status", "tls_cert"),
    ("station_status", "tls_key"),
    ("station_status", "password_file"),
    ("amqp", "password_file"),
)


def load_central_config(path: str | Path, need: Role | None = None) -> CentralConfig:
    """Read and validate central.toml; `need` ("registry"/"dashboard") requires its section.

    Relative paths are relative to the file. Raises `ConfigError` listing every problem.
    """
    path = Path(path)
    return validate_central(read_toml(path), path, need)


def validate_central(raw: dict[str, Any], path: Path, need: Role | None = None) -> CentralConfig:
    """`load_central_config` for a dict already read (the CLI's quick-path flags too)."""
    file = str(path)
    try:
        config = CentralConfig.model_validate({**raw, "source": path})
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(err["loc"])
            reason = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                reason = "unknown key"
            elif err["type"] == "missing":
                reason = "required"
            problems.append(f"{file}: {_loc(loc)}: {reason}")
        raise ConfigError(problems) from None
    updates: dict[str, Any] = {}
    problems = []
    for section, key in FILE_KEYS:
        sec = getattr(config, section)
        value = None if sec is None else getattr(sec, key)
        if value is None:
            continue
        full = value if value.is_absolute() else path.parent / value
        # /run/credentials/<unit>/... exists only inside that unit: checked when it runs
        # (need == its section), not by check-config on the host
        owner = "registry" if section in ("database", "station_status", "amqp") else section
        later = full.is_relative_to(CREDENTIALS_DIR) and owner not in (need, "broker")
        if not later and not full.is_file():
            problems.append(f"{file}: {section}.{key}: {full}: no such file")
        updates.setdefault(section, {})[key] = full
    if need is not None and getattr(config, need) is None:
        problems.append(f"{file}: {need}: missing (madoguchi {need} needs this section)")
    if need == "registry" and config.database is None:
        problems.append(f"{file}: database: missing (the registry stores records there)")
    if problems:
        raise ConfigError(problems)
    for section, values in updates.items():
        sec = getattr(config, section)
        config = config.model_copy(update={section: sec.model_copy(update=values)})
    if config.dashboard is not None and not config.dashboard.audit_file.is_absolute():
        d = config.dashboard
        audit = path.parent / d.audit_file
        config = config.model_copy(update={"dashboard": d.model_copy(update={"audit_file": audit})})
    return config


def reference_markdown() -> str:
    """The central.toml part of docs/configuration.md, written from the models."""
    sections: list[tuple[str, type[BaseModel], str]] = [
        (
            "[broker]",
            BrokerSection,
            "The fleet broker both processes reach (TLS with the fleet CA).",
        ),
        ("[database]", DatabaseSection, "The registry database; its password from a file."),
        (
            "[registry]",
            RegistrySection,
            "`madoguchi registry --config`: its identity (certificate CN `registry`) and "
            "its consumer settings.",
        ),
        (
            "[amqp]",
            AmqpSection,
            'The RabbitMQ cluster, for `[registry] transport = "amqp"` (docs/cluster.md).',
        ),
        (
            "[dashboard]",
            DashboardSection,
            "`madoguchi dashboard --config`: its identity (CN `dashboard`), its read-only "
            "database access, the page's login, Host/Origin checks and command audit.",
        ),
        (
            "[station_status]",
            StationStatusSection,
            "Optional: `madoguchi registry --config` also publishes the station states it "
            "derives, over a connection of its own (certificate CN `registry-status`: the "
            "shipped broker makes the CN the client id, so it cannot share the registry's).",
        ),
    ]
    out = [
        "# central.toml (registry and dashboard)",
        "",
        "Generated by `reference_markdown()` in `agent/central/config.py`. "
        "`madoguchi registry --config central.toml` and `madoguchi dashboard --config "
        "central.toml` read it; `madoguchi check-config central.toml` validates it (every "
        "problem as `file: key: reason`, files it names checked to exist). Relative paths "
        "are relative to the file. Walk-through: docs/central.md.",
    ]
    for title, model, blurb in sections:
        out += ["", f"## {title}", "", blurb, "", "| key | type | default | meaning |"]
        out.append("|---|---|---|---|")
        for key, field in model.model_fields.items():
            out.append(field_row(key, field))
    return "\n".join(out) + "\n"
