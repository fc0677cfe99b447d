"""The training machinery under the engine: optimizers and schedules, data order, checkpoints, logging."""
