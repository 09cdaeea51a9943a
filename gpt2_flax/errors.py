"""The package's error types. Every one is a user-facing problem with its fix in the message: the
CLI prints it on one line and exits 2, without a traceback. Anything else is a bug and keeps its
traceback. This module imports nothing heavy, so the CLI can catch these before JAX is loaded.

    GPT2FlaxError
    |-- ConfigError       a config value, argument or option combination that cannot work
    |-- DataError         input that cannot be read as asked (bad CSV/JSONL rows, binary files,
    |                     truncated weights or config files)
    |-- ExportError       an export folder that holds another model (never overwritten unasked)
    |-- HubError          the Hugging Face Hub cannot take an upload (offline, no token or access);
    |                     the local export is complete
    `-- TrainingError     training cannot go on (NaN loss ...)
        `-- CheckpointError  the output folder cannot hold this run (locked, full, another run's)
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any


class GPT2FlaxError(Exception):
    """A problem the user can fix; the message says how."""


class ConfigError(GPT2FlaxError, ValueError):
    """A config value, argument or combination of them that cannot work."""


class DataError(GPT2FlaxError, ValueError):
    """Input that cannot be read as asked: the message names the file, the line and the fix."""


class ExportError(GPT2FlaxError, FileExistsError):
    """An export folder holding another model: its config, tokenizer or weights are not ours."""


class HubError(GPT2FlaxError, ConnectionError):
    """An upload to the Hugging Face Hub failed; the local files it would have sent are complete."""


class TrainingError(GPT2FlaxError, RuntimeError):
    """Training cannot go on (NaN loss, an output location that cannot hold the run...)."""


class CheckpointError(TrainingError):
    """The output location cannot hold this run (not writable, full, locked, another run's)."""


# ----------------------------------------------------------------------------- spelling the fix

_CLI: contextvars.ContextVar[bool] = contextvars.ContextVar("gpt2_flax_cli", default=False)


@contextlib.contextmanager
def cli_spelling() -> Iterator[None]:
    """Messages raised inside spell options as the command line does (cli.main sets it)."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


def spell(key: str, value: Any) -> str:
    """Option `key` ("data.text_column", or a CLI flag such as "overwrite") set to `value`, as the
    user writes it in the interface they called: `--data.text_column=body` or `--overwrite` on the
    command line, `text_column='body'` or `overwrite=True` in Python. A value like "<index>" is a
    placeholder, written as it is."""
    placeholder = isinstance(value, str) and value.startswith("<")
    if _CLI.get():
        if value is True and "." not in key:
            return f"--{key.replace('_', '-')}"
        text = {True: "true", False: "false", None: "null"}.get(value, value) if not placeholder else value
        return f"--{key}={text}"
    return f"{key.rsplit('.', 1)[-1]}={value if placeholder else repr(value)}"
