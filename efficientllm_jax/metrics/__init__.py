"""Metrics: flops (analytic, per variant), monitor (memory, NVML power / utilisation / energy), efficiency
(the EfficientLLM metrics and summary.json), writers (tensorboardX, jsonl, console)."""
