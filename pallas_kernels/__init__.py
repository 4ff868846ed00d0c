"""Pallas kernels for APB attention (anchor + passing + local in one call)."""

from pallas_kernels.apb_attention import BlockSizes, apb_attention, default_backend
from pallas_kernels.mask import ApbMask
from pallas_kernels.reference import apb_attention_reference

__all__ = ["ApbMask", "BlockSizes", "apb_attention", "apb_attention_reference", "default_backend"]
