"""Scripted behavioural protocols, their scorers and the statistics over arms x items x seeds.

Submodules are imported explicitly (``experiments.protocol``, ``experiments.scoring``,
``experiments.stats``) so that importing the package itself stays free of heavy dependencies.
"""
