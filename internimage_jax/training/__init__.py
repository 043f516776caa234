"""Training library: data, optimizer, sharding, the loop."""
