"""Training: the loop (`trainer`), the train and evaluation steps and their state (`step`), optimizers and
schedules (`optim`), mesh and shardings (`sharding`), checkpoints and preemption (`checkpointing`), several
processes (`distributed`), metric writers, progress and image grids (`writers`).

The submodules are imported where they are used rather than here, so that importing one (say `writers`
in a notebook) does not pull in Orbax and optax.
"""
