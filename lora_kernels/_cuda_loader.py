"""The compiled CUDA module (lora_kernels._lora_kernels_cuda), loaded on first use."""
from ._loader import CompiledModule

MODULE_NAME = "lora_kernels._lora_kernels_cuda"
_module = CompiledModule(MODULE_NAME, "Build it with `pip install -e . --no-build-isolation` on a machine with nvcc "
                                      "(LORA_KERNELS_BUILD_CUDA=1 forces the build).")
load, require = _module.load, _module.require
