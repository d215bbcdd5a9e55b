"""Print what CMake needs to build against the installed torch, as KEY=VALUE lines."""

import os

import torch

torch_dir = os.path.dirname(torch.__file__)
print(f"TORCH_VERSION={torch.__version__}")
print(f"TORCH_CUDA_VERSION={torch.version.cuda}")
print(f"TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
print(f"TORCH_LIB_DIR={os.path.join(torch_dir, 'lib')}")
include = [
    os.path.join(torch_dir, "include"),
    os.path.join(torch_dir, "include", "torch", "csrc", "api", "include"),
]
print("TORCH_INCLUDE_DIRS=" + ";".join(include))
