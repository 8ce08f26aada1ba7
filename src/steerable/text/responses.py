"""Real responses with per-response attributes, their within-prompt pairs, and simulated users over them.

A :class:`ResponseTable` holds prompts, several responses per prompt and K attributes per response
(UltraFeedback's aspect ratings, or the offline benchmark's measured attributes). A :class:`PairPool`
holds every within-prompt pair of a set of prompts on which the attributes in use are known and not
tied. Users are a :class:`~steerable.data.simulate.Population` over those attributes (discrete modes,
or Dirichlet weights over standardised attributes); they answer pool pairs, and the answers become
preference data whose options are the responses' embeddings — the paper's setup (appendix C.2).

Splits are by prompt: a prompt's pairs are all in one split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from steerable.data.sampler import TaskBatch
from steerable.data.schema import PreferenceData
from steerable.data.simulate import Population
from steerable.data.text import Message
from steerable.errors import ConfigError, DataError


@dataclass
class ResponseTable:
    """Prompts, responses and per-response attributes (NaN where unknown)."""

    prompts: list[str]  # (P,)
    prompt_of: np.ndarray  # (R,) int: the prompt of each response
    responses: list[str]  # (R,)
    attributes: np.ndarray  # (R, K) float
    attribute_names: list[str]  # (K,)
    source: str = "<memory>"
    response_info: list[dict] = field(default_factory=list)  # (R,) e.g. which model wrote it

    def __post_init__(self) -> None:
        r = len(self.responses)
        if len(self.prompt_of) != r or self.attributes.shape != (r, len(self.attribute_names)):
            raise DataError("responses, prompt_of and attributes disagree in length", source=self.source)

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    def attribute_index(self, names: list[str]) -> list[int]:
        """Column indices of the named attributes (a clear error for unknown names)."""
        unknown = [n for n in names if n not in self.attribute_names]
        if unknown:
            raise ConfigError(f"unknown attribute(s) {unknown}; {self.source} has {self.attribute_names}")
        return [self.attribute_names.index(n) for n in names]

    def option_messages(self, response: int) -> list[Message]:
        """The option y = [x, ỹ] of one response, as a conversation."""
        return [
            {"role": "user", "content": self.prompts[self.prompt_of[response]]},
            {"role": "assistant", "content": self.responses[response]},
        ]

    def split_prompts(
        self, fractions: tuple[float, ...] = (0.8, 0.1, 0.1), seed: int = 0
    ) -> list[np.ndarray]:
        """Disjoint prompt-id sets in the given proportions (split by prompt, never by pair)."""
        if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) <= 0:
            raise ConfigError(f"split fractions must be positive and sum to 1, got {fractions}")
        perm = np.random.default_rng(seed).permutation(self.num_prompts)
        cuts = np.round(np.cumsum(fractions)[:-1] * self.num_prompts).astype(int)
        return [np.sort(part) for part in np.split(perm, cuts)]


@dataclass
class PairPool:
    """Within-prompt response pairs (a, b) with the attributes in use known and untied."""

    table: ResponseTable
    a: np.ndarray  # (N,) response index
    b: np.ndarray  # (N,) response index
    aspects: list[int]  # attribute columns in use

    @classmethod
    def build(
        cls, table: ResponseTable, prompt_ids: np.ndarray, aspects: list[str], drop_ties: bool = True
    ) -> PairPool:
        """All pairs of responses to the same prompt, for the prompts in ``prompt_ids``."""
        cols = table.attribute_index(aspects)
        values = table.attributes[:, cols]
        keep_prompt = np.zeros(table.num_prompts, dtype=bool)
        keep_prompt[prompt_ids] = True
        a_list, b_list = [], []
        order = np.argsort(table.prompt_of, kind="stable")
        bounds = np.flatnonzero(np.diff(table.prompt_of[order])) + 1
        for group in np.split(order, bounds):
            if not len(group) or not keep_prompt[table.prompt_of[group[0]]]:
                continue
            i, j = np.triu_indices(len(group), k=1)
            a_list.append(group[i])
            b_list.append(group[j])
        a = np.concatenate(a_list) if a_list else np.zeros(0, dtype=np.int64)
        b = np.concatenate(b_list) if b_list else np.zeros(0, dtype=np.int64)
        known = np.isfinite(values[a]).all(1) & np.isfinite(values[b]).all(1)
        untied = (values[a] != values[b]).all(1) if drop_ties else np.ones(len(a), dtype=bool)
        keep = known & untied
        return cls(table, a[keep], b[keep], cols)

    def __len__(self) -> int:
        return len(self.a)

    def values(self) -> tuple[np.ndarray, np.ndarray]:
        """Attributes in use of both sides: (N, K) each."""
        vals = self.table.attributes[:, self.aspects]
        return vals[self.a], vals[self.b]

    def conflicting(self, population: Population) -> np.ndarray:
        """(N,) bool: the population's reference reward functions disagree on the pair (Definition 4.2)."""
        va, vb = self.values()
        return population.is_conflicting(va, vb)

    def subset(self, keep: np.ndarray) -> PairPool:
        return PairPool(self.table, self.a[keep], self.b[keep], self.aspects)


def standardise(table: ResponseTable, aspects: list[str]) -> ResponseTable:
    """A copy whose attributes in use are replaced by their percentile rank in [0, 1] over all responses
    (ties share their mean rank), so Dirichlet weights mix comparable, bounded scales — a z-score would
    let heavy-tailed attributes such as word counts dominate every mixture. Orderings, ties and
    conflicts are unchanged."""
    from scipy.stats import rankdata

    attributes = table.attributes.copy()
    for c in table.attribute_index(aspects):
        col = attributes[:, c]
        ok = np.isfinite(col)
        attributes[ok, c] = (rankdata(col[ok]) - 0.5) / ok.sum()
    return ResponseTable(
        table.prompts,
        table.prompt_of,
        table.responses,
        attributes,
        table.attribute_names,
        table.source,
        table.response_info,
    )


