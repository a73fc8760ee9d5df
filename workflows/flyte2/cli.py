"""What `flyte run` does with our inputs and our errors, made to match `pyflyte run`:

- `--config` (inline JSON, or a YAML/JSON preset file) is read as our loaders read it: an unknown field, a bad value
  or a missing file stops the command before anything runs, in one line. Flyte's own reading drops unknown fields
  silently and reads YAML 1.1 (`humaneval: off` would be False). Fields given override the task's default input, as
  flyte does it.
- a user error of a local run (an unreachable URL, a missing checkpoint) is one plain line, `Error: ...`, with exit
  status 2, not a box wrapped at the terminal's width, which splits URLs.

Both replace functions of flyte's CLI (flyte.cli._params, flyte.cli._common), a private API: pyproject pins flyte
below 3, and tests/test_flyte2_cli.py checks both. Installed by importing this module, which environments.py does.
"""

import sys

import click
import flyte.cli._common as flyte_cli
import flyte.cli._params as flyte_params

from nanochat_flyte.errors import ConfigError, user_error_names
from nanochat_flyte.schema import cli_config_class


def fail(message: str):
    click.echo(f"Error: {message}", err=True)
    raise click.exceptions.Exit(2)  # flyte's CLI lets click's own exit through


def read_configs_strictly(convert):
    def convert_strictly(self, value, param, ctx):
        kind = cli_config_class(self._python_type, value)
        if kind is None:
            return convert(self, value, param, ctx)
        try:
            return kind.from_cli_value(value, self._default_dict())
        except ConfigError as error:
            fail(f"Invalid value for '--{param.name}': {error}")

    return convert_strictly


def user_errors_in_one_line(get_panel):
    """flyte's CLI shows a failed local run in a panel titled "Exception", built while it handles the error: a user
    error (known by its code, our class name) is printed as one line instead."""

    def panel(title, renderable, *args, **kwargs):
        error = sys.exc_info()[1]
        if title == "Exception" and getattr(error, "code", None) in user_error_names():
            click.echo(f"Error: {error}", err=True)
            raise SystemExit(2)  # flyte's CLI would print its panel for an exception, and exit 1
        return get_panel(title, renderable, *args, **kwargs)

    return panel


flyte_params.JsonParamType.convert = read_configs_strictly(flyte_params.JsonParamType.convert)
flyte_cli.get_panel = user_errors_in_one_line(flyte_cli.get_panel)
