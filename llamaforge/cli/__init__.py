"""The `llamaforge` command line.

Every module in this package that defines `register(cli)` adds its commands to the root group, so command groups
stay independent (training, generation, serving...). Modules import heavy libraries inside their commands, never
at import time, so `llamaforge --help` stays fast.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import click

from llamaforge.errors import LlamaforgeError


class _Root(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LlamaforgeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Root, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="llamaforge")
def cli() -> None:
    """llamaforge: Llama 3 as a plugin-based component registry."""


def _load_commands() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if callable(register):
            register(cli)


_load_commands()


def main() -> None:
    cli(prog_name="llamaforge")
