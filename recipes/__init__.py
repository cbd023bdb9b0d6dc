"""Recipes: runs that use both sides, the teacher passes (``precompute``) and the student (``train``).

- :mod:`recipes.cyclealign`: ``train cyclealign``, rounds of sample -> rank (a black box) -> train.

The layer above both: a recipe calls the steps' own functions with the steps' own
configurations, and neither side imports it (``train``'s command line imports a
recipe only when its command is asked for; ``tests/test_layers.py`` checks it).
"""
