"""Recipes: one YAML names a whole plan (manifests or shards, stage 1, the experts and their grids, the
stack, thresholds and cascade settings); ``distrib run`` runs it step by step with the same library
calls as the subcommands, skipping finished steps, and ends with report.md + evaluation_results.json.
``mode: shootout`` compares candidates instead and ends with the plan's decision line (shootout.py).

Public face: ``load_recipe(path, overrides) -> Recipe`` (config.py) and
``run_recipe(path, out, overrides, overwrite, address, num_cpus) -> dict`` (run.py). Before any step,
``resolve.resolve`` checks every config and ``state.check_saved`` compares with the run folder's saved
recipe; ``state.Steps`` skips finished steps. Modules import downward (setup.cfg's recipes-layers
contract): run, shootout, resolve | state | report, config.
"""

from distrib.recipes.config import Recipe, load_recipe
from distrib.recipes.run import run_recipe

__all__ = ["Recipe", "load_recipe", "run_recipe"]
