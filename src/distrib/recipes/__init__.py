"""Recipes: one YAML names a whole plan (manifests or shards, stage 1, the experts and their grids, the
stack, thresholds and cascade settings); ``run_recipe`` runs it step by step with the same library
calls as the subcommands, skipping finished steps. Public: ``load_recipe``, ``run_recipe``.
"""
from distrib.recipes.config import Recipe, load_recipe
from distrib.recipes.run import run_recipe

__all__ = ["Recipe", "load_recipe", "run_recipe"]
