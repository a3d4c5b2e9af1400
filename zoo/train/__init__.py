"""Training: mesh and sharding rules, optimizer, Orbax checkpoints, the jitted loop."""
