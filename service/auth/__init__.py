"""Flextype tokens: who may call the API, and how many calls each token made.

Importing this package loads nothing: :mod:`.rules` and :mod:`.limits` are
imported by the HTTP layer's error table without bcrypt or YAML.
"""
