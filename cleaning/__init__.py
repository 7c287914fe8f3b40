"""Audio signal work: decode, measure, mel features, embedders (imports only ``provenance``)."""
