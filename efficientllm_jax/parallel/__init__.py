"""Parallelism: mesh from the config, logical-axis rules, activation sharding, multi-host initialisation."""
