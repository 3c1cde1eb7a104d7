"""Sequence-parallel strategies. All communication goes through ``comm``."""
