"""Active elicitation: which pair to ask a user next, one at a time, given the answers so far.

A *pool* holds P candidate pairs (a_p, b_p), unordered and not yet answered. The pairs asked so far and
the user's answers (True: the user preferred a) are the user's context D^C. A strategy scores every
candidate still available; the best one is asked (exact ties are broken at random with the caller's
``numpy`` generator, so a seed gives the same queries every time).

Strategies (:data:`STRATEGIES`):

* ``random`` — uniform over the available candidates (the paper's context pairs).
* ``uncertainty`` — the predictive entropy H[p̄], p̄ = P(a ≻ b | D^C). Cheap and model-agnostic, but it
  also asks pairs that are a coin flip for *every* user (Bradley-Terry noise, near-ties).
* ``info-gain`` — the expected information gain about the user's latent z (BALD, Houlsby et al., 2011):
  I(answer; z | D^C) = H[E_z p_z] − E_z H[p_z]. High only where the plausible users disagree. The
  samples z are the variational model's fixed predictive draws z_s ~ q(z | D^C) (vnp-btl), or, for a
  deterministic NP-BTL, the members of an ensemble (pass a list of models trained with different seeds;
  a single deterministic model has no spread over z and is refused).
* ``bayes-greedy`` — the yardstick for simulated populations with discrete modes: the exact posterior
  p(m | D^C) (:mod:`steerable.bayes`) and a one-step look-ahead that asks the pair maximising the
  expected Bayes-posterior accuracy on the pool's other pairs, Σ_y P(y | D^C) · acc(D^C ∪ {y}); ties go to
  the larger mutual information I(answer; m | D^C), then at random. It needs the population and the
  options' true features (for text: the attributes), not a model.

Shapes: B users, P candidates, k asked, D option size, S samples of z (or ensemble members).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from steerable.data.simulate import Population
from steerable.errors import ConfigError
from steerable.models.base import RewardModel
from steerable.models.neural_process import NPBTLRewardModel, VariationalNPBTLRewardModel
from steerable.utils.modules import eval_mode

STRATEGIES = ("random", "uncertainty", "info-gain", "bayes-greedy")
Predictor = RewardModel | Sequence[RewardModel]  # one model, or an ensemble of models
_TIE = 1e-6  # scores closer than this to the best count as ties (broken at random)
_CELLS = 1 << 24  # elements of the largest (S, B, N, H) intermediate computed at once


# ---- the model's view: per-sample choice probabilities ----------------------------------------------
def members(predictor: Predictor) -> list[RewardModel]:
    """The models of an ensemble (a single model is an ensemble of one)."""
    models = [predictor] if isinstance(predictor, RewardModel) else list(predictor)
    if not models:
        raise ConfigError("an ensemble needs at least one model")
    dims = {m.config.input_dim for m in models}
    if len(dims) > 1:
        raise ConfigError(f"the ensemble's models take options of different sizes: {sorted(dims)}")
    return models


def has_latent_spread(predictor: Predictor) -> bool:
    """Whether ``info-gain`` is defined: a vnp-btl model, or an ensemble of two or more models."""
    models = members(predictor)
    return len(models) > 1 or isinstance(models[0], VariationalNPBTLRewardModel)


@torch.no_grad()
def member_probabilities(
    predictor: Predictor,
    context_chosen: Tensor,
    context_rejected: Tensor,
    options_a: Tensor,
    options_b: Tensor,
    context_mask: Tensor | None = None,
) -> Tensor:
    """P(a ≻ b | z_s) for every sample z_s of every member.

    Context (B, k, D) ×2 with an optional mask (B, k); pairs (B, N, D) ×2 -> (S, B, N), S = the
    variational model's predictive draws of z ~ q(z | D^C) (one per deterministic model), summed over
    the members. The mean over S is the (ensemble's) predictive P(a ≻ b | D^C).
    """
    mask = (
        context_mask if context_mask is not None else torch.ones(context_chosen.shape[:2], dtype=torch.bool)
    )
    out = [
        _member_probabilities(model, context_chosen, context_rejected, mask, options_a, options_b)
        for model in members(predictor)
    ]
    return torch.cat(out).double()  # (S, B, N)


def _member_probabilities(
    model: RewardModel, context_chosen: Tensor, context_rejected: Tensor, mask: Tensor, a: Tensor, b: Tensor
) -> Tensor:
    """One member's (S, B, N) P(a ≻ b | z_s), computed on the model's device, returned on the CPU."""
    device = model.device
    users, n = a.shape[:2]
    with eval_mode(model):
        latent = model.encode(context_chosen.to(device), context_rejected.to(device), mask.to(device))
        if not isinstance(model, NPBTLRewardModel):  # BTL, DPL: no latent, the model's own likelihood
            return model.preference(a.to(device), b.to(device), latent).prob_chosen.unsqueeze(0).cpu()
        assert latent is not None
        if isinstance(model, VariationalNPBTLRewardModel):
            z = model.samples(latent)  # (S, B, Z)
        else:
            z = latent.mean.unsqueeze(0)  # (1, B, Z)
        per_user = max(1, _CELLS // max(1, z.shape[0] * 2 * n * model.config.hidden_dim))
        parts = []
        for start in range(0, users, per_user):
            sl = slice(start, start + per_user)
            both = torch.cat([a[sl], b[sl]], dim=1).to(device)  # (b', 2N, D)
            r = model.decoder(model.standardize(both), z[:, sl])  # (S, b', 2N)
            parts.append(torch.sigmoid(r[..., :n] - r[..., n:]).cpu())  # (S, b', N)
        return torch.cat(parts, dim=1)


def binary_entropy(p: Tensor) -> Tensor:
    """H[p] = −p log p − (1 − p) log(1 − p) in nats, elementwise (0 at p ∈ {0, 1})."""
    p = p.double().clamp(1e-12, 1 - 1e-12)
    return -(p * p.log() + (1 - p) * (-p).log1p())


# ---- the state of B elicitations, and the strategies ----------------------------------------------
@dataclass
class ElicitationState:
    """B users, each with a pool of P candidate pairs of which k have been asked and answered."""

    pool_a: Tensor  # (B, P, D)
    pool_b: Tensor  # (B, P, D)
    asked: Tensor  # (B, k) long: pool index of each asked pair, in order
    answers: Tensor  # (B, k) bool: True when the user preferred a
    available: Tensor  # (B, P) bool: may still be asked
    extra_chosen: Tensor | None = None  # (B, E, D) answered pairs from outside the pool
    extra_rejected: Tensor | None = None  # (B, E, D)
    features_a: Tensor | None = None  # (B, P, F) the population's view of the options (bayes-greedy)
    features_b: Tensor | None = None  # (B, P, F)

    def context(self) -> tuple[Tensor, Tensor]:
        """The answered pairs as (chosen, rejected), (B, E + k, D) each."""
        idx = self.asked.unsqueeze(-1).expand(-1, -1, self.pool_a.shape[-1])  # (B, k, D)
        a, b = self.pool_a.gather(1, idx), self.pool_b.gather(1, idx)
        first = self.answers.unsqueeze(-1)
        chosen, rejected = torch.where(first, a, b), torch.where(first, b, a)
        if self.extra_chosen is not None and self.extra_rejected is not None:
            chosen = torch.cat([self.extra_chosen.to(chosen.dtype), chosen], dim=1)
            rejected = torch.cat([self.extra_rejected.to(rejected.dtype), rejected], dim=1)
        return chosen, rejected


Strategy = Callable[[ElicitationState, Any, "Population | None"], list[Tensor]]


def _random(state: ElicitationState, predictor: Any, population: Population | None) -> list[Tensor]:
    return []  # every available candidate ties; the pick is uniform


def _model_probs(state: ElicitationState, predictor: Any) -> Tensor:
    if predictor is None:
        raise ConfigError("this strategy needs a model")
    chosen, rejected = state.context()
    return member_probabilities(predictor, chosen, rejected, state.pool_a, state.pool_b)  # (S, B, P)


def _uncertainty(state: ElicitationState, predictor: Any, population: Population | None) -> list[Tensor]:
    return [binary_entropy(_model_probs(state, predictor).mean(0))]


def _info_gain(state: ElicitationState, predictor: Any, population: Population | None) -> list[Tensor]:
    if predictor is not None and not has_latent_spread(predictor):
        raise ConfigError(
            "info-gain needs uncertainty about the user's z: a vnp-btl model, or an ensemble of "
            "np-btl models trained with different seeds (a single deterministic model has none)"
        )
    p = _model_probs(state, predictor)  # (S, B, P)
    return [binary_entropy(p.mean(0)) - binary_entropy(p).mean(0)]


def mode_choice_probabilities(population: Population, a: Tensor, b: Tensor) -> Tensor:
    """(B, N, F) ×2 -> (B, N, M): P(a ≻ b | mode m) under the population's true rewards."""
    if not population.discrete:
        raise ConfigError(
            f"bayes-greedy needs a population with discrete modes; '{population.name}' has none"
        )
    from steerable.bayes import BayesOptimalPredictor

    return BayesOptimalPredictor(population)._choice_prob(a.double(), b.double())


def _bayes_greedy(state: ElicitationState, predictor: Any, population: Population | None) -> list[Tensor]:
    if population is None or state.features_a is None or state.features_b is None:
        raise ConfigError("bayes-greedy needs the simulated population and the options' true features")
    if state.extra_chosen is not None and state.extra_chosen.shape[1]:
        raise ConfigError("bayes-greedy reads answers to pool pairs only (no outside context)")
    choice = mode_choice_probabilities(population, state.features_a, state.features_b)  # (B, P, M)
    prior = torch.tensor(population.mode_probs, dtype=torch.float64)  # (M,)
    # p(m | D^C) from the answered pool pairs; a context no mode explains falls back to the prior.
    idx = state.asked.unsqueeze(-1).expand(-1, -1, choice.shape[-1])  # (B, k, M)
    asked = choice.gather(1, idx)
    lik = torch.where(state.answers.unsqueeze(-1), asked, 1 - asked).prod(dim=1)  # (B, M)
    joint = prior * lik
    joint = torch.where(joint.sum(-1, keepdim=True) > 0, joint, prior.expand_as(joint))
    post = joint / joint.sum(-1, keepdim=True)  # (B, M)
    targets = state.available.double()  # (B, P): the pairs still unknown stand in for the targets
    count = (targets.sum(-1, keepdim=True) - 1).clamp(min=1)  # (B, 1), excluding the candidate itself
    expected = torch.zeros(state.available.shape, dtype=torch.float64)
    step = max(1, _CELLS // max(1, choice.shape[0] * choice.shape[1]))
    for start in range(0, choice.shape[1], step):  # candidates q, in chunks
        cq = choice[:, start : start + step]  # (B, Q, M)
        for lik_q in (cq, 1 - cq):  # the two answers
            joint_q = post.unsqueeze(1) * lik_q  # (B, Q, M)
            prob_answer = joint_q.sum(-1)  # (B, Q)
            post_q = joint_q / prob_answer.clamp(min=1e-300).unsqueeze(-1)  # (B, Q, M)
            pred = torch.einsum("bqm,btm->bqt", post_q, choice)  # (B, Q, T=P)
            acc = (torch.maximum(pred, 1 - pred) * targets.unsqueeze(1)).sum(-1)  # (B, Q)
            own = (post_q * cq).sum(-1)  # the candidate itself, known once asked
            acc = acc - torch.maximum(own, 1 - own) * targets[:, start : start + step]
            expected[:, start : start + step] += prob_answer * acc / count
    mutual = binary_entropy((post.unsqueeze(1) * choice).sum(-1)) - (
        post.unsqueeze(1) * binary_entropy(choice)
    ).sum(-1)  # (B, P) I(answer; m | D^C)
    return [expected, mutual]


STRATEGY_FUNCTIONS: dict[str, Strategy] = {
    "random": _random,
    "uncertainty": _uncertainty,
    "info-gain": _info_gain,
    "bayes-greedy": _bayes_greedy,
}


def _pick(keys: list[Tensor], available: Tensor, rng: np.random.Generator) -> Tensor:
    """(B,) the available candidate with the best first key; near-ties go to the next key, then at random."""
    candidates = available.clone()
    for key in keys:
        key = key.double().masked_fill(~candidates, -np.inf)
        best = key.max(dim=1, keepdim=True).values
        candidates &= key >= best - _TIE
    noise = torch.from_numpy(rng.random(available.shape)).masked_fill(~candidates, -1.0)
    return noise.argmax(dim=1)


def strategy_scores(
    strategy: str, state: ElicitationState, predictor: Any = None, population: Population | None = None
) -> list[Tensor]:
    """The keys (each (B, P), larger is better, compared in order) that ``strategy`` ranks by."""
    if strategy not in STRATEGY_FUNCTIONS:
        raise ConfigError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    return STRATEGY_FUNCTIONS[strategy](state, predictor, population)


def elicit_batch(
    strategy: str,
    pool_a: Tensor,
    pool_b: Tensor,
    pool_answers: Tensor,
    num_queries: int,
    rng: np.random.Generator,
    predictor: Any = None,
    population: Population | None = None,
    features: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Simulated elicitation of B users at once: ask ``num_queries`` pairs each, one at a time.

    ``pool_answers`` (B, P) bool holds what each user would answer to each candidate (True: a ≻ b); a
    strategy only ever sees the answers to the pairs already asked. Returns the asked pool indices
    (B, num_queries), in order.
    """
    b, p = pool_a.shape[:2]
    if num_queries > p:
        raise ConfigError(f"cannot ask {num_queries} pairs from a pool of {p}")
    state = ElicitationState(
        pool_a=pool_a,
        pool_b=pool_b,
        asked=torch.zeros(b, 0, dtype=torch.long),
        answers=torch.zeros(b, 0, dtype=torch.bool),
        available=torch.ones(b, p, dtype=torch.bool),
        features_a=features[0] if features is not None else None,
        features_b=features[1] if features is not None else None,
    )
    rows = torch.arange(b)
    for _ in range(num_queries):
        pick = _pick(strategy_scores(strategy, state, predictor, population), state.available, rng)  # (B,)
        state.asked = torch.cat([state.asked, pick.unsqueeze(1)], dim=1)
        state.answers = torch.cat([state.answers, pool_answers[rows, pick].unsqueeze(1)], dim=1)
        state.available = state.available.clone()
        state.available[rows, pick] = False
    return state.asked


# ---- one user: the public API ---------------------------------------------------------------------
@dataclass
class Query:
    """The next pair to ask: its position in the pool and how the strategy rated every candidate."""

    index: int
    strategy: str
    score: float | None  # the asked pair's (first) score; None for random
    scores: np.ndarray  # (P,) first score of every candidate, NaN where not available (all NaN: random)


def _matrix(x: Any, dim: int | None, name: str) -> Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if t.ndim == 1 and dim == 1:
        t = t.unsqueeze(-1)
    if t.ndim != 2 or (dim is not None and t.shape[1] != dim):
        want = f"(N, {dim})" if dim is not None else "(N, D)"
        raise ConfigError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ConfigError(f"{name} contains NaN or infinity")
    return t


def select_next(
    predictor: Predictor | None,
    pool_a: Any,
    pool_b: Any,
    asked: Sequence[int] = (),
    answers: Sequence[bool] = (),
    strategy: str = "info-gain",
    rng: np.random.Generator | int | None = None,
    *,
    context_chosen: Any = None,
    context_rejected: Any = None,
    exclude: Sequence[int] = (),
    population: Population | None = None,
    pool_features: tuple[Any, Any] | None = None,
) -> Query:
    """The next pair to ask one user.

    Args:
        predictor: a trained model (NP-BTL or vnp-btl), or a list of models (an ensemble); None only for
            ``random`` and ``bayes-greedy``.
        pool_a, pool_b: (P, D) candidate pairs.
        asked, answers: pool indices asked so far and the answers (True: the user preferred a).
        context_chosen, context_rejected: (E, D) answered pairs from outside the pool (e.g. stored ones).
        exclude: pool indices that may not be asked (e.g. pairs the user has already answered).
        population, pool_features: bayes-greedy only: the simulated population and the options' true
            features (P, F) ×2 (the options themselves when omitted).
    """
    if strategy not in STRATEGY_FUNCTIONS:
        raise ConfigError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if strategy in ("uncertainty", "info-gain") and predictor is None:
        raise ConfigError(f"{strategy} needs a model")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    dim = members(predictor)[0].config.input_dim if predictor is not None else None
    a, b = _matrix(pool_a, dim, "pool_a"), _matrix(pool_b, dim, "pool_b")
    if a.shape != b.shape:
        raise ConfigError(f"pool_a {tuple(a.shape)} and pool_b {tuple(b.shape)} differ in shape")
    if len(asked) != len(answers):
        raise ConfigError(f"{len(asked)} asked pairs but {len(answers)} answers")
    p = len(a)
    bad = [i for i in [*asked, *exclude] if not 0 <= int(i) < p]
    if bad:
        raise ConfigError(f"pool index {bad[0]} out of range for a pool of {p} pairs")
    available = torch.ones(1, p, dtype=torch.bool)
    available[0, [int(i) for i in [*asked, *exclude]]] = False
    if not available.any():
        raise ConfigError("every candidate has been asked or excluded: nothing left to ask")
    extra = None
    if (context_chosen is None) != (context_rejected is None):
        raise ConfigError("give both context_chosen and context_rejected, or neither")
    if context_chosen is not None:
        extra = (
            _matrix(context_chosen, a.shape[1], "context_chosen"),
            _matrix(context_rejected, a.shape[1], "context_rejected"),
        )
        if extra[0].shape != extra[1].shape:
            raise ConfigError("context_chosen and context_rejected differ in shape")
    features = None
    if strategy == "bayes-greedy":
        if population is None:
            raise ConfigError("bayes-greedy needs the simulated population (population.json)")
        fa, fb = pool_features if pool_features is not None else (a, b)
        features = (_matrix(fa, None, "pool_features[0]")[None], _matrix(fb, None, "pool_features[1]")[None])
    state = ElicitationState(
        pool_a=a[None],
        pool_b=b[None],
        asked=torch.as_tensor([int(i) for i in asked], dtype=torch.long).reshape(1, -1),
        answers=torch.as_tensor([bool(x) for x in answers], dtype=torch.bool).reshape(1, -1),
        available=available,
        extra_chosen=extra[0][None] if extra is not None else None,
        extra_rejected=extra[1][None] if extra is not None else None,
        features_a=features[0] if features else None,
        features_b=features[1] if features else None,
    )
    keys = strategy_scores(strategy, state, predictor, population)
    index = int(_pick(keys, available, rng)[0])
    scores = np.full(p, np.nan)
    if keys:
        first = keys[0][0].double().numpy()
        scores[available[0].numpy()] = first[available[0].numpy()]
    return Query(index, strategy, None if not keys else float(scores[index]), scores)


@dataclass
class Elicitation:
    """What :func:`elicit` asked and heard."""

    asked: list[int]
    answers: list[bool]
    scores: list[float | None]


def elicit(
    predictor: Predictor | None,
    pool_a: Any,
    pool_b: Any,
    respond: Callable[[int], bool],
    num_queries: int,
    strategy: str = "info-gain",
    rng: np.random.Generator | int | None = None,
    **kwargs: Any,
) -> Elicitation:
    """Ask one user ``num_queries`` pairs, one at a time: ``respond(index)`` returns the user's answer to
    pool pair ``index`` (True: a ≻ b). Other keyword arguments go to :func:`select_next`."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    asked: list[int] = []
    answers: list[bool] = []
    scores: list[float | None] = []
    for _ in range(num_queries):
        query = select_next(predictor, pool_a, pool_b, asked, answers, strategy, rng, **kwargs)
        asked.append(query.index)
        answers.append(bool(respond(query.index)))
        scores.append(query.score)
    return Elicitation(asked, answers, scores)
