"""Training both stages of the Golf Optimizer, as parts a reader finds by name:

    trainer.py   Trainer: set-up (every check before the tracking run starts), resume, train_step,
                 validate, save, export, close; train_stage(cfg, stage) runs one stage
    stages.py    FStage and GStage: each owns its network and its loss (Eq. 4 for G, written once)
    backend.py   what differs between plain Accelerate (DDP) and DeepSpeed, behind one interface
    meter.py     StepMeter: throughput, data wait, pauses, gradient norm and GPU memory per window
    state.py     TrainingState: the typed content of a checkpoint's state.json
    resume.py    where a stage starts from: the trained F of stage g, the checkpoint every rank loads
    watchdog.py  Watchdog: a rank that makes no progress for train.hang_timeout_s dumps its stacks and exits 124
"""
