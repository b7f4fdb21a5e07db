"""Tests of the elastic runtime foundation: etcd, membership, rendezvous, status, CLI."""
