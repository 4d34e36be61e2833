"""What a run reports about failures: the one-line message of an expected error
(:func:`expected_error_message`) and the reason of each NaN or inf metric
(:func:`explain_nonfinite`)."""

from __future__ import annotations

from fpcd.errors import ExpectedError
from fpcd.io import DiskFullError, disk_full_path, is_disk_full, nonfinite_entries

NONFINITE_REASON = ("it could not be computed from the samples (e.g. generated values are non-finite, or too few "
                    "are finite)")


def explain_nonfinite(metrics: dict) -> dict:
    """Replace ``metrics["nonfinite"]`` (the evaluators' reasons: ``{dotted path or prefix: reason}``)
    by the table of every NaN or inf value in ``metrics``: ``{dotted path: "nan, written as null:
    <reason>"}``, the reason of the longest given prefix of the path or a generic one; dropped when
    every value is finite. Returns ``metrics`` (changed in place); :func:`fpcd.io.write_json` writes
    the values themselves as ``null``."""
    given = metrics.pop("nonfinite", None) or {}
    table = {}
    for path, value in nonfinite_entries(metrics).items():
        parts = path.split(".")
        prefixes = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
        reason = next((given[p] for p in prefixes if p in given), NONFINITE_REASON)
        table[path] = f"{value}, written as null: {reason}"
    if table:
        metrics["nonfinite"] = table
    return metrics


def expected_error_message(err: BaseException, workdir: str | None = None) -> str | None:
    """The one-line message of an expected failure, or None for any other exception (a bug, whose
    traceback should show).

    Expected: every :class:`fpcd.errors.ExpectedError` (a bad config, unusable data, a refused or
    busy workdir, a checkpoint of another model or with no readable step, a non-finite loss), and
    a full disk: any error caused by ``ENOSPC``, whose message says "no space left on device" and
    names the path, or ``workdir`` when the error names none.
    """
    if is_disk_full(err):
        full = err if isinstance(err, DiskFullError) else None
        cause = err
        while full is None and cause is not None:  # a DiskFullError further down the chain names the file
            cause = cause.__cause__ or cause.__context__
            full = cause if isinstance(cause, DiskFullError) else None
        message = str(full) if full is not None else \
            f"no space left on device writing {disk_full_path(err) or workdir or 'the output'}: free some space and " \
            "run again (files written before are intact)"
    elif isinstance(err, ExpectedError):
        message = str(err)
    else:
        return None
    return " ".join(line.strip() for line in message.splitlines() if line.strip())
