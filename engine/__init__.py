"""Training engine: wires models and parallel heads, owns data, checkpoints, metrics and evaluation."""
