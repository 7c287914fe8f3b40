"""Experiments apart from the production stages: the evaluation of the cleaning methods."""
