"""Roles, and the one table of which role may call which gRPC method.

A daemon that runs with role tokens (`--token-dir`, see security.py) learns the caller's role
from its bearer token and lets the call through only when that role is in the method's row
below; otherwise PERMISSION_DENIED naming the role and the method. With one shared token
(`--token-file`, `SHARDPS_TOKEN`) that token holds every role, as before roles existed.

The roles:

- worker: trains. Joins, heartbeats and leaves; declares its model; takes data partitions;
  pulls and pushes (dense and embedding rows). Reads the job and the status (the shard map,
  the start gate of `--min-workers`).
- server: one shard. Registers (and so receives the job key), heartbeats, leaves, follows the
  membership watch, reads the job and the status (whether a successor took its shard over).
  Servers never call each other.
- observer: reads what operators watch: `psctl status` and `psctl inspect` (Status, GetJob,
  ShardStatus, Inspect). Not the model's values: pulls and ScanRows are export's (admin).
- admin: everything: checkpoint, export (pull and scan every shard), and any method a row
  does not name. Draining is a signal to the process (SIGTERM), not an RPC.

Every method of every service in the generated stubs has a row; a unit test
(tests/security/test_roles.py) walks the descriptors, so a new RPC fails it until it is given
one. A method with no row is admin's alone.
"""
from __future__ import annotations

import types
from typing import Iterable, Mapping

from shardps.pscommon.wire.v1 import ps_pb2, scheduler_pb2

WORKER = "worker"
SERVER = "server"
OBSERVER = "observer"
ADMIN = "admin"
ROLES = (WORKER, SERVER, OBSERVER, ADMIN)

_SCHEDULER = f"/{scheduler_pb2.DESCRIPTOR.services_by_name['Scheduler'].full_name}/"
_PS = f"/{ps_pb2.DESCRIPTOR.services_by_name['ParameterServer'].full_name}/"


def _allow(*roles: str) -> frozenset[str]:
    """A row: these roles, and admin, who may call everything."""
    return frozenset(roles) | {ADMIN}


# full gRPC method name -> the roles whose token may call it
METHOD_ROLES: Mapping[str, frozenset[str]] = types.MappingProxyType({
    # -- the scheduler
    _SCHEDULER + "RegisterServer": _allow(SERVER),          # its reply carries the job key
    _SCHEDULER + "JoinWorker": _allow(WORKER),
    _SCHEDULER + "Heartbeat": _allow(WORKER, SERVER),        # the member credential names which
    _SCHEDULER + "Leave": _allow(WORKER, SERVER),
    _SCHEDULER + "GetJob": _allow(WORKER, SERVER, OBSERVER),
    _SCHEDULER + "DeclareModel": _allow(WORKER),
    _SCHEDULER + "WatchMembership": _allow(SERVER),          # a stream held open: servers only
    _SCHEDULER + "Status": _allow(WORKER, SERVER, OBSERVER),  # workers: --min-workers; servers: successor
    _SCHEDULER + "AcquirePartition": _allow(WORKER),
    _SCHEDULER + "CompletePartition": _allow(WORKER),
    # -- a parameter server
    _PS + "Declare": _allow(WORKER),
    _PS + "Pull": _allow(WORKER),
    _PS + "Push": _allow(WORKER),
    _PS + "PullBatch": _allow(WORKER),
    _PS + "PushBatch": _allow(WORKER),
    _PS + "PushPullBatch": _allow(WORKER),                   # a push and the next step's pull in one call
    _PS + "PullRows": _allow(WORKER),
    _PS + "PullRowsBatch": _allow(WORKER),
    _PS + "SettleStep": _allow(WORKER),                      # sync: a worker's step settled at shard 0
    _PS + "Inspect": _allow(OBSERVER),
    _PS + "ShardStatus": _allow(OBSERVER),
    _PS + "Checkpoint": _allow(),                            # psctl checkpoint
    _PS + "ScanRows": _allow(),                              # psctl export: every row of a table
})

_ADMIN_ONLY = _allow()


def allowed_roles(method: str) -> frozenset[str]:
    """The roles that may call `method` (a full name, "/package.Service/Method"); a method the
    table does not name is admin's alone."""
    return METHOD_ROLES.get(method, _ADMIN_ONLY)


def may_call(roles: Iterable[str], method: str) -> bool:
    """True when any of `roles` may call `method`."""
    return not allowed_roles(method).isdisjoint(roles)


def service_methods(modules: Iterable[types.ModuleType]) -> list[str]:
    """Every method's full name of every service the generated `*_pb2` modules define."""
    return [f"/{service.full_name}/{method.name}"
            for module in modules
            for service in module.DESCRIPTOR.services_by_name.values()
            for method in service.methods]


def methods_of(role: str) -> list[str]:
    """The methods `role` may call, in table order (for docs and errors)."""
    return [m for m, roles in METHOD_ROLES.items() if role in roles]


__all__ = ["ADMIN", "METHOD_ROLES", "OBSERVER", "ROLES", "SERVER", "WORKER", "allowed_roles", "may_call",
           "methods_of", "service_methods"]
