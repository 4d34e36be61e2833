"""fpcd: fast point-cloud diffusion in JAX.

Modules (one concept each): :mod:`fpcd.sde` (VP SDE), :mod:`fpcd.nets` (score networks),
:mod:`fpcd.sampling` (samplers with NFE), :mod:`fpcd.likelihood` (ODE log-likelihoods),
:mod:`fpcd.train` (losses, train state and step), :mod:`fpcd.parallel` (device mesh),
:mod:`fpcd.checkpoint` (atomic, resumable checkpoints), :mod:`fpcd.data`, :mod:`fpcd.metrics`,
:mod:`fpcd.runner` (the one experiment runner) and :mod:`fpcd.experiments` (its experiments).
"""

__version__ = "0.1.0"
