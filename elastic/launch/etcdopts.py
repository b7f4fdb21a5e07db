"""The etcd options every command that reaches etcd takes, and the EtcdConfig they make.

The launcher and its workers build their etcd client from the same values
(:func:`etcd_config` here, which the worker receives inside its RuntimeConfig) so
the two cannot drift.
"""

from __future__ import annotations

import argparse
import os

from ..base.errors import ConfigError
from ..coord.etcd import EtcdConfig
from ..coord.keys import Keyspace
from ..train.config import default_of
from . import argtypes


def add_etcd_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("etcd")
    g.add_argument(
        "--etcd",
        required=required,
        metavar="URL",
        help="http[s]://host:port[,http[s]://host:port...]",
    )
    g.add_argument("--etcd-user", default=None)
    g.add_argument(
        "--etcd-password",
        default=os.environ.get("ELASTIC_ETCD_PASSWORD"),
        help="default: $ELASTIC_ETCD_PASSWORD",
    )
    g.add_argument("--etcd-ca", default=None, help="CA certificate file (TLS)")
    g.add_argument("--etcd-cert", default=None, help="client certificate file (TLS)")
    g.add_argument("--etcd-key", default=None, help="client key file (TLS)")
    g.add_argument(
        "--etcd-timeout",
        type=argtypes.seconds,
        default=default_of(EtcdConfig, "connect_timeout"),
        metavar="S",
        help="give up reaching etcd after S seconds (default %(default)g)",
    )
    g.add_argument(
        "--etcd-prefix",
        default=default_of(Keyspace, "prefix"),
        help="key prefix (default %(default)s)",
    )


def check_credentials(args: argparse.Namespace) -> None:
    """A password needs a user.  Refused by the launcher, not in every worker: the
    workers inherit $ELASTIC_ETCD_PASSWORD and would each fail to authenticate."""
    if args.etcd_password and not args.etcd_user:
        raise ConfigError(
            "an etcd password is set (--etcd-password or $ELASTIC_ETCD_PASSWORD) "
            "but no --etcd-user: give both, or unset the password"
        )


def etcd_config(args: argparse.Namespace) -> EtcdConfig:
    check_credentials(args)
    return EtcdConfig.from_options(
        args.etcd,
        user=args.etcd_user,
        password=args.etcd_password,
        ca=args.etcd_ca,
        cert=args.etcd_cert,
        key=args.etcd_key,
        timeout=args.etcd_timeout,
    )
