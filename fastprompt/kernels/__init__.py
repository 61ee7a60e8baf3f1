"""Triton kernels of fastprompt (installed as ``fastprompt.kernels``)."""
