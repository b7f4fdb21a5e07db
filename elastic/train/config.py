"""A worker's settings: one frozen value composed of the etcd, rendezvous and hang configs.

``elastic run`` hands the whole value to each worker as one JSON document in
``ELASTIC_CONFIG`` (:meth:`RuntimeConfig.to_env`); a worker reads it back with
:meth:`RuntimeConfig.from_env`. Explicit arguments beat the environment:
``Trainer(config=RuntimeConfig(...))`` ignores it, and ``from_env(**overrides)``
replaces the fields it names. Every default is written once, on the dataclass
that owns it; the launcher's flags read them from there (:func:`default_of`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

from ..base.errors import ConfigError
from ..coord.etcd import EtcdConfig
from ..coord.hangs import HangConfig
from ..coord.keys import Keyspace, validate_name
from ..coord.rendezvous import RendezvousConfig

CONFIG_ENV = "ELASTIC_CONFIG"

_NESTED = {"etcd": EtcdConfig, "rendezvous": RendezvousConfig, "hangs": HangConfig}


@dataclass(frozen=True)
class RuntimeConfig:
    job: str
    member_id: str
    # A URL (``http://host:2379[,...]``) is accepted and parsed.
    etcd: EtcdConfig
    rendezvous: RendezvousConfig = field(default_factory=RendezvousConfig)
    # Hang detection (elastic/coord/hangs.py): a rank that has not reached a
    # step's all-reduce max(floor, factor x median step time) after its peers
    # is evicted.
    hangs: HangConfig = field(default_factory=HangConfig)
    collective_timeout: float = 30.0
    join_timeout: float = 600.0
    # How long a worker whose session is gone keeps trying to register again
    # while etcd is out of reach: a partition may heal, an etcd that stopped
    # for good (its job finished) must not hold the worker for join_timeout.
    etcd_outage: float = 120.0
    checkpoint: str | None = None
    checkpoint_every: int = 0  # steps; 0 = only the final checkpoint
    checkpoint_timeout: float = 120.0
    checkpoint_key_file: str | None = None
    resume: bool = False
    # A joiner receives the state while the World trains its next step
    # (livesync.py); False: the World waits for the transfer (the old way,
    # kept to measure the difference).
    live_join: bool = True
    # Sharded optimizer state (sharded.py): each shard on `replicas` owners.
    shard_state: bool = False
    replicas: int = 2
    shards: int = 16
    role: str = "worker"  # or "server": holds shards, computes nothing (--servers)
    event_log: str | None = None
    ledger_dir: str | None = None
    advertise_host: str = "127.0.0.1"
    etcd_prefix: str = Keyspace.prefix

    def __post_init__(self) -> None:
        if isinstance(self.etcd, str):
            object.__setattr__(self, "etcd", EtcdConfig.from_url(self.etcd))
        for name, kind in _NESTED.items():
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(
                    f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}"
                )
        validate_name("job id", self.job)
        validate_name("member id", self.member_id)
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        for name in ("collective_timeout", "join_timeout", "etcd_outage", "checkpoint_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.replicas < 1:
            raise ConfigError(f"replicas must be >= 1, got {self.replicas}")
        if self.role not in ("worker", "server"):
            raise ConfigError(f"role must be 'worker' or 'server', got {self.role!r}")
        if self.role == "server" and not self.shard_state:
            raise ConfigError("a server holds shards of the optimizer state: it needs shard_state")
        if not 1 <= self.shards <= 62:
            raise ConfigError(f"shards must be 1..62, got {self.shards}")
        if self.resume and not self.checkpoint:
            raise ConfigError("resume needs a checkpoint location")

    # -- the one value a worker receives ---------------------------------------

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RuntimeConfig:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{CONFIG_ENV} is not JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{CONFIG_ENV} must be a JSON object")
        return cls(**_typed(cls, raw, CONFIG_ENV))

    def to_env(self) -> dict[str, str]:
        return {CONFIG_ENV: self.to_json()}

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> RuntimeConfig:
        env = os.environ if env is None else env
        text = env.get(CONFIG_ENV)
        if not text:
            raise ConfigError(
                f"not started by `elastic run`: {CONFIG_ENV} is not set; start the script "
                "with `elastic run -n N SCRIPT` (or pass Trainer(config=RuntimeConfig(...)))"
            )
        config = cls.from_json(text)
        explicit = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(config, **explicit) if explicit else config


def _typed(cls: type, raw: dict[str, Any], where: str) -> dict[str, Any]:
    """The fields of ``cls`` from a decoded JSON object: nested configs rebuilt,
    lists back to tuples, unknown names refused (a launcher of another version)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for name, value in raw.items():
        kind = _NESTED.get(name) if cls is RuntimeConfig else None
        if kind is EtcdConfig and isinstance(value, str):
            pass  # a URL, parsed by RuntimeConfig as when given in code
        elif kind is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {name} must be an object")
            value = kind(**_typed(kind, value, f"{where}.{name}"))
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        out[name] = value
    return out


def default_of(cls: type, name: str) -> Any:
    """The default of a config field, for a command-line flag that sets it."""
    for f in fields(cls):
        if f.name == name:
            if f.default is dataclasses.MISSING:
                raise KeyError(f"{cls.__name__}.{name} has no default")
            return f.default
    raise KeyError(f"{cls.__name__} has no field {name}")
