"""The ``kvtrap`` command. Exit codes everywhere: 0 ok, 1 the thing checked failed, 2 usage or input error."""

from __future__ import annotations

import sys

import click

from kvtrap import __version__
from kvtrap.cli.boundary import BoundaryGroup


class _Main(BoundaryGroup):
    """The ``kvtrap`` group: every subcommand runs inside the error boundary; subcommands load lazily."""

    LAZY = {
        "doctor": ("kvtrap.cli.doctor", "doctor"),
        "dump": ("kvtrap.cli.dump_cmd", "dump"),
        "repro": ("kvtrap.cli.repro_cmd", "repro"),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.LAZY)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.LAZY:
            return None
        module_name, attr = self.LAZY[name]
        import importlib

        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvtrap")
def main() -> None:
    """kvtrap: trap bad paged-KV page tables in SGLang before the kernel faults.

    \b
    Arm it in every SGLang process:   SGLANG_TRTLLM_MHA_DEBUG=1 python -m sglang.launch_server ...
    Check this machine:               kvtrap doctor
    Read what a trap left behind:     kvtrap dump ls ./kvtrap-dumps ; kvtrap dump explain DUMP
    Reproduce the crash on purpose:   kvtrap repro list
    """


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
