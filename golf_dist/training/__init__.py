"""Training both stages of the Golf Optimizer, as parts a reader finds by name:

trainer.py   Trainer: set-up (every check before the tracking run starts), resume, train_step,
             validate, save, export, close; train_stage(cfg, stage) runs one stage
stages.py    FStage and GStage: each owns its network and its loss (Eq. 4 for G, written once)
backend.py   what differs between plain Accelerate (DDP) and DeepSpeed, behind one interface
meter.py     StepMeter: throughput, data wait, pauses, gradient norm and GPU memory per window
state.py     TrainingState: the typed content of a checkpoint's state.json
resume.py    where a stage starts from: the trained F of stage g, the checkpoint every rank loads
watchdog.py  Watchdog: a rank that makes no progress for train.hang_timeout_s dumps its stacks and exits 124
distributed.py  launcher mixed precision, process-group timeout, DeepSpeed config, ZeRO-2 state in Adam's layout
optim.py     the recipe around Adam: warm-up and schedules, gradient clipping, EMA
remote.py    resume from a checkpoint elsewhere (a folder or an MLflow artifact URI)
preemption.py  stop cleanly on SIGTERM/SIGUSR2 or a STOP file (SLURM preemption, time limit)
run_info.py  versions, git commit and topology, logged as a run's params
speed_check.py  the speed layer's start-up check for a stage (a failing switch turned off, recorded)
"""
