"""Launch-only code: check, allocate, launch. No autograd here (that lives in ``sparsemm_kernels.ops``).

``triton/`` holds the Triton kernels; ``cpu.py`` and ``cuda.py`` wrap the extension's C++ and CUDA entry
points. Each module is imported lazily by the op that dispatches to it, so importing the package never
imports triton or touches a GPU.
"""
