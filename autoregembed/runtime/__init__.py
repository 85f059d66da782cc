"""autoregembed.runtime: running it: configuration, data, stages, the trainer on DeepSpeed, checkpoints, faults, monitoring (DEVELOPERS.md maps each module)."""
