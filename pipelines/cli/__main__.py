"""``python -m pipelines.cli``: the same app as the ``linernotes`` console script."""

from pipelines.cli import app

app()
