"""The shard stage: its config and plan, the encode and commit steps, and the stage."""
