"""Validation of settings and records: every bad value is refused with a message naming it."""

from __future__ import annotations

import pytest

from elastic.base.errors import ConfigError
from elastic.coord.etcd import EtcdConfig
from elastic.coord.keys import Keyspace
from elastic.coord.membership import Member
from elastic.coord.rendezvous import RendezvousConfig
from elastic.coord.world import World, WorldMember


def test_min_workers_above_max_workers_is_refused_naming_both() -> None:
    with pytest.raises(ConfigError) as err:
        RendezvousConfig(min_workers=4, max_workers=2)
    assert "max_workers (2)" in str(err.value) and "min_workers (4)" in str(err.value)


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"min_workers": 0}, "min_workers"),
        ({"settle_s": -1.0}, "settle_s"),
        ({"lease_ttl": 0.5}, "lease_ttl"),
        ({"op_timeout": 0}, "op_timeout"),
    ],
)
def test_bad_rendezvous_settings_are_refused(kwargs: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        RendezvousConfig(**kwargs)


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("localhost:2379", "malformed URL"),
        ("ftp://localhost:2379", "unsupported scheme"),
        ("http://localhost", "malformed endpoint"),
        ("http://localhost:99999", "invalid endpoint"),
        ("http://a:1,,b:2", "malformed endpoint"),
        ("http://a:2379,https://b:2379", "mixes http and https"),
        ("a:2379,http://b:2379", "malformed URL"),
        ("http://a:2379,ftp://b:2379", "unsupported scheme 'ftp'"),
        ("http://::1:2379", "malformed endpoint"),
        ("http://a:2379,http://", "malformed endpoint"),
    ],
)
def test_malformed_etcd_urls_are_refused(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as err:
        EtcdConfig.from_url(url)
    assert "etcd" in str(err.value)


def test_etcd_url_with_several_endpoints_and_ipv6_parses() -> None:
    cfg = EtcdConfig.from_url("https://a.example:2379,[::1]:2380/")
    assert cfg.endpoints == (("a.example", 2379), ("::1", 2380))
    assert cfg.secure and cfg.url == "https://a.example:2379,https://[::1]:2380"


@pytest.mark.parametrize("job", ["", "has/slash", "-leading-dash", "x" * 64, "sp ace"])
def test_invalid_job_ids_are_refused(job: str) -> None:
    with pytest.raises(ConfigError, match="invalid job id"):
        Keyspace(job)


def test_invalid_member_id_is_refused() -> None:
    with pytest.raises(ConfigError, match="invalid member id"):
        Member("a/b")


def test_keyspace_puts_every_key_under_the_job_root() -> None:
    keys = Keyspace("job-1", prefix="/x/y")
    assert keys.root == "/x/y/job-1/"
    for key in (
        keys.member("m"),
        keys.ready_of("m"),
        keys.gen,
        keys.world,
        keys.round,
        keys.leader,
        keys.commit(3),
    ):
        assert key.startswith(keys.root)
    assert keys.commit(3) < keys.commit(10)  # zero-padded: lexical order is step order
    with pytest.raises(ConfigError, match="prefix"):
        Keyspace("job", prefix="no-slash")


def test_world_round_trips_through_json_with_ranks_in_order() -> None:
    world = World("j", 3, (WorldMember("b", "h:1", "h:2"), WorldMember("a")), 12.5)
    back = World.from_json(world.to_json())
    assert back == world
    assert [back.rank_of(m) for m in ("b", "a", "zz")] == [0, 1, None]
    assert back.store_prefix == "j/g3/"


# -- the worker's one value ---------------------------------------------------


def _runtime_config(**kw):
    from elastic.coord.hangs import HangConfig
    from elastic.train.config import RuntimeConfig

    base = dict(
        job="j1",
        member_id="m-0",
        etcd="http://10.0.0.1:2379,http://[::1]:2380",
        rendezvous=RendezvousConfig(min_workers=2, max_workers=4, lease_ttl=3.0),
        hangs=HangConfig(floor_s=7.0, factor=12.0),
        checkpoint="file:///tmp/c",
        checkpoint_every=5,
    )
    base.update(kw)
    return RuntimeConfig(**base)


def test_runtime_config_travels_as_one_value_and_comes_back_equal() -> None:
    from elastic.train.config import CONFIG_ENV, RuntimeConfig

    cfg = _runtime_config()
    env = cfg.to_env()
    assert list(env) == [CONFIG_ENV]
    back = RuntimeConfig.from_env(env)
    assert back == cfg
    assert back.etcd.endpoints == (("10.0.0.1", 2379), ("::1", 2380))
    assert back.rendezvous.lease_ttl == 3.0 and back.hangs.factor == 12.0


def test_explicit_overrides_beat_the_environment() -> None:
    from elastic.train.config import RuntimeConfig

    env = _runtime_config().to_env()
    assert RuntimeConfig.from_env(env, member_id="other-1").member_id == "other-1"
    assert RuntimeConfig.from_env(env, member_id=None).member_id == "m-0"


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({}, "not started by `elastic run`"),
        ({"ELASTIC_CONFIG": "{not json"}, "is not JSON"),
        ({"ELASTIC_CONFIG": "[1]"}, "must be a JSON object"),
        (
            {"ELASTIC_CONFIG": '{"job": "j", "member_id": "m", "etcd": "http://a:1", "bogus": 1}'},
            "unknown setting(s) bogus",
        ),
        (
            {
                "ELASTIC_CONFIG": '{"job": "j", "member_id": "m", "etcd": "http://a:1", '
                '"rendezvous": {"lease_ttl": 0.1}}'
            },
            "lease_ttl must be >= 1",
        ),
    ],
)
def test_a_bad_or_missing_config_is_refused_naming_the_problem(env, fragment) -> None:
    from elastic.train.config import RuntimeConfig

    with pytest.raises(ConfigError) as err:
        RuntimeConfig.from_env(env)
    assert fragment in str(err.value)


def test_the_launchers_flags_default_to_the_configs_own_defaults() -> None:
    import inspect

    from elastic.cli import build_parser
    from elastic.coord.hangs import HangConfig
    from elastic.coord.membership import Session
    from elastic.train.config import RuntimeConfig

    args = build_parser().parse_args(["run", "train.py"])
    rdzv, hangs, etcd = RendezvousConfig(), HangConfig(), EtcdConfig(endpoints=(("a", 1),))
    cfg = _runtime_config()
    expected = {
        "lease_ttl": rdzv.lease_ttl,
        "settle": rdzv.settle_s,
        "min_workers": rdzv.min_workers,
        "hang_floor": hangs.floor_s,
        "hang_factor": hangs.factor,
        "etcd_timeout": etcd.connect_timeout,
        "etcd_prefix": Keyspace("j").prefix,
        **{
            n: getattr(RuntimeConfig, n)
            for n in ("collective_timeout", "join_timeout", "etcd_outage", "checkpoint_every")
        },
    }
    assert {k: getattr(args, k) for k in expected} == expected
    assert inspect.signature(Session).parameters["ttl"].default == rdzv.lease_ttl
    assert cfg.etcd_prefix == Keyspace("j").prefix
