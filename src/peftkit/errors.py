"""The exceptions peftkit raises.

Each subclasses the builtin a caller would naturally catch (ValueError for bad values, TypeError for
unsupported types), so code written against plain Python exceptions keeps working. Every message says
what was expected, what was found, and how to fix it.
"""

from __future__ import annotations


class PeftkitError(Exception):
    """Base class of every error raised deliberately by peftkit."""


class ConfigError(PeftkitError, ValueError):
    """A configuration is invalid. The message lists every problem found, not just the first."""

    def __init__(self, problems: list[str], what: str = "config") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {what} ({len(self.problems)} problem(s)):\n{lines}")


class NoTargetMatchedError(PeftkitError, ValueError):
    """A target pattern matched no module of the model."""


class UnsupportedLayerError(PeftkitError, TypeError):
    """A targeted module is of a type (or configuration) the method cannot adapt."""


class AdapterNameError(PeftkitError, ValueError):
    """An adapter name is unknown, already taken, or cannot be used for the requested operation."""


class AdapterMismatchError(PeftkitError, ValueError):
    """Saved adapter weights do not fit the model: missing or unexpected keys, or wrong shapes."""


class AdapterFileError(PeftkitError, ValueError):
    """An adapter file cannot be read safely (truncated, corrupt, non-finite, or an unsafe format)."""


class SaveError(PeftkitError, OSError):
    """Writing an adapter or checkpoint failed (disk full, read-only or unwritable directory).

    The message names the path and the fix; ``errno``, ``strerror`` and ``filename`` are the
    underlying error's. Saves are atomic, so whatever was on disk before (the previous adapter files,
    earlier checkpoints) is unchanged.
    """

    def __init__(
        self, message: str, errno: int | None = None, strerror: str | None = None, filename: str | None = None
    ) -> None:
        super().__init__(message)
        self.errno, self.strerror, self.filename = errno, strerror, filename

    def __str__(self) -> str:
        return str(self.args[0])  # OSError would print "[Errno N] strerror: filename" instead


class UnsafeMergeError(PeftkitError, ArithmeticError):
    """Merging an adapter would write non-finite values into the base weights."""


class TiedWeightsError(PeftkitError, ValueError):
    """A merge would write into a weight other modules share (tied input and output embeddings), which would
    change them too; the message names the option that unties them first."""


class DataNotInstalledError(PeftkitError, ModuleNotFoundError):
    """A data set or model that ships inside a pip or Debian package was not found: the message says how
    to install it."""


class FreshAdapterWarning(UserWarning):
    """A freshly injected adapter starts somewhere that is known to hurt training (FourierFT's random
    spectrum on a narrow layer); the message says by how much and what to set instead."""


class BaseModelMismatchWarning(UserWarning):
    """An adapter is being loaded onto a model that differs from the one it was saved from."""


class UnloadableCheckpointError(PeftkitError, ValueError):
    """A save was refused because what it would write could not be loaded back as the model it came from
    (e.g. ``save_pretrained`` on part of an adapted model: base weights under adapter-layer names)."""


class NotCombinableError(PeftkitError, ValueError):
    """An adapter cannot be combined with others, or turned into a plain LoRA, as asked: its effect is not
    a fixed change of layer weights (a soft prompt, a non-linear bottleneck), or not an additive one (DoRA,
    IA3 and OFT rescale or turn the weight they are applied to). The message names the fix."""
