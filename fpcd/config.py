"""Validation of experiment configs: a bad value fails at start with a message naming the field.

Configs are ``ml_collections.ConfigDict`` objects built by ``experiments/<name>.py``. The common
sections are checked here (``seed``, ``sde``, ``train``, ``sampling``); experiments
(:mod:`fpcd.experiments`) add their own checks with the same helpers. List-valued fields are
tuples (:func:`require_ints`, :func:`require_strings`, :func:`require_increasing`).
"""

from __future__ import annotations

import dataclasses
import numbers
import re

import ml_collections

from fpcd.errors import ConfigError
from fpcd.nets import PREDICTIONS
from fpcd.sampling import METHOD_DEFAULTS, check_sampler_options, nfe_of
from fpcd.sde import SCHEDULES
from fpcd.train import LEARNING_RATE_SCHEDULES, LOSS_WEIGHTINGS, TIME_SAMPLINGS, TrainSettings


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
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
        raise ConfigError(f"config.{dotted} must be a number, got {value!r}")
    if low is not None and (value < low or (open_low and value == low)):
        raise ConfigError(f"config.{dotted} must be {'>' if open_low else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"config.{dotted} must be <= {high}, got {value!r}")
    return float(value)


def _sequence(cfg, dotted: str, kind: str):
    value = get_field(cfg, dotted)
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
        raise ConfigError(f"config.{dotted} must be a tuple of {kind}, got {value!r}")
    return tuple(value)


def require_strings(cfg, dotted: str, *, minimum_count: int = 1) -> tuple[str, ...]:
    """A tuple of at least ``minimum_count`` non-empty strings."""
    values = _sequence(cfg, dotted, "strings")
    if len(values) < minimum_count or not all(isinstance(v, str) and v for v in values):
        raise ConfigError(f"config.{dotted} must be a tuple of at least {minimum_count} non-empty strings, "
                          f"got {values!r}")
    return values


def require_ints(cfg, dotted: str, *, minimum: int = 1, minimum_count: int = 1) -> tuple[int, ...]:
    """A tuple of at least ``minimum_count`` integers, each ``>= minimum``."""
    values = _sequence(cfg, dotted, "integers")
    if len(values) < minimum_count or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum
                                          for v in values):
        raise ConfigError(f"config.{dotted} must be a tuple of at least {minimum_count} integers >= {minimum}, "
                          f"got {values!r}")
    return tuple(int(v) for v in values)


def require_models(cfg, mlp: str, set_model: str) -> None:
    """The sections of a two-stage experiment's models: ``<mlp>`` (a ResMLP: width, depth) and
    ``<set_model>`` (a SetTransformer: width, depth, num_heads dividing width)."""
    for section in (mlp, set_model):
        require_int(cfg, f"{section}.width")
        require_int(cfg, f"{section}.depth")
    width, heads = cfg[set_model].width, require_int(cfg, f"{set_model}.num_heads")
    if width % heads:
        raise ConfigError(f"config.{set_model}.width ({width}) must be divisible by config.{set_model}.num_heads "
                          f"({heads})")


def require_classifier(cfg, section: str = "eval.classifier") -> None:
    """A classifier section of :func:`fpcd.metrics.classifier.classifier_auc`'s options."""
    require_ints(cfg, f"{section}.hidden")
    require_int(cfg, f"{section}.epochs")
    require_int(cfg, f"{section}.batch_size")
    require_float(cfg, f"{section}.learning_rate", low=0.0, open_low=True)


def require_increasing(cfg, dotted: str, *, minimum_count: int = 2) -> tuple[float, ...]:
    """A strictly increasing tuple of at least ``minimum_count`` numbers."""
    values = _sequence(cfg, dotted, "numbers")
    if (len(values) < minimum_count
            or any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in values)
            or any(b <= a for a, b in zip(values, values[1:]))):
        raise ConfigError(f"config.{dotted} must be a strictly increasing tuple of at least {minimum_count} "
                          f"numbers, got {values!r}")
    return tuple(float(v) for v in values)


def require_range(cfg, dotted: str, *, low: float, high: float, unit: str = "", open_low: bool = False):
    """A ``(min, max)`` pair of finite numbers with ``low <= min <= max < high`` (``low < min`` with
    ``open_low``); a scalar, a pair of other types or a NaN is refused naming the field."""
    value = get_field(cfg, dotted)
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    ok = len(pair) == 2 and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in pair)
    if ok:
        lo, hi = (float(v) for v in pair)
        ok = (lo > low if open_low else lo >= low) and lo <= hi < high
    if not ok:
        bound = f"{low:g} {'<' if open_low else '<='} min <= max" + ("" if high == float("inf") else f" < {high:g}")
        raise ConfigError(f"config.{dotted}={value!r}: need a pair (min, max) of finite numbers with {bound}"
                          + (f" ({unit})" if unit else "")
                          + f"; e.g. --config.{dotted}='({max(low, 1.0):g}, {min(high, 100.0) - 1:g})'")
    return float(pair[0]), float(pair[1])


