"""Fine-tuning: data loading, train step, optimizer, checkpointing and export.

Modules are imported explicitly (``from sdjax.training import data``) so that
importing one piece never pulls in the others' heavier dependencies.
"""
