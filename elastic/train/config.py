"""Runtime settings of a worker, passed by the launcher through the environment.

Explicit arguments to :class:`RuntimeConfig` beat the environment; the
environment is only how ``elastic run`` hands settings to an unmodified
training script.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from ..base.errors import ConfigError
from ..coord.keys import validate_name

ENV_PREFIX = "ELASTIC_"


@dataclass(frozen=True)
class RuntimeConfig:
    job: str
    etcd: str
    member_id: str
    min_workers: int = 1
    max_workers: int = 1 << 16
    initial_workers: int = 0
    lease_ttl: float = 5.0
    settle_s: float = 0.3
    last_call_s: float = 60.0
    collective_timeout: float = 30.0
    # Hang detection (elastic/coord/hangs.py): a rank that has not reached a step's
    # all-reduce max(hang_floor, hang_factor x median step time) after its
    # peers is evicted.
    hang_floor: float = 5.0
    hang_factor: float = 10.0
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
    event_log: str | None = None
    ledger_dir: str | None = None
    advertise_host: str = "127.0.0.1"
    etcd_prefix: str = "/elastic"
    etcd_user: str | None = None
    etcd_password: str | None = None
    etcd_ca: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None
    etcd_timeout: float = 10.0

    def __post_init__(self) -> None:
        validate_name("job id", self.job)
        validate_name("member id", self.member_id)
        if self.min_workers < 1:
            raise ConfigError(f"min_workers must be >= 1, got {self.min_workers}")
        if self.max_workers < self.min_workers:
            raise ConfigError(
                f"max_workers ({self.max_workers}) must be >= min_workers ({self.min_workers})"
            )
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        for name in ("lease_ttl", "collective_timeout", "join_timeout", "etcd_outage",
                     "checkpoint_timeout", "etcd_timeout", "hang_floor"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.hang_factor < 1:
            raise ConfigError(f"hang_factor must be >= 1, got {self.hang_factor}")
        if self.resume and not self.checkpoint:
            raise ConfigError("resume needs a checkpoint location")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> RuntimeConfig:
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            try:
                if kind.startswith("int"):
                    values[f.name] = int(raw)
                elif kind.startswith("float"):
                    values[f.name] = float(raw)
                elif kind.startswith("bool"):
                    values[f.name] = raw.lower() in ("1", "true", "yes")
                else:
                    values[f.name] = raw
            except ValueError as exc:
                raise ConfigError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a {kind}") from exc
        values.update({k: v for k, v in overrides.items() if v is not None})
        missing = [n for n in ("job", "etcd", "member_id") if n not in values]
        if missing:
            raise ConfigError(
                "not started by `elastic run`: missing "
                + ", ".join(ENV_PREFIX + m.upper() for m in missing)
                + "; start the script with `elastic run -n N SCRIPT` "
                "(or pass Trainer(config=RuntimeConfig(...)))"
            )
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[ENV_PREFIX + f.name.upper()] = (
                ("1" if value else "0") if isinstance(value, bool) else str(value)
            )
        return out
