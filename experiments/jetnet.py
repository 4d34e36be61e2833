"""FPCD on JetNet jets: two-stage class-conditional score models, sampled with every method.

    python experiments/main.py --config=experiments/jetnet.py --workdir=runs/jetnet        # ~30 min on 2 CPUs
    python experiments/main.py --config=experiments/jetnet.py:tiny                          # smoke run, minutes
    python experiments/main.py --config=experiments/jetnet.py:full --workdir=/scratch/jets  # paper scale, GPUs

Data: jets generated offline with Pythia 8 + FastJet (cached under ``data.cache_dir``), or the real
JetNet files with ``--config.data.path_pattern=/data/jetnet/{type}.hdf5`` (``{type}150.hdf5`` for
150 particles). The last ``data.test_fraction`` of each type is held out for evaluation.

``--mode=generate --config.generate.num_events=N --config.generate.jet_types='("t",)'`` writes N
jets in the JetNet layout from the trained workdir alone (``generate.sampler``: a run or ``student_<k>``).

``--mode=all`` also distils both stages from 64 DDIM steps down to 1 (six rounds of progressive
distillation, ``config.distill``) and evaluates the 8-, 4-, 2- and 1-step students beside the
teacher's own DDIM at 8, 4, 2 and 1 steps; ``--config.distill.rounds=0`` skips it.
"""

import ml_collections

from fpcd.config import distill_section, generate_section, jet_sections
from fpcd.config import train_section as _train


def get_config(variant: str = ""):
    if variant not in ("", "tiny", "full"):
        raise ValueError(f"experiments/jetnet.py: unknown variant {variant!r}; expected '', 'tiny' or 'full'")
    cfg = ml_collections.ConfigDict()
    cfg.experiment = "jetnet"
    cfg.name = "jetnet" + (f"_{variant}" if variant else "")
    cfg.seed = 0

    # data (the jets experiment's generated jets: one cache), sde, jet_model, particle_model
    cfg.update(jet_sections(variant))
    cfg.train_global = _train(num_steps=4000, batch_size=256, learning_rate=1e-3, warmup_steps=200,
                              checkpoint_every=1000)
    cfg.train_set = _train(num_steps=20000, batch_size=128, learning_rate=5e-4, warmup_steps=500,
                           checkpoint_every=1000)  # the particle stage

    cfg.sampling = ml_collections.ConfigDict()
    cfg.sampling.num_samples = 1200  # per type; the floor uses two disjoint test subsets of this size
    cfg.sampling.batch_size = 400
    # Clip each denoised estimate to the training data's per-feature range (benchmarks/README.md,
    # "Fidelity levers": took the z ODE's FPD from 0.55 to 0.14, neutral elsewhere).
    cfg.sampling.clip_denoised = True
    cfg.sampling.runs = ml_collections.ConfigDict({
        "pc_250": {"method": "pc", "steps": 125, "snr": 0.16},
        "em_300": {"method": "em", "steps": 300},
        "ddim_50": {"method": "ddim", "steps": 50},
        "ode_1e-3": {"method": "ode", "rtol": 1e-3, "atol": 1e-3},
    })

    # 64 -> 32 -> ... -> 1 DDIM steps, 1,500 steps per round and stage (~25 min on 2 CPU cores).
    cfg.distill = distill_section(rounds=6, teacher_steps=64, num_steps=1500, learning_rate=2e-4,
                                  sample_steps=(8, 4, 2, 1), warmup_steps=50,
                                  checkpoint_every=500)

    cfg.eval = ml_collections.ConfigDict({"evaluators": ("jet_metrics",), "num_batches": 5, "seed": 42})
    # --mode=generate: jets of generate.jet_types (default: every trained type, in turn) in the JetNet layout
    cfg.generate = generate_section(jet_types=())

    if variant == "tiny":
        cfg.train_global = _train(num_steps=150, batch_size=64, learning_rate=2e-3, warmup_steps=10,
                                  checkpoint_every=75, log_every=50)
        cfg.train_set = _train(num_steps=150, batch_size=32, learning_rate=2e-3, warmup_steps=10,
                               checkpoint_every=75, log_every=50)
        cfg.sampling.num_samples = 60
        cfg.sampling.batch_size = 60
        cfg.sampling.runs = ml_collections.ConfigDict({  # PC and the ODE: gmm tiny (the tests' time budget)
            "em_20": {"method": "em", "steps": 20},
            "ddim_10": {"method": "ddim", "steps": 10},
        })
        cfg.eval.num_batches = 1
        cfg.distill.rounds = 0  # the calo tiny preset covers distilling a two-stage model
    elif variant == "full":
        cfg.train_global = _train(num_steps=50_000, batch_size=1024, learning_rate=1e-3, warmup_steps=1000,
                                  checkpoint_every=5000)
        cfg.train_set = _train(num_steps=300_000, batch_size=256, learning_rate=3e-4, warmup_steps=5000,
                               checkpoint_every=5000)
        cfg.sampling.num_samples = 50_000
        cfg.sampling.batch_size = 5000
        cfg.sampling.runs = ml_collections.ConfigDict({
            "pc_250": {"method": "pc", "steps": 125, "snr": 0.16},
            "em_300": {"method": "em", "steps": 300},
            "ddim_100": {"method": "ddim", "steps": 100},
            "ode_1e-3": {"method": "ode", "rtol": 1e-3, "atol": 1e-3},
            "ode_1e-5": {"method": "ode", "rtol": 1e-5, "atol": 1e-5},
        })
        # CaloScore v2's schedule: 512 -> 256 -> ... -> 1 steps.
        cfg.distill = distill_section(rounds=9, teacher_steps=512, num_steps=20_000, learning_rate=1e-4,
                                      sample_steps=(8, 4, 2, 1), warmup_steps=500,
                                      checkpoint_every=5000, ema_decay=0.999)
    return cfg
