"""The paper's studies, one function (and one ``steerable experiment NAME`` command) each."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Study:
    """Where a study lives: ``module.function(out_dir, seed=..., config=..., overwrite=..., **kwargs)``."""

    module: str
    config: str
    function: str
    help: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def load(self) -> tuple[type, Any]:
        module = importlib.import_module(f"steerable.experiments.{self.module}")
        return getattr(module, self.config), getattr(module, self.function)


STUDIES: dict[str, Study] = {
    "synthetic": Study(
        "synthetic",
        "SyntheticConfig",
        "run_synthetic",
        "Example 4.1 / Figure 1: BTL, DPL and NP-BTL on two hidden modes (~2 min)",
    ),
    "gaussian": Study(
        "gaussian",
        "GaussianConfig",
        "run_gaussian",
        "Example 4.3 / Figure 4: identifiability vs correlation (~4 min)",
    ),
    "hh": Study(
        "modes",
        "ModesConfig",
        "run_modes",
        "Figures 2a, 3: two user types on real text (~5 min; ~1.5 min with the embedding cache warm)",
        {"study_name": "hh", "num_modes": 2},
    ),
    "three-modes": Study(
        "modes",
        "ModesConfig",
        "run_modes",
        "Figures 6a, 7: three user types on real text (~1.5 min with the embedding cache warm)",
        {"study_name": "three-modes", "num_modes": 3},
    ),
    "conflict-rate": Study(
        "conflict_rate",
        "ConflictRateConfig",
        "run_conflict_rate",
        "Figure 5: training and context conflict rates on real text (~3 min)",
    ),
    "npdpo-synthetic": Study(
        "npdpo_synthetic",
        "NPDPOSyntheticConfig",
        "run_npdpo_synthetic",
        "NP-DPO vs BTL-DPO on synthetic text with a known answer, steered generation (~5 min on CPU)",
    ),
    "npdpo-hh": Study(
        "npdpo_hh",
        "NPDPOHHConfig",
        "run_npdpo_hh",
        "NP-DPO vs BTL-DPO on real text, two user types (GPU study; --smoke: a CPU run of minutes)",
    ),
    "npdpo-real": Study(
        "npdpo_real",
        "NPDPORealConfig",
        "run_npdpo_real",
        "NP-DPO on SmolLM2-135M and real text on a CPU: Figure 2b with oracles, steered generation, "
        "best-of-N with NP-BTL (~1 h on 2 cores; --smoke: minutes)",
    ),
    "active": Study(
        "active",
        "ActiveConfig",
        "run_active",
        "Active elicitation: accuracy vs pairs asked per strategy, Gaussian rho=0.5 and real text (~5 min)",
    ),
    "continuous": Study(
        "continuous",
        "ContinuousConfig",
        "run_continuous",
        "Figure 8: Dirichlet users over 2 and 3 attributes on real text (~3 min)",
    ),
}


def run_study(
    name: str, out_dir: Any, seed: int = 0, config: Any = None, overwrite: bool = False
) -> dict[str, Any]:
    """Run the study ``name`` (see :data:`STUDIES`) and return its results."""
    study = STUDIES[name]
    _, function = study.load()
    return function(out_dir=out_dir, seed=seed, config=config, overwrite=overwrite, **study.kwargs)
