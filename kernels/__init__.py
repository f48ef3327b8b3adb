"""Triton kernels, one family per file. Pure device code: nothing here imports fasttrain.

Installed as the subpackage ``fasttrain.kernels`` (pyproject.toml maps this folder into the wheel).
"""
