"""A synthetic token source for tests and the `synthetic_markov` data source (no corpus to fetch).

A sparse first-order Markov chain: every token has `branching` possible
successors. A model can learn it well below the unigram entropy (the source
states both entropies), which makes "the loss falls" a real check.
"""

from __future__ import annotations

import numpy as np


class MarkovSource:
    def __init__(self, vocab_size: int, branching: int = 4, seed: int = 0):
        if not 1 <= branching <= vocab_size:
            raise ValueError(f"branching={branching} must be in [1, vocab_size={vocab_size}].")
        rng = np.random.default_rng(seed)
        self.vocab_size, self.seed = vocab_size, seed
        self.successors = np.stack([rng.choice(vocab_size, branching, replace=False) for _ in range(vocab_size)])
        self.probs = rng.dirichlet(np.ones(branching), size=vocab_size)
        transition = np.zeros((vocab_size, vocab_size))
        np.put_along_axis(transition, self.successors, self.probs, axis=1)
        eigvals, eigvecs = np.linalg.eig(transition.T)
        stationary = np.abs(np.real(eigvecs[:, np.argmin(np.abs(eigvals - 1))]))
        self.stationary = stationary / stationary.sum()
        self._cum = np.cumsum(self.probs, axis=1)

    def unigram_entropy(self) -> float:
        """Entropy (nats) of the stationary token distribution: the loss of a model that ignores context."""
        p = self.stationary[self.stationary > 0]
        return float(-(p * np.log(p)).sum())

    def conditional_entropy(self) -> float:
        """Entropy rate (nats/token): the best achievable loss."""
        h = -(self.probs * np.log(np.maximum(self.probs, 1e-30))).sum(1)
        return float((self.stationary * h).sum())

    def rows(self, step: int, rows: slice, length: int) -> np.ndarray:
        """Rows `rows` of the global batch at `step`, [n, length] int32, each row from its own seed,
        so every host computes exactly its own share and any split of the batch agrees."""
        out = np.empty((rows.stop - rows.start, length), np.int32)
        for r, row in enumerate(range(rows.start, rows.stop)):
            rng = np.random.default_rng((self.seed, step, row))
            token = rng.choice(self.vocab_size, p=self.stationary)
            u = rng.random(length)
            for i in range(length):
                out[r, i] = token
                token = self.successors[token, np.searchsorted(self._cum[token], u[i] * self._cum[token, -1])]
        return out
