"""Differentiable primitives: one autograd Function and its functional form per file."""
