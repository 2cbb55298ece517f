"""The shipped YAML configs and concept presets (concepts/*.yaml), as package data.

A package so that `pip install .` ships them and code reads them with importlib.resources from any
directory; in the checkout they stay at the repository root, where the README's commands name them.
"""
