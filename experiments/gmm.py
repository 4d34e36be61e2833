"""Toy experiment: a ResMLP score model of a 2-D Gaussian mixture, sampled with every method.

    python experiments/main.py --config=experiments/gmm.py --workdir=runs/gmm
    python experiments/main.py --config=experiments/gmm.py:tiny   # seconds, used by tests

The mixture's exact score and density make every number checkable against the truth. The default
trains the teacher, distils it from 256 DDIM steps down to 1 (progressive distillation, eight
rounds) and samples every student beside the teacher's own DDIM at the same number of steps; W1
is measured against the mixture itself (a 400k-point reference sample), so the floor is that of
a perfect sampler with 20,000 samples.
"""

import ml_collections

from fpcd.config import distill_section, train_section


def get_config(variant: str = ""):
    cfg = ml_collections.ConfigDict()
    cfg.experiment = "gmm"
    cfg.name = "gmm" + (f"_{variant}" if variant else "")
    cfg.seed = 0

    cfg.data = ml_collections.ConfigDict()
    cfg.data.dim = 2
    cfg.data.num_train = 20_000
    cfg.data.num_test = 10_000

    cfg.sde = ml_collections.ConfigDict()
    cfg.sde.beta_min = 0.1
    cfg.sde.beta_max = 20.0
    cfg.sde.schedule = "linear"

    cfg.model = ml_collections.ConfigDict()
    cfg.model.width = 96
    cfg.model.depth = 3
    cfg.model.fourier_scale = 16.0

    # v-prediction (distillation needs a v-prediction teacher), EMA 0.995, three checkpoints kept.
    cfg.train = train_section(num_steps=3000, batch_size=512, learning_rate=2e-3, warmup_steps=100,
                              checkpoint_every=500,
                              ema_decay=0.995, prediction="v")
    cfg.train.keep_checkpoints = 3

    cfg.sampling = ml_collections.ConfigDict()
    cfg.sampling.num_samples = 20_000  # enough that the W1 of a few-step student stands above the noise
    cfg.sampling.batch_size = 10_000
    cfg.sampling.runs = ml_collections.ConfigDict(
        {
            "em_100": {"method": "em", "steps": 100},
            "em_500": {"method": "em", "steps": 500},
            "pc_100": {"method": "pc", "steps": 50, "snr": 0.16},
            "dpmpp_2m_8": {"method": "dpmpp_2m", "steps": 8},
            "heun_15": {"method": "heun", "steps": 8},
            "ddim_20": {"method": "ddim", "steps": 20},
            "ode_1e-3": {"method": "ode", "rtol": 1e-3, "atol": 1e-3},
            "ode_1e-5": {"method": "ode", "rtol": 1e-5, "atol": 1e-5},
        }
    )

    # Progressive distillation: 256 -> 128 -> ... -> 1 DDIM steps; every student sampled.
    cfg.distill = distill_section(rounds=8, teacher_steps=256, num_steps=1000, learning_rate=3e-4,
                                  sample_steps=(128, 64, 32, 16, 8, 4, 2, 1), warmup_steps=50)

    cfg.eval = ml_collections.ConfigDict({"evaluators": ("w1", "likelihood")})  # fpcd.experiments.gmm

    if variant == "tiny":
        cfg.data.num_train = 4096
        cfg.data.num_test = 2000
        cfg.model.width = 64
        cfg.model.depth = 2
        cfg.train.num_steps = 500  # enough to beat the prior clearly (W1 ~0.12 vs 0.31), which the tests check
        cfg.train.batch_size = 256
        cfg.train.learning_rate = 3e-3
        cfg.train.warmup_steps = 20
        cfg.train.log_every = 50
        cfg.train.checkpoint_every = 250
        cfg.sampling.num_samples = 1000
        cfg.sampling.batch_size = 500
        cfg.sampling.runs = ml_collections.ConfigDict(
            {
                "em_20": {"method": "em", "steps": 20},
                "pc_20": {"method": "pc", "steps": 10},
                "ddim_10": {"method": "ddim", "steps": 10},
                "ode_1e-3": {"method": "ode", "rtol": 1e-3, "atol": 1e-3},
            }
        )
        cfg.distill = distill_section(rounds=3, teacher_steps=8, num_steps=400, learning_rate=2e-3,
                                      sample_steps=(4, 1), warmup_steps=20, log_every=100,
                                      checkpoint_every=200)
    elif variant:
        raise ValueError(f"experiments/gmm.py: unknown variant {variant!r}; expected '' or 'tiny'")
    return cfg
