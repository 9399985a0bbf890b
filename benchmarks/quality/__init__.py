"""The quality study of issue 6: a small real model family, Symphony-MoE against baselines and ablations.

See README.md in this folder; `python benchmarks/quality/run.py --help` for the command.
"""
