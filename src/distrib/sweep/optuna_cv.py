"""Ray Tune's ``OptunaSearch`` for per-config CV trials: a config that ASHA stopped before its last fold is
told to Optuna as PRUNED, not as COMPLETE with the running mean of the folds it ran (which is a mean over
different data than a finished config's). Its own module so optuna is imported only by optuna sweeps and
the searcher pickles by name into Tune's experiment state (``--resume``).
"""

from __future__ import annotations

import optuna
from ray.tune.search.optuna import OptunaSearch


class CVOptunaSearch(OptunaSearch):
    """``OptunaSearch(metric, mode, seed)`` plus ``folds``: results with ``folds_done < folds`` end PRUNED."""

    def __init__(self, *args, folds: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.folds = folds

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # OptunaSearch's private trial maps: Tune's searcher API cannot end a trial PRUNED (docs/DESIGN.md,
        # library internals; tests/test_internals.py)
        stopped = not error and result and result.get("folds_done", self.folds) < self.folds
        if stopped and trial_id in self._ot_trials and trial_id not in self._completed_trials:
            self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result=result, error=error)
