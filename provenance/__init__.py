"""Ground floor: the records (the contract between stages), rights policy, lineage store, attribution."""
