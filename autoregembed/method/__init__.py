"""autoregembed.method: the method's maths: what the encoder reads, the model, the losses, the LM-head scorers (DEVELOPERS.md maps each module)."""
