"""Training kernels: Triton forward/backward with a pure-PyTorch reference of the same function.

Each op takes ``backend``: ``"triton"`` runs the Triton kernels (CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1``, which the tests use), ``"torch"`` the reference. ``ftl.kernels.patch``
swaps them into a loaded transformers model by module type.
"""
