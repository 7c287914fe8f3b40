"""Attribution: the index and attribute stages, the embedding and shard indexes, the loss, the three methods."""
