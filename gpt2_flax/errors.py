"""The package's error types. Every one is a user-facing problem with its fix in the message: the
CLI prints it on one line and exits 2, without a traceback. Anything else is a bug and keeps its
traceback. This module imports nothing heavy, so the CLI can catch these before JAX is loaded.

    GPT2FlaxError
    |-- ConfigError       a config value, argument or option combination that cannot work
    |-- DataError         input that cannot be read as asked (bad CSV/JSONL rows, binary files,
    |                     truncated weights or config files)
    |-- ExportError       an export folder that holds another model (never overwritten unasked)
    `-- TrainingError     training cannot go on (NaN loss ...)
        `-- CheckpointError  the output folder cannot hold this run (locked, full, another run's)
"""

from __future__ import annotations


class GPT2FlaxError(Exception):
    """A problem the user can fix; the message says how."""


class ConfigError(GPT2FlaxError, ValueError):
    """A config value, argument or combination of them that cannot work."""


class DataError(GPT2FlaxError, ValueError):
    """Input that cannot be read as asked: the message names the file, the line and the fix."""


class ExportError(GPT2FlaxError, FileExistsError):
    """An export folder holding another model: its config, tokenizer or weights are not ours."""


class TrainingError(GPT2FlaxError, RuntimeError):
    """Training cannot go on (NaN loss, an output location that cannot hold the run...)."""


class CheckpointError(TrainingError):
    """The output location cannot hold this run (not writable, full, locked, another run's)."""