def require_bool(cfg, dotted: str) -> bool:
    value = get_field(cfg, dotted)
    if not isinstance(value, bool):
        raise ConfigError(f"config.{dotted} must be True or False, got {value!r}")
    return value


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
                  **settings):
    """A training section: :class:`fpcd.train.TrainSettings` with these fields and ``settings``
    (its other fields: ``log_every``, ``ema_decay``, ``prediction`` (``"v"``), ``ema_warmup``,
    ``time_sampling``, ``noise_mean``, ``noise_std``, ``loss_weighting``, ``min_snr_gamma``, ...;
    cosine schedule, clipping at 1, no weight decay, ``t_min = 1e-5``, two checkpoints kept unless
    given) as a ``ConfigDict`` with every field :func:`validate_train` checks. Presets call it with
    keywords.

    The loss's levers (:class:`fpcd.loss.LossSettings`): ``time_sampling`` ``"uniform"`` (stratified
    uniform times) or ``"lognormal"`` (EDM's log-normal noise levels, ``log sigma ~ N(noise_mean,
    noise_std^2)``); ``loss_weighting`` ``"none"``, ``"min_snr"`` (Min-SNR-``min_snr_gamma``) or
    ``"likelihood"`` (``lambda(t) = g(t)^2``, score_sde's likelihood weighting); ``ema_warmup``
    ramps the EMA decay as ``min(ema_decay, (1 + n) / (10 + n))``."""
    return TrainSettings(num_steps=num_steps, batch_size=batch_size, learning_rate=learning_rate,
                         warmup_steps=warmup_steps, checkpoint_every=checkpoint_every, **settings).to_config()


def validate_optimisation(cfg, section: str) -> None:
    """Check the optimisation fields a training and a distillation section share."""
    s = section
    num_steps = require_int(cfg, f"{s}.num_steps")
    require_float(cfg, f"{s}.learning_rate", low=0.0, open_low=True)
    warmup = require_int(cfg, f"{s}.warmup_steps", minimum=0)
    if warmup > num_steps:
        raise ConfigError(f"config.{s}.warmup_steps ({warmup}) exceeds config.{s}.num_steps ({num_steps})")
    require_float(cfg, f"{s}.grad_clip", low=0.0)
    require_float(cfg, f"{s}.weight_decay", low=0.0)
    require_float(cfg, f"{s}.ema_decay", low=0.0, high=1.0)
    require_choice(cfg, f"{s}.schedule", LEARNING_RATE_SCHEDULES)
    require_int(cfg, f"{s}.log_every")
    require_int(cfg, f"{s}.checkpoint_every")
    require_int(cfg, f"{s}.keep_checkpoints")


def validate_train(cfg, *, num_devices: int = 1, section: str = "train") -> TrainSettings:
    """Check a training section (``config.train`` or another section of the same fields) field by
    field (:class:`ConfigError` naming the first bad one) and return it as
    :class:`fpcd.train.TrainSettings`."""
    s = section
    validate_optimisation(cfg, s)
    batch_size = require_int(cfg, f"{s}.batch_size")
    if batch_size % num_devices:
        raise ConfigError(
            f"config.{s}.batch_size ({batch_size}) must be a multiple of the number of devices ({num_devices})"
        )
    require_choice(cfg, f"{s}.prediction", PREDICTIONS)
    require_float(cfg, f"{s}.t_min", low=0.0, high=0.1, open_low=True)
    require_bool(cfg, f"{s}.ema_warmup")
    require_choice(cfg, f"{s}.time_sampling", TIME_SAMPLINGS)
    require_float(cfg, f"{s}.noise_mean", low=-20.0, high=20.0)
    require_float(cfg, f"{s}.noise_std", low=0.0, high=20.0, open_low=True)
    require_choice(cfg, f"{s}.loss_weighting", LOSS_WEIGHTINGS)
    require_float(cfg, f"{s}.min_snr_gamma", low=0.0, open_low=True)
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    unknown = sorted(set(cfg[s]) - fields)
    if unknown:
        raise ConfigError(f"config.{s} has unknown field(s) {unknown}; a training section holds {sorted(fields)}")
    return TrainSettings.from_config(cfg[s])


DISTILL_OPTIMISATION_FIELDS = ("num_steps", "learning_rate", "warmup_steps", "schedule", "grad_clip", "weight_decay",
                               "ema_decay", "log_every", "checkpoint_every", "keep_checkpoints")


