"""Errors of the elastic runtime: one base class, one subclass per failure kind."""

from __future__ import annotations


class ElasticError(Exception):
    """Base of every error raised by the ``elastic`` package."""


class ConfigError(ElasticError, ValueError):
    """A setting or argument is invalid; the message names it and the bad value."""


class EtcdError(ElasticError):
    """etcd could not be started, reached or used."""


class EtcdUnavailableError(EtcdError):
    """etcd did not answer within the stated bound."""


class EtcdRequestError(EtcdError):
    """etcd refused a request for a reason retrying cannot fix (auth, invalid request)."""


class SessionLostError(ElasticError):
    """The member's lease expired or could not be kept alive: its keys are gone."""


class RendezvousError(ElasticError):
    """A World could not be formed."""


class RendezvousTimeoutError(RendezvousError):
    """No World including this member formed within the timeout."""


class ShardLostError(ElasticError):
    """Every copy of a shard of the optimizer state died and there is no
    checkpoint to restore it from: a restarted worker cannot bring it back."""


class WorkerGroupError(ElasticError):
    """A collective or the process group of a generation failed."""


class CollectiveTimeoutError(WorkerGroupError):
    """A collective, or forming the group, ran out its collective timeout: a peer
    stayed silent that long instead of being noticed gone (or hung) sooner."""


class JobEnded(ElasticError):
    """The job finished or was stopped while this member waited; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"job {reason}")
        self.reason = reason
