"""Triton kernels. ``TRITON_INTERPRET=1`` must be set before these modules are imported to run on CPU."""