def _draw_pairs(
    pool_size: int, conflicting: np.ndarray, n: int, conflict_rate: float | None, rng: np.random.Generator
) -> np.ndarray:
    """Indices of ``n`` distinct pool pairs, of which ``conflict_rate · n`` are conflicting — rounded at
    random (⌊c·n⌋ or ⌈c·n⌉) so that the expected share is exactly ``conflict_rate`` even for small n."""
    if conflict_rate is None:
        if n > pool_size:
            raise DataError(f"a user needs {n} pairs but the pool has {pool_size}")
        return rng.choice(pool_size, size=n, replace=False)
    k = int(np.floor(conflict_rate * n))
    k += int(rng.random() < conflict_rate * n - k)
    yes, no = np.flatnonzero(conflicting), np.flatnonzero(~conflicting)
    if k > len(yes) or n - k > len(no):
        raise DataError(
            f"cannot draw {k} conflicting and {n - k} non-conflicting pairs from a pool with "
            f"{len(yes)} and {len(no)}"
        )
    picks = np.concatenate(
        [rng.choice(yes, size=k, replace=False), rng.choice(no, size=n - k, replace=False)]
    )
    return rng.permutation(picks)


def simulate_pool_users(
    pool: PairPool,
    embeddings: np.ndarray,
    population: Population,
    num_users: int,
    pairs_per_user: int,
    conflict_rate: float | None = None,
    seed: int = 0,
    user_prefix: str = "user",
    reference: Population | None = None,
) -> PreferenceData:
    """Users of ``population`` answering ``pairs_per_user`` pool pairs each, as preference data whose
    options are the responses' embeddings (R, D) and whose prompts are the prompt texts. Conflicts are
    judged by ``reference`` (default: ``population``), e.g. all user types while only one type answers."""
    rng = np.random.default_rng(seed)
    modes, weights = population.sample_users(num_users, rng)
    conflicting = pool.conflicting(reference or population)
    va, vb = pool.values()
    rows = np.stack(
        [_draw_pairs(len(pool), conflicting, pairs_per_user, conflict_rate, rng) for _ in range(num_users)]
    )
    flat = rows.reshape(-1)
    user_of_row = np.repeat(np.arange(num_users), pairs_per_user)
    first = population.choose(va[flat], vb[flat], weights[user_of_row], rng)
    chosen = np.where(first, pool.a[flat], pool.b[flat])
    rejected = np.where(first, pool.b[flat], pool.a[flat])
    width = len(str(num_users - 1))
    prompt_ids = pool.table.prompt_of[pool.a[flat]]
    return PreferenceData(
        user_ids=np.array([f"{user_prefix}{u:0{width}d}" for u in user_of_row], dtype=object),
        chosen=embeddings[chosen],
        rejected=embeddings[rejected],
        prompts=np.array([pool.table.prompts[p] for p in prompt_ids], dtype=object),
        hidden_mode=modes[user_of_row] if population.discrete else None,
        hidden_z=None if population.discrete else weights[user_of_row].astype(np.float32),
        source=f"<{pool.table.source}: simulated users>",
    )


def pool_tasks(
    pool: PairPool,
    embeddings: np.ndarray,
    population: Population,
    num_tasks: int,
    num_context: int,
    num_targets: int,
    context_conflict_rate: float | None,
    target_conflict_rate: float | None,
    seed: int = 0,
) -> TaskBatch:
    """Evaluation tasks drawn straight from the pool: each task is a fresh user whose ``num_context``
    context pairs and ``num_targets`` target pairs (all scored, disjoint from the context) have their own
    conflict rates — e.g. Figure 5's varying context conflict rate with fully conflicting targets."""
    rng = np.random.default_rng(seed)
    modes, weights = population.sample_users(num_tasks, rng)
    conflicting = pool.conflicting(population)
    va, vb = pool.values()
    ctx = np.zeros((num_tasks, num_context), dtype=np.int64)
    tgt = np.zeros((num_tasks, num_targets), dtype=np.int64)
    for t in range(num_tasks):
        c = _draw_pairs(len(pool), conflicting, num_context, context_conflict_rate, rng)
        rest = np.ones(len(pool), dtype=bool)
        rest[c] = False
        pick = _draw_pairs(int(rest.sum()), conflicting[rest], num_targets, target_conflict_rate, rng)
        ctx[t], tgt[t] = c, np.flatnonzero(rest)[pick]

    def answer(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        flat = idx.reshape(-1)
        w = np.repeat(weights, idx.shape[1], axis=0)
        first = population.choose(va[flat], vb[flat], w, rng)
        ch = np.where(first, pool.a[flat], pool.b[flat]).reshape(idx.shape)
        rj = np.where(first, pool.b[flat], pool.a[flat]).reshape(idx.shape)
        return torch.from_numpy(embeddings[ch]), torch.from_numpy(embeddings[rj])

    cc, cr = answer(ctx)
    tc, tr = answer(tgt)
    return TaskBatch(
        context_chosen=cc,
        context_rejected=cr,
        context_mask=torch.ones(num_tasks, num_context, dtype=torch.bool),
        target_chosen=tc,
        target_rejected=tr,
        target_mask=torch.ones(num_tasks, num_targets, dtype=torch.bool),
        target_in_context=torch.zeros(num_tasks, num_targets, dtype=torch.bool),
        user_index=torch.arange(num_tasks),
        hidden_mode=torch.from_numpy(modes),
    )
