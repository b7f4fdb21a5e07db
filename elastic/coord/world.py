"""The World: one generation's members in rank order."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class WorldMember:
    id: str
    address: str = ""
    store: str = ""  # host:port of the store this member hosts
    # "worker" computes gradients; "server" (--servers) only holds shards of
    # the optimizer state (elastic/train/sharded.py) and computes nothing.
    role: str = "worker"


@dataclass(frozen=True)
class World:
    """Generation-numbered membership; rank = index in ``members``.

    Two Worlds with the same generation never exist: the record is written by a
    compare-and-swap on the generation key.
    """

    job: str
    generation: int
    members: tuple[WorldMember, ...]
    formed_at: float = 0.0

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def servers(self) -> list[int]:
        """Ranks of the members that hold state and compute nothing."""
        return [r for r, m in enumerate(self.members) if m.role == "server"]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(m.id for m in self.members)

    def rank_of(self, member_id: str) -> int | None:
        for rank, m in enumerate(self.members):
            if m.id == member_id:
                return rank
        return None

    @property
    def store_prefix(self) -> str:
        """Key prefix of this generation's torch.distributed store."""
        return f"{self.job}/g{self.generation}/"

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "job": self.job,
                "generation": self.generation,
                "formed_at": self.formed_at,
                "members": [
                    {"id": m.id, "address": m.address, "store": m.store, "role": m.role}
                    for m in self.members
                ],
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> World:
        d = json.loads(raw)
        return cls(
            job=d["job"],
            generation=int(d["generation"]),
            formed_at=float(d.get("formed_at", 0.0)),
            members=tuple(
                WorldMember(
                    m["id"], m.get("address", ""), m.get("store", ""), m.get("role", "worker")
                )
                for m in d["members"]
            ),
        )
