"""Fused operators of dpn_fast."""
