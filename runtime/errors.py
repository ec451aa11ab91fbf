"""Exception types a user of glmtrt can catch.

Every error caused by the user's input (a bad checkpoint folder, a bad image, a bad option) is a
:class:`GlmTrtError`; its message is one line saying what was wrong and what to do. The CLI prints
that line and exits non-zero. Anything else escaping glmtrt is our bug and fails loudly with a traceback.
"""


class GlmTrtError(ValueError):
    """Base class of every user-facing glmtrt error (also a ValueError, for callers that catch that)."""


class ConfigError(GlmTrtError):
    """config.json is missing, unreadable, of an unsupported model_type, or inconsistent."""


class CheckpointError(GlmTrtError):
    """The weights do not match the config: missing, unexpected or mis-shaped tensors."""


class InputError(GlmTrtError):
    """A request's image, prompt or generation option is invalid."""


class EngineError(GlmTrtError):
    """A graph ran but returned unusable values (NaN or inf logits); the message names the graph."""
