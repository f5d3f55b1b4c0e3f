"""Training kernels: Triton forward/backward with a pure-PyTorch reference of the same function.

Each op takes ``backend``: ``"triton"`` runs the Triton kernels (CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1``, which the tests use), ``"torch"`` the reference. ``ftl.kernels.patch``
swaps them into a loaded transformers model by module type.
"""

if __name__ == "kernels":
    # Imported as a top-level `kernels` (from a checkout's root, where `python -m ...` puts the
    # working directory first on sys.path): that name belongs to Hugging Face's `kernels` package,
    # which bitsandbytes tries to import; be absent rather than a wrong module.
    raise ImportError("this is ftl's kernels folder (ftl.kernels), not the `kernels` package")
