"""Model code: decoder, layers, attention variants, positions, MoE."""
