"""The long-running service: lock, recover, scan the policy folder, run jobs, publish versions.

One job at a time, each a compare-and-set state machine (pending → scoring → editing → done, or
failed/discarded). Every version is computed from the immutable inputs and the *whole* current
claim assignment (``continual.assign_claims``), so applying, replacing and rolling back are the
same operation on a different revision order. The order of side effects makes crashes harmless:

1. the version folder is written under a staging name and renamed into place (complete or absent);
2. one registry transaction records claims, statuses, the version and "job done" together;
3. the ``current`` link is swapped.

On restart: staging leftovers are deleted, version folders the registry does not know are removed,
unfinished jobs go back to pending (their work is deterministic, so re-running is safe), and the
``current`` link is made to agree with the registry. Then ``current`` is checked against its sha256
manifest, and a damaged file is rebuilt bit-identically before anything is built on it.

The daemon is split by responsibility, one class per module of this package: ``lifecycle`` (lock,
start-up, loop, outages), ``resources`` (models, localiser, band), ``recovery``, ``scanner``
(policy folder → revisions and jobs), ``jobs`` (apply and rollback), ``publisher`` (claims →
version → current). ``Daemon`` combines them over the shared ``DaemonState``.
"""

from fgsn_daemon.engine.io.checkpoint import folder_fingerprint
from fgsn_daemon.service.daemon.jobs import JobRunner
from fgsn_daemon.service.daemon.lifecycle import Lifecycle
from fgsn_daemon.service.daemon.publisher import Publisher
from fgsn_daemon.service.daemon.recovery import Recovery
from fgsn_daemon.service.daemon.resources import LineageResources
from fgsn_daemon.service.daemon.scanner import Scanner
from fgsn_daemon.service.daemon.state import (
    LINEAGE_MARKER,
    LOCK_NAME,
    WAITING_FOR_SPACE,
    DaemonLockedError,
    DaemonState,
    StateMismatchError,
    StopRequested,
    VersionCorruptedError,
    engine_params,
    load_policy,
    newest_mtime,
    raw_fingerprint,
    skip_frozen,
)


class Daemon(Lifecycle, Recovery, Scanner, JobRunner, Publisher, LineageResources):
    """The long-running service (see the package docstring)."""


__all__ = [
    "LINEAGE_MARKER",
    "LOCK_NAME",
    "WAITING_FOR_SPACE",
    "Daemon",
    "DaemonLockedError",
    "DaemonState",
    "StateMismatchError",
    "StopRequested",
    "VersionCorruptedError",
    "engine_params",
    "folder_fingerprint",
    "load_policy",
    "newest_mtime",
    "raw_fingerprint",
    "skip_frozen",
]
