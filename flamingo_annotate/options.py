"""Options and error handling shared by the commands that load a model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click

trust_remote_code_option = click.option(
    "--trust-remote-code", is_flag=True,
    help="Let the model and its tokenizer run Python code shipped with them (a model folder's or hub "
         "repo's own files). Only for models you trust; never taken from a model's own files.")


@contextmanager
def refused_models() -> Iterator[None]:
    """A model the library refuses to load (code it would run, a size that does not fit) is one line of
    error and a non-zero exit, not a traceback."""
    from flamingo import ModelTooLargeError, UntrustedCodeError

    try:
        yield
    except (UntrustedCodeError, ModelTooLargeError) as error:
        raise click.ClickException(str(error)) from None
