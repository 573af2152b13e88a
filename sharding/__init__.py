"""Meshes, logical-axis rules and the shard_map expert-parallel MoE."""