def jet_sections(variant: str = "") -> dict:
    """The ``data``, ``sde``, ``jet_model`` and ``particle_model`` sections of the jets presets
    (``""``, ``"tiny"``, ``"full"``), shared by ``experiments/jetnet.py`` and
    ``experiments/anomaly.py``: the same data settings make the two read the same generated jets
    (one cache)."""
    data = ml_collections.ConfigDict({
        "jet_types": ("g", "q", "t", "w", "z"),
        "num_particles": 30,
        "num_jets": 8000,  # per type, generated
        "test_fraction": 0.3,  # the last 30 % of each type is held out
        "path_pattern": "",  # e.g. /data/jetnet/{type}.hdf5 to use real files
        "cache_dir": "",  # default: $FPCD_CACHE or ~/.cache/fpcd
        "workers": 0,  # generator processes (0: all CPUs)
    })
    jet_model = ml_collections.ConfigDict({"width": 128, "depth": 3, "fourier_scale": 16.0})
    particle_model = ml_collections.ConfigDict({"width": 64, "depth": 3, "num_heads": 4, "mlp_ratio": 2,
                                                "fourier_scale": 16.0})
    if variant == "tiny":
        data.update({"jet_types": ("q", "t"), "num_jets": 400})
        jet_model.update({"width": 32, "depth": 2})
        particle_model.update({"width": 16, "depth": 1, "num_heads": 2})
    elif variant == "full":
        data.update({"num_particles": 150, "num_jets": 100_000})
        jet_model.update({"width": 256, "depth": 4})
        particle_model.update({"width": 128, "depth": 8, "num_heads": 8})
    elif variant:
        raise ValueError(f"unknown jets preset {variant!r}; expected '', 'tiny' or 'full'")
    sde = ml_collections.ConfigDict({"beta_min": 0.1, "beta_max": 20.0, "schedule": "linear"})
    return {"data": data, "sde": sde, "jet_model": jet_model, "particle_model": particle_model}


def distill_section(rounds: int, teacher_steps: int, num_steps: int, learning_rate: float, *,
                    sample_steps: tuple[int, ...] = (8, 4, 2, 1), warmup_steps: int = 0, ema_decay: float = 0.995,
                    log_every: int = 100, checkpoint_every: int = 500, t_min: float = 1e-3):
    """A progressive-distillation section (:func:`validate_distill`): ``rounds`` halvings of a teacher
    sampled with deterministic DDIM in ``teacher_steps`` steps (``teacher_steps / 2`` ...
    ``teacher_steps / 2**rounds`` student steps), ``num_steps`` optimiser steps per round and
    stage at ``learning_rate`` (cosine decay, clipping at 1, no weight decay, two checkpoints
    kept); the students of ``sample_steps`` are sampled and evaluated beside the teacher's DDIM at
    the same steps. ``t_min`` is the end of the DDIM grid (that of :func:`fpcd.sampling.sample`)."""
    return ml_collections.ConfigDict({
        "rounds": rounds, "teacher_steps": teacher_steps, "sample_steps": tuple(sample_steps), "t_min": t_min,
        "num_steps": num_steps, "learning_rate": learning_rate, "warmup_steps": warmup_steps, "schedule": "cosine",
        "grad_clip": 1.0, "weight_decay": 0.0, "ema_decay": ema_decay, "log_every": log_every,
        "checkpoint_every": checkpoint_every, "keep_checkpoints": 2,
    })


def generate_section(*, num_events: int = 10_000, chunk_size: int = 1000, **conditions):
    """The ``generate`` section of ``--mode=generate`` (:mod:`fpcd.runner.generation`): how many
    events (``num_events``), written in chunks of ``chunk_size`` (a killed generation resumes at
    its first missing chunk), with the sampler run ``sampler`` (a name of ``sampling.runs`` or
    ``student_<k>``; empty: the first run), to ``output`` (empty: ``<workdir>/generated.h5``;
    an existing file is refused unless ``overwrite``), seeded by ``seed``; ``conditions`` are the
    experiment's own fields (e.g. the calorimeter's ``energy_range``)."""
    return ml_collections.ConfigDict({"num_events": num_events, "chunk_size": chunk_size, "sampler": "",
                                      "output": "", "overwrite": False, "seed": 0, **conditions})


def validate_generate(cfg) -> None:
    """Check the common fields of ``config.generate``; raise :class:`ConfigError` naming the field."""
    if "generate" not in cfg:
        raise ConfigError(f"--mode=generate: this config ({cfg.experiment}) has no generate section")
    require_int(cfg, "generate.num_events")
    require_int(cfg, "generate.chunk_size")
    require_int(cfg, "generate.seed", minimum=0)
    require_bool(cfg, "generate.overwrite")
    for field in ("sampler", "output"):
        if not isinstance(get_field(cfg, f"generate.{field}"), str):
            raise ConfigError(f"config.generate.{field} must be a string, got {get_field(cfg, f'generate.{field}')!r}")


