"""Integrations with training libraries: where their way of compiling keeps the logits, the few lines that
make the loss fusable. Each submodule imports its library only when it is imported itself.

* :mod:`cce_inductor.integrations.transformers` — the Hugging Face ``Trainer`` (``enable(trainer)`` or
  ``CCETrainerMixin``) and ``LossStep`` for custom loops: compiles ``model(**inputs).loss`` (not the whole
  model, whose output holds the logits), with ``num_items_in_batch`` as the Trainer passes it and the
  gradient-checkpointing recipe (``use_cache=False``, Dynamo's checkpoint side-effect flag) applied.
"""
