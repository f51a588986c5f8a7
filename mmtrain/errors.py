"""User errors: problems with what the user gave us (config, data, folders), not bugs.

The CLI prints them as one line naming the field or file and the fix, and exits 2, without a
traceback. Anything else is a bug and keeps its traceback.
"""

import os
import shlex


class UserError(Exception):
    """Base class: caught by the CLI, printed, exit code 2."""


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class DataError(UserError, ValueError):
    """The user's data or folders cannot be used as they are."""


class ModelDirError(UserError):
    """An exported model folder is missing, incomplete, or from an incompatible mmtrain version."""


class TrainingError(Exception):
    """Training cannot go on (out of memory, persistent non-finite steps). Not the user's input,
    but not a bug either: the CLI prints it as one line with the fix and exits 1. Checkpoints
    already written are left as they are."""


class CheckpointError(UserError):
    """A checkpoint to resume from is missing, incomplete, unsafe to load, or from a different run."""


def shell_word(value: str | os.PathLike[str]) -> str:
    """``value`` as one shell word for a command we print: quoted with ``shlex.quote`` (spaces, quotes,
    ``$``), and a path starting with ``-`` written ``./-…`` so that no program reads it as an option."""
    text = os.fspath(value)
    return shlex.quote(f"./{text}" if text.startswith("-") else text)
