"""The compiled native CPU module (lora_kernels._lora_kernels_cpu), loaded on first use."""
from ._loader import CompiledModule

MODULE_NAME = "lora_kernels._lora_kernels_cpu"
_module = CompiledModule(MODULE_NAME, "Build it with `pip install -e . --no-build-isolation` (needs cmake and a C++17 "
                                      "compiler; LORA_KERNELS_BUILD_CPU=1 makes a failed build an error).")
load, require = _module.load, _module.require
