"""The adaptive KL controller of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences", eq. 2),
as OpenRLHF runs it for PPO (YuLan-Mini-Instruct: initial coefficient 0.01, target KL 0.06).

After each update over `n_steps` samples with measured KL `kl`:

    error = clip(kl / target - 1, -0.2, 0.2)
    beta <- beta * (1 + error * n_steps / horizon)

so beta grows while the policy drifts further from the reference than `target`, and shrinks while it stays closer.
trl's GRPOTrainer keeps its KL coefficient `beta` fixed; `AdaptiveKLController` is the callback state that a
trainer reads its `beta` from before each step and updates after each logged KL. Being an `ExportableState`, its
value is saved in every checkpoint's trainer_state.json and restored on resume.
"""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

PROPORTIONAL_ERROR_CLIP = 0.2  # Ziegler et al. 2019 / OpenRLHF


class AdaptiveKLController(TrainerCallback, ExportableState):
    def __init__(self, init_kl_coef: float, target: float, horizon: int = 10000, value: float | None = None,
                 samples_seen: int = 0):
        if init_kl_coef <= 0 or target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs positive init_kl_coef, target and horizon; got {init_kl_coef}, "
                             f"{target}, {horizon}")
        self.init_kl_coef, self.target, self.horizon = init_kl_coef, target, horizon
        self.value = init_kl_coef if value is None else value
        self.samples_seen = samples_seen

    def update(self, kl: float, n_steps: int) -> float:
        """The new coefficient after `n_steps` samples at measured KL `kl`."""
        error = min(max(kl / self.target - 1.0, -PROPORTIONAL_ERROR_CLIP), PROPORTIONAL_ERROR_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon
        self.samples_seen += n_steps
        return self.value

    def state(self) -> dict:
        return {"args": {"init_kl_coef": self.init_kl_coef, "target": self.target, "horizon": self.horizon},
                "attributes": {"value": self.value, "samples_seen": self.samples_seen}}
