"""Stage 3 of the pipeline: K folds x a hyper-parameter grid as one Ray Tune sweep.

Public face: ``driver.run_sweep(cfg, grid, out_dir, ...)``, ``driver.init_ray`` / ``driver.stop_ray`` (the
loopback-only local cluster with its PID file and orphan reaping, in ``local_ray``); ``grid.load_grid``,
``grid.grid_configs`` and ``grid.trial_command`` (the grid and how a trial is replayed by hand);
``trial.run_trial`` (one (config, fold) pair = one ``training.trainer.run``); ``search.run_cv_trial``,
``search.param_space`` and ``search.tune_config`` (``tune.search: random|optuna``: one trial per sampled
config runs all folds, optional ASHA over folds); ``report.write_outputs``
and ``report.choose_best`` (sweep_summary.csv, best_config.yaml, sweep_results.json);
``tracking.start_parent`` / ``tracking.finish_parent`` (an MLflow parent run per sweep);
``ray_nodes.start_head`` / ``add_worker`` / ``kill_node`` / ``stop_cluster`` (a multi-node `ray start`
cluster on one host, on 127.0.0.1, stopped by PID: the multi-node tests and ``distrib bench sweep``).
"""
