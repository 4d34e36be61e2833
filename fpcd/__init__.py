"""fpcd: fast point-cloud diffusion in JAX.

Modules (one concept each): :mod:`fpcd.sde` (VP SDE), :mod:`fpcd.nets` (score networks),
:mod:`fpcd.unet` (the voxel-image U-Net), :mod:`fpcd.sampling` (samplers with NFE),
:mod:`fpcd.ode` (the adaptive Dopri5 solve), :mod:`fpcd.likelihood` (ODE log-likelihoods),
:mod:`fpcd.loss` (the score-matching loss), :mod:`fpcd.train` (training settings, train state
and step), :mod:`fpcd.distill` (progressive distillation), :mod:`fpcd.parallel` (device mesh),
:mod:`fpcd.checkpoint` (atomic, resumable checkpoints), :mod:`fpcd.errors` (expected errors),
:mod:`fpcd.data`, :mod:`fpcd.metrics`, :mod:`fpcd.runner` (the one experiment runner),
:mod:`fpcd.experiments` (its experiments) and :mod:`fpcd.cli` (the command line).

The names most programs need are importable from the package itself, loaded on first use
(``import fpcd`` stays cheap and does not start JAX)::

    import fpcd
    sde = fpcd.VPSDE()
    x, nfe = fpcd.sample(score_fn, sde, key, shape, method="ddim", steps=16)
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "VPSDE": "fpcd.sde",
    "SetTransformer": "fpcd.nets",
    "ResMLP": "fpcd.nets",
    "UNet3D": "fpcd.unet",
    "score_fn_from": "fpcd.nets",
    "apply_batched": "fpcd.nets",
    "sample": "fpcd.sampling",
    "nfe_of": "fpcd.sampling",
    "check_sampler_options": "fpcd.sampling",
    "ProbabilityFlow": "fpcd.sampling",
    "solve_dopri5": "fpcd.ode",
    "log_likelihood": "fpcd.likelihood",
    "check_likelihood_options": "fpcd.likelihood",
    "TrainState": "fpcd.train",
    "TrainSettings": "fpcd.train",
    "LossSettings": "fpcd.loss",
    "init_train_state": "fpcd.train",
    "make_optimizer": "fpcd.train",
    "make_train_step": "fpcd.train",
    "dsm_loss": "fpcd.loss",
    "fit": "fpcd.train",
    "distillation_loss": "fpcd.distill",
    "make_distill_step": "fpcd.distill",
    "Checkpointer": "fpcd.checkpoint",
    "data_mesh": "fpcd.parallel",
    "ExpectedError": "fpcd.errors",
    "ConfigError": "fpcd.errors",
    "DataError": "fpcd.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    """Load an exported name from its module on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fpcd' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
