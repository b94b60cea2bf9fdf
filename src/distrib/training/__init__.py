"""Stage 2 of the pipeline, training one model on 1..N processes (DDP or DeepSpeed via accelerate).

Public face: ``trainer.run(cfg, out_dir, resume=False, report=None)``, the one training function that
``distrib train``, ``accelerate launch launch/train.py`` and every Tune trial call. ``dist`` owns every
rank question (``build_accelerator``, ``print0``, ``on_main``); ``setup`` builds and restores the
``state.Trainer``; ``checkpoint``, ``evaluate``, ``losses``, ``optim`` and ``runlog`` are its parts.
Finished runs are read through ``distrib.runs``, never through this package.
"""
