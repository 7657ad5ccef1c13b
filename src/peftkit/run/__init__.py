"""Runs: a YAML recipe (typed :class:`RunConfig`) turned into a trained, evaluated, saved adapter."""
