"""The stages on the contract of ``pipelines.stage``: ingest, separate, clean, shard, train, generate, evaluate,
takedown.
"""
