"""The exceptions rrb-streams raises.

Library errors (redis-py, botocore, OSError) are translated into these at the boundary where
they happen, raised ``from`` the original so ``--debug`` can show the cause.

::

    RrbError
    ├── ConfigError              bad input: a flag, URL or variable. Commands exit 2.
    ├── DependencyError          Redis or storage unreachable or refusing us. Commands exit 1.
    │   └── NotificationsRefused CONFIG SET refused; the message names the setting to add.
    ├── StorageError             a storage call failed
    │   ├── ObjectNotFound       get() of a name that does not exist
    │   ├── ObjectExists         put_new() of a name that is taken
    │   ├── StorageUnavailable   transient: connection, timeout, 5xx, throttling. Retry.
    │   └── ObjectRejected       permanent for this one object. Retrying will not help.
    └── CorruptObject            an object failed its checksum, is truncated, or is not ours
"""

from __future__ import annotations


class RrbError(Exception):
    """Base of every error rrb-streams raises on purpose."""


class ConfigError(RrbError):
    """Bad input. The message names the field and the bad value."""


class DependencyError(RrbError):
    """A dependency (Redis, storage) is unreachable, missing, or refuses us."""


class NotificationsRefused(DependencyError):
    """The source refused CONFIG, so keyspace notifications could not be enabled."""


class StorageError(RrbError):
    """A storage call failed."""


class ObjectNotFound(StorageError):
    """The named object does not exist."""


class ObjectExists(StorageError):
    """``put_new`` found the name taken: another writer created it first."""


class StorageUnavailable(StorageError):
    """A transient failure: the same call may succeed later."""


class ObjectRejected(StorageError):
    """Storage refused this object for a reason that retrying will not fix."""


class CorruptObject(RrbError):
    """An object is damaged or not in our format. The message names it."""
