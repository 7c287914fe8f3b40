"""The ``linernotes`` command line: one command per stage, each taking ``--workdir`` and ``--json``.

``app`` (the console script ``linernotes``) lives in ``pipelines.cli.common`` with the options and helpers every
command shares; the command modules register on it when imported here. Commands import their stage's libraries
(torch, Ray, Beam) only when they run, so ``--help`` and the read-only commands start fast.
"""

from pipelines.cli import chain, clean, evaluate, lineage, run  # noqa: F401  (each registers its commands)
from pipelines.cli.common import app


def main() -> None:  # pragma: no cover - console entry
    app()


__all__ = ["app", "main"]
