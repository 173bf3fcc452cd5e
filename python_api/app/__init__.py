"""The application: the demo (the main job), ``lora-kernels train`` (bring your own model and data), data loaders,
bundled models, plots and the ``lora-kernels`` command line. Heavy packages (matplotlib, pandas, tqdm, datasets)
are imported here only, lazily; the library (``python_api`` outside this folder, ``lora_kernels``) never imports
this package."""
