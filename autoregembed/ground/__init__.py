"""autoregembed.ground: what every floor stands on: errors, atomic writes, distributed helpers, data reading,
architectures, logging and progress, LoRA injection and merge, hub access (DEVELOPERS.md maps each module).
Imports nothing of the package above it."""
