"""Conditioning adapters the shipped AMDM workflows need, one folder per model family."""
