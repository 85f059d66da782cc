"""DeepSpeed JSON configurations; installed as ``autoregembed.ds_configs`` so the CLI finds its default from a wheel."""
