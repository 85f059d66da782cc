"""autoregembed.run: running it: configuration, the stages, the trainer on DeepSpeed, checkpoints, reference
scores, faults (DEVELOPERS.md maps each module).  The top floor below the command line: it may import
every floor beneath (ground, method, release)."""
