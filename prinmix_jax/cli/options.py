"""Option types, value parsers and options shared by several commands."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import click

__all__ = ["LibraryChoice", "compile_cache_option", "library_choices", "parse_bits", "parse_group", "parse_ratio",
           "parse_size", "progress_option"]


class LibraryChoice(click.Choice):
    """A :class:`click.Choice` whose choices are constants of the library, read on first use (when the option
    is parsed or its command's help shown): importing the library loads JAX, which ``prinmix --help`` and
    usage errors should not wait for."""

    def __init__(self, load: Callable[[], Sequence[str]], case_sensitive: bool = True):
        self._load, self._loaded = load, None
        super().__init__((), case_sensitive)

    @property
    def choices(self):
        if self._loaded is None:
            self._loaded = tuple(self._load())
        return self._loaded

    @choices.setter
    def choices(self, value):  # click.Choice.__init__ assigns the (empty) placeholder
        pass


def library_choices(module: str, name: str, key: str | None = None) -> LibraryChoice:
    """``LibraryChoice`` of ``module.name`` (or of ``module.name[key]`` for a dict of choice lists)."""

    def load():
        import importlib

        value = getattr(importlib.import_module(module), name)
        return value[key] if key is not None else value

    return LibraryChoice(load)


def parse_bits(ctx, param, value):
    if value is None:
        return None
    try:
        bits = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 0,2,3,4,8, got {value!r}") from None
    if any(not 0 <= b <= 8 for b in bits):   # checked here too, so that it is a usage error in the user's words
        raise click.BadParameter(f"widths are 0..8 bits (0 = a vector may be dropped), got {value!r}")
    if not any(bits):
        raise click.BadParameter(f"needs at least one width in 1..8 (0 only drops vectors), got {value!r}; "
                                 "e.g. 0,2,3,4,8")
    return bits


def parse_ratio(ctx, param, value):
    """Click callback: :func:`prinmix_jax.config.parse_ratio` (0.0625, 1/16, 1e-2), errors as usage errors."""
    from prinmix_jax.config import parse_ratio as parse

    try:
        return parse(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def parse_group(ctx, param, value):
    if value is None or value.lower() == "none":
        return None if value is not None else 128
    try:
        size = int(value)
    except ValueError:
        raise click.BadParameter(f"expected an integer or 'none', got {value!r}") from None
    if size < 1:
        raise click.BadParameter(f"expected a positive integer (entries per scale) or 'none', got {value!r}")
    return size


def parse_size(ctx, param, value):
    """Click callback: a shard size, bytes (returned as an int) or a string like 5GB / 500MB / 2GiB (checked,
    returned as given); errors as usage errors."""
    if value is None:
        return None
    from prinmix_jax.models.hf_writer import parse_size as parse

    if value.strip().isdigit():     # plain bytes, as the message below suggests
        value = int(value)
    try:
        if parse(value) < 1:
            raise ValueError(f"must be more than 0 bytes, got {value!r}")
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return value


#: ``--compile-cache/--no-compile-cache`` (see :mod:`prinmix_jax.cli.runtime`); the command passes the value
#: to :func:`~prinmix_jax.cli.runtime.use_compile_cache` before any JAX work.
compile_cache_option = click.option(
    "--compile-cache/--no-compile-cache", default=None,
    help="Keep XLA's compiled programs on disk for the next run: $PRINMIX_CACHE_DIR, else "
         "~/.cache/prinmix-jax/jax ($XDG_CACHE_HOME), or your own JAX_COMPILATION_CACHE_DIR "
         "[default: on, off with PRINMIX_NO_COMPILE_CACHE=1].")


def progress_option(help: str = "Progress bar on stderr [default: when a terminal]."):
    return click.option("--progress/--no-progress", default=None, help=help)
