"""Validation of experiment configs: a bad value fails at start with a message naming the field.

Configs are ``ml_collections.ConfigDict`` objects built by ``experiments/<name>.py``. The common
sections are checked here (``seed``, ``sde``, ``model``, ``train``, ``sampling``); experiment
pipelines add their own checks with the same helpers.
"""

from __future__ import annotations

import numbers

import ml_collections

from fpcd.nets import PREDICTIONS
from fpcd.sampling import METHOD_DEFAULTS, _check_options
from fpcd.sde import SCHEDULES


class ConfigError(ValueError):
    """A config value is missing or invalid; the message names the field."""


def get_field(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if part not in node:
            raise ConfigError(f"config.{dotted} is missing")
        node = node[part]
    return node


def require_int(cfg, dotted: str, *, minimum: int = 1):
    value = get_field(cfg, dotted)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"config.{dotted} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def require_float(cfg, dotted: str, *, low: float | None = None, high: float | None = None, open_low: bool = False):
    value = get_field(cfg, dotted)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"config.{dotted} must be a number, got {value!r}")
    if low is not None and (value < low or (open_low and value == low)):
        raise ConfigError(f"config.{dotted} must be {'>' if open_low else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"config.{dotted} must be <= {high}, got {value!r}")
    return float(value)


def require_choice(cfg, dotted: str, choices):
    value = get_field(cfg, dotted)
    if value not in choices:
        raise ConfigError(f"config.{dotted} must be one of {sorted(choices)}, got {value!r}")
    return value


def validate_sde(cfg) -> None:
    beta_min = require_float(cfg, "sde.beta_min", low=0.0, open_low=True)
    beta_max = require_float(cfg, "sde.beta_max", low=0.0, open_low=True)
    if beta_max <= beta_min:
        raise ConfigError(f"config.sde.beta_max ({beta_max}) must exceed config.sde.beta_min ({beta_min})")
    require_choice(cfg, "sde.schedule", SCHEDULES)


def train_section(num_steps: int, batch_size: int, learning_rate: float, warmup_steps: int, checkpoint_every: int,
                  *, log_every: int = 100, ema_decay: float = 0.999, prediction: str = "v"):
    """A training section with every field :func:`validate_train` checks (cosine schedule, clipping
    at 1, no weight decay, ``t_min = 1e-5``, two checkpoints kept)."""
    return ml_collections.ConfigDict({
        "num_steps": num_steps, "batch_size": batch_size, "learning_rate": learning_rate,
        "warmup_steps": warmup_steps, "schedule": "cosine", "grad_clip": 1.0, "weight_decay": 0.0,
        "ema_decay": ema_decay, "prediction": prediction, "t_min": 1e-5, "log_every": log_every,
        "checkpoint_every": checkpoint_every, "keep_checkpoints": 2,
    })


def validate_train(cfg, *, num_devices: int = 1, section: str = "train") -> None:
    """Check a training section (``config.train`` or another section of the same fields)."""
    s = section
    num_steps = require_int(cfg, f"{s}.num_steps")
    batch_size = require_int(cfg, f"{s}.batch_size")
    if batch_size % num_devices:
        raise ConfigError(
            f"config.{s}.batch_size ({batch_size}) must be a multiple of the number of devices ({num_devices})"
        )
    require_float(cfg, f"{s}.learning_rate", low=0.0, open_low=True)
    warmup = require_int(cfg, f"{s}.warmup_steps", minimum=0)
    if warmup > num_steps:
        raise ConfigError(f"config.{s}.warmup_steps ({warmup}) exceeds config.{s}.num_steps ({num_steps})")
    require_float(cfg, f"{s}.grad_clip", low=0.0)
    require_float(cfg, f"{s}.weight_decay", low=0.0)
    require_float(cfg, f"{s}.ema_decay", low=0.0, high=1.0)
    require_choice(cfg, f"{s}.prediction", PREDICTIONS)
    require_choice(cfg, f"{s}.schedule", ("cosine", "constant"))
    require_float(cfg, f"{s}.t_min", low=0.0, high=0.1, open_low=True)
    require_int(cfg, f"{s}.log_every")
    require_int(cfg, f"{s}.checkpoint_every")
    require_int(cfg, f"{s}.keep_checkpoints")


def validate_sampling(cfg) -> None:
    require_int(cfg, "sampling.num_samples")
    require_int(cfg, "sampling.batch_size")
    runs = get_field(cfg, "sampling.runs")
    if not runs:
        raise ConfigError("config.sampling.runs is empty: name at least one sampler run")
    for name, run in runs.items():
        run = dict(run)
        method = run.pop("method", None)
        if method not in METHOD_DEFAULTS:
            raise ConfigError(
                f"config.sampling.runs.{name}.method must be one of {sorted(METHOD_DEFAULTS)}, got {method!r}"
            )
        try:
            _check_options(method, run)
        except ValueError as err:
            raise ConfigError(f"config.sampling.runs.{name}: {err}") from None


def validate_common(cfg, *, num_devices: int = 1, train_sections: tuple[str, ...] = ("train",)) -> None:
    """Check the sections every experiment has; raise :class:`ConfigError` naming the field."""
    require_int(cfg, "seed", minimum=0)
    validate_sde(cfg)
    for section in train_sections:
        validate_train(cfg, num_devices=num_devices, section=section)
    validate_sampling(cfg)
