"""Training: one loop (``trainer``) for every device (``backends``), with its losses,
optimizers and schedules, checkpoints, seeding and logging."""
