"""Stage 4 of the pipeline: aligned out-of-fold embeddings, the meta-learner and thresholds.

Public face: ``embed.extract_oof`` (each sample once in ``oof_embeddings.parquet``, K fold models
aligned into one space by ``align``; with ``embed.inference: refit`` also ``refit.add_refit``: one model
on all folds aligned into that space, ``refit.compare_refit`` its meta AUC vs the K-fold average), ``stack.fit_stack`` / ``stack.load_meta`` / ``stack.predict_meta``
(the meta-model: ``meta.fit_candidate`` best_expert / weighted / logistic / lightgbm, chosen by grouped
CV; ``thresholds.auc_difference`` compares it with the best expert), and ``thresholds.fit_thresholds`` / ``thresholds.decide``
(decision bands fit on OOF or val rows, never on test).
"""
