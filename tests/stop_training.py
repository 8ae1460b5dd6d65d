"""Stopping a training run part-way, deterministically, the way a kill would: the trainers
call ``learning_rate`` at the start of every step, so making it raise stops the run right
after the checkpoints written before that step. Imported by tests as ``stop_training``
(pytest puts tests/ on sys.path)."""


class Stop(Exception):
    """Raised inside the training loop to stop a run as a kill would."""


def stop_at(monkeypatch, module, step: int):
    """Make ``module.learning_rate`` raise Stop once any run asks for step ``step``; return
    the real function (to put back, or ``monkeypatch.undo()``)."""
    real = module.learning_rate

    def lr(s, *args):
        if s >= step:
            raise Stop
        return real(s, *args)

    monkeypatch.setattr(module, "learning_rate", lr)
    return real
