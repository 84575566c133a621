"""Parallelism applied from outside the model: process groups, DDP/FSDP2, communication hooks."""
