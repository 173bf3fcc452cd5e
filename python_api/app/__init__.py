"""The applications built on the library: ``lora-kernels train`` (bring your own model and data)."""
