"""Drop-in integrations with the trainers people already use.

* :mod:`.transformers` -- ``Rho1Trainer`` (selective language modelling) and ``RhoLossTrainer``
  (RHO-LOSS online batch selection) as subclasses of ``transformers.Trainer``
  (``pip install rho_kernels[transformers]``).
* :mod:`.lightning` -- ``RhoLossMixin`` puts :class:`~rho_kernels.training.OnlineBatchSelector`
  into a ``LightningModule``'s training step (``pip install rho_kernels[lightning]``).

Nothing is imported here: each submodule needs its own optional dependency.
"""