def student_steps(cfg) -> tuple[int, ...]:
    """The students' DDIM steps, round by round (``teacher_steps / 2``, ``/ 4``, ...); ``()`` when the
    config has no ``distill`` section or no rounds."""
    if "distill" not in cfg or not cfg.distill.rounds:
        return ()
    return tuple(cfg.distill.teacher_steps // 2**r for r in range(1, cfg.distill.rounds + 1))


def validate_distill(cfg, *, train_sections: tuple[str, ...] = ("train",)) -> None:
    """Check ``config.distill`` (absent: no distillation); raise :class:`ConfigError` naming the field."""
    if "distill" not in cfg:
        return
    rounds = require_int(cfg, "distill.rounds", minimum=0)
    if not rounds:
        return
    teacher_steps = require_int(cfg, "distill.teacher_steps", minimum=2)
    if teacher_steps % 2**rounds:
        raise ConfigError(f"config.distill.teacher_steps ({teacher_steps}) must be divisible by 2**rounds "
                          f"(2**{rounds} = {2**rounds}): every round halves the number of steps")
    validate_optimisation(cfg, "distill")
    require_float(cfg, "distill.t_min", low=0.0, high=0.1, open_low=True)
    students = student_steps(cfg)
    sampled = require_ints(cfg, "distill.sample_steps", minimum_count=0)
    unknown = [k for k in sampled if k not in students]
    if unknown or len(set(sampled)) != len(sampled):
        raise ConfigError(f"config.distill.sample_steps={sampled!r}: unknown or repeated student(s) {unknown}; the "
                          f"students of {rounds} rounds from {teacher_steps} steps take {students} steps")
    for section in train_sections:
        if get_field(cfg, f"{section}.prediction") != "v":
            raise ConfigError(f"config.{section}.prediction={cfg[section].prediction!r}: progressive distillation "
                              "needs a v-prediction teacher (an eps-prediction student is unstable at few steps); "
                              f"train with --config.{section}.prediction=v or set --config.distill.rounds=0")
    taken = [f"student_{k}" for k in sampled if f"student_{k}" in cfg.sampling.runs]
    if taken:
        raise ConfigError(f"config.sampling.runs.{taken[0]}: the name is reserved for the distilled student")
    for k in sampled:  # a configured ddim_<k> is the student's paired teacher run: it must be that run
        run = dict(cfg.sampling.runs.get(f"ddim_{k}", {}) or {})
        if run and (run.get("method") != "ddim" or run.get("eta", 0.0) != 0.0
                    or float(run.get("t_min", METHOD_DEFAULTS["ddim"]["t_min"])) != float(cfg.distill.t_min)):
            raise ConfigError(f"config.sampling.runs.ddim_{k}={run!r}: beside the {k}-step student it must be the "
                              f"teacher's deterministic DDIM on the student's grid (eta 0, t_min "
                              f"{cfg.distill.t_min}); rename that run")


def validate_sampling(cfg, *, num_devices: int = 1) -> None:
    require_int(cfg, "sampling.num_samples")
    batch_size = require_int(cfg, "sampling.batch_size")
    if batch_size % num_devices:
        raise ConfigError(f"config.sampling.batch_size ({batch_size}) must be a multiple of the number of devices "
                          f"({num_devices}), so that sampling runs data-parallel")
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
            check_sampler_options(method, run)
        except ValueError as err:
            raise ConfigError(f"config.sampling.runs.{name}: {err}") from None
        check_run_name(name, method, run)


RUN_NAME = re.compile(r"^([a-z0-9_]+)_(\d+)$")  # the method may hold "_": dpmpp_2m_20


def check_run_name(name: str, method: str, options: dict) -> None:
    """A sampler run named ``<method>_<number>`` must have that number as its NFE per sample, so
    that a name means the same in every config (``pc_250``: 250 score evaluations, 125 steps)."""
    match = RUN_NAME.match(name)
    if match is None or match.group(1) != method:
        return
    nfe = nfe_of(method, **options)
    if nfe is not None and nfe != int(match.group(2)):
        raise ConfigError(f"config.sampling.runs.{name}: a run named {name!r} must take {match.group(2)} score "
                          f"evaluations per sample, but {method} with {options} takes {nfe}; rename it "
                          f"{method}_{nfe} or change its options")


def validate_common(cfg, *, num_devices: int = 1, train_sections: tuple[str, ...] = ("train",)) -> None:
    """Check the sections every experiment has; raise :class:`ConfigError` naming the field."""
    require_int(cfg, "seed", minimum=0)
    validate_sde(cfg)
    for section in train_sections:
        validate_train(cfg, num_devices=num_devices, section=section)
    validate_sampling(cfg, num_devices=num_devices)
    validate_distill(cfg, train_sections=train_sections)
