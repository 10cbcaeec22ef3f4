"""Options and error handling shared by the commands that load a model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import click

from flamingo.dtypes import DTYPES

trust_remote_code_option = click.option(
    "--trust-remote-code", is_flag=True,
    help="Let the model and its tokenizer run Python code shipped with them (a model folder's or hub "
         "repo's own files). Only for models you trust; never taken from a model's own files.")

dtype_option = click.option(
    "--dtype", type=click.Choice(DTYPES),
    help="Dtype the model runs in, in both actor pools (visual tokens travel between them in it too); "
         "default auto: bfloat16 on a GPU, float32 on the CPU.")


class PoolSize(NamedTuple):
    """An actor pool's size: fixed (`minimum == maximum`) or autoscaling between the two."""

    minimum: int
    maximum: int

    def __str__(self) -> str:  # as the option is written, so that `submit` can pass it on
        return str(self.minimum) if self.minimum == self.maximum else f"{self.minimum}-{self.maximum}"


def parse_pool_size(value: Any) -> PoolSize:
    """`4` (a fixed pool) or `1-8` (between 1 and 8 actors); ValueError of one line for anything else."""
    if isinstance(value, PoolSize):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not an actor count: give N or MIN-MAX, e.g. 2 or 1-8")
    text = str(value).strip()
    low, sep, high = text.partition("-")
    try:
        size = PoolSize(int(low), int(high) if sep else int(low))
    except ValueError:
        raise ValueError(f"{text!r} is not an actor count: give N or MIN-MAX, e.g. 2 or 1-8") from None
    if size.minimum < 1 or size.maximum < size.minimum:
        raise ValueError(f"{text!r}: actor counts are at least 1, and MIN is at most MAX")
    return size


class PoolSizeType(click.ParamType):
    """`--vision-actors 1-8`: click's side of `parse_pool_size`."""

    name = "N|MIN-MAX"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> PoolSize:
        try:
            return parse_pool_size(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


@contextmanager
def refused_models() -> Iterator[None]:
    """A model the library refuses to load (code it would run, a size that does not fit) is one line of
    error and a non-zero exit, not a traceback."""
    from flamingo import ModelTooLargeError, UntrustedCodeError

    try:
        yield
    except (UntrustedCodeError, ModelTooLargeError) as error:
        raise click.ClickException(str(error)) from None
