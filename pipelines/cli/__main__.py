"""``python -m pipelines.cli``: the same app as the ``linernotes`` console script."""

from pipelines.cli import app

if __name__ == "__main__":
    app()
