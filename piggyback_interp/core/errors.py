"""The one error hierarchy: what went wrong, and which exit code the CLI gives it.

Every error the toolkit raises on purpose derives from :class:`PiggybackError` and
carries its CLI exit code. Only these are reported as the user's problem; anything
else is a bug (exit 1, with a request to report it).

=====  =====================================  ==========================================
code   class                                  meaning
=====  =====================================  ==========================================
2      :class:`UserError`                     bad input: an option, config file, dataset,
                                              prompt, or an input longer than the model's
                                              context
3      :class:`ModelError`                    a model that cannot be loaded or is corrupt
4      :class:`DiskError`                     results cannot be written (disk full,
                                              read-only folder)
5      :class:`StaleRunError`                 a run folder holds results of other inputs
=====  =====================================  ==========================================

Example:
    >>> try:
    ...     raise UserError("lr must be > 0, got -1")
    ... except PiggybackError as err:
    ...     err.exit_code
    2
"""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_BUG = 1
EXIT_INPUT = 2
EXIT_MODEL = 3
EXIT_DISK = 4
EXIT_STALE = 5
EXIT_INTERRUPTED = 130


class PiggybackError(Exception):
    """Base of every error the toolkit raises on purpose."""

    exit_code: int = EXIT_BUG


class UserError(PiggybackError, ValueError):
    """Bad input: says what is wrong and how to fix it (exit code 2)."""

    exit_code = EXIT_INPUT


class InputTooLongError(UserError):
    """An input (training row, prompt) longer than the model's context (exit code 2)."""


class ModelError(PiggybackError):
    """A model that cannot be loaded, or whose files are corrupt (exit code 3)."""

    exit_code = EXIT_MODEL


class DiskError(PiggybackError, OSError):
    """Results that cannot be written: disk full, read-only folder (exit code 4)."""

    exit_code = EXIT_DISK


class StaleRunError(PiggybackError):
    """A run folder that holds results of other inputs (exit code 5)."""

    exit_code = EXIT_STALE


def disk_error(err: OSError) -> DiskError | None:
    """The :class:`DiskError` (with the fix) for an ``OSError`` of writing results: a full disk
    or quota, a read-only or forbidden folder; ``None`` for any other ``OSError``."""
    where = err.filename or "the results"
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", None)):
        return DiskError(
            f"out of disk space writing {where}; free some space or use --out on another "
            "disk, then run the same command again to resume"
        )
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return DiskError(
            f"cannot write {where} ({err.strerror or 'not writable'}); make the folder "
            "writable or use --out on a writable disk, then run the same command again"
        )
    return None
