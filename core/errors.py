"""The one base of every user error the harness reports in one line (bad config, study file, data, store,
cluster request, report): the command-line edges (python -m core.trial, studies.run, reports) catch
HarnessError, print its message and exit 2. A trial that fails while it runs (a NaN loss) is not one:
it ends as `failed` in the store."""

from __future__ import annotations


class HarnessError(Exception):
    """A one-line user error: its message names the file, key or value and what was expected."""
