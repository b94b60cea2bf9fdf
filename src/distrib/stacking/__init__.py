"""Stage 4 of the pipeline: aligned out-of-fold embeddings, the meta-learner and thresholds.

Public face: ``embed.extract_oof`` (each sample once in ``oof_embeddings.parquet``, K fold models
aligned into one space by ``align``, from the shared ``features.embed_split`` / ``features.embed_table``;
with ``embed.inference: refit`` also ``refit.add_refit``: one model on all folds aligned into that space),
``stack.fit_stack`` / ``stack.load_meta`` / ``stack.predict_meta`` (the meta-model over the experts' tables
that ``tables.load_experts`` joins: ``meta.fit_candidate`` best_expert / weighted / logistic / lightgbm,
chosen by grouped CV; ``evaluate.versus_best_expert`` compares it with the best expert on val/test and
``evaluate.compare_refit`` with refit experts), and ``thresholds.fit_thresholds`` / ``thresholds.decide``
(decision bands fit on OOF or val rows, never on test).

Modules import downward in this order (setup.cfg's stacking-layers contract): stack, evaluate | embed,
refit, meta | tables | features, thresholds | align.
"""
