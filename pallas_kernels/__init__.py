"""Kernels for InternImage's deformable operators (one folder per operator)."""
