"""The demo: a catalog delivery rendered offline, and the chain run on it."""
