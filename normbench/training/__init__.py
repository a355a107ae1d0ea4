"""Training: one run alone (``entry.train``) or several seeds packed into one network
(``packed.train_packed``), both driven by the one loop of :mod:`normbench.training.loop`.

run.py      one run: config, folder, model, optimizer, counters, checkpoints, summary
metrics.py  the per-step metrics kept on the device, read once per log line
solo.py     the stepper of a run alone (eager, compiled, DDP)
packing.py  K models <-> one grouped network
packed.py   the stepper of packed runs, and train_packed
loop.py     epochs, logging, divergence, checkpoints, evaluation, the end
optim.py    LR schedule, optimizer, compile decision
records.py  what a run folder records and whether it may be reused
signals.py  SIGINT / SIGTERM: checkpoint and stop
entry.py    train(cfg): lock, resume, train, summary; dry_run
"""
