"""Reading the lineage store: walks from any id to its sources and results, and the run report."""
