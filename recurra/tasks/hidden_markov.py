"""Emission sequences of a hidden Markov model, with the hidden state as the label.

The HMM (Torre et al.'s "RNNs emulating HMMs" setting) has ``n_states`` states that stay with
probability ``stay`` and otherwise move to one of the others uniformly, and ``n_outputs``
symbols emitted with probabilities drawn once from a Dirichlet(1) per state (seeded by
``matrix_seed``, so a task's HMM is fixed). The initial state is uniform.

Task: read the emissions, output at every position the current hidden state (``length`` = number
of steps). No model can be certain, so :meth:`HiddenMarkovTask.filter` gives the Bayes-optimal
answer (the forward algorithm's most probable current state); ``batch.info["bayes"]`` holds it,
so an evaluation can report how close a model gets to the optimum.
:meth:`HiddenMarkovTask.sample_hmm` returns raw (states, emissions) for generative uses.
"""

from __future__ import annotations

import numpy as np

from .sequence_task import (
    SequenceTask,
    TaskBatch,
    check_float_option,
    check_int_option,
    make_batch,
)


class HiddenMarkovTask(SequenceTask):
    name = "hmm"
    description = "infer the hidden state of a sticky HMM from its emissions (Bayes-optimal reference)"
    length_meaning = "number of steps"
    primary_metric = "token"
    default_train_length = 32
    default_test_lengths = (16, 32, 64, 128)

    def __init__(self, n_states: int = 3, n_outputs: int = 3, stay: float = 0.95,
                 matrix_seed: int = 0):
        self.n_states = check_int_option("n_states", n_states, 2, 64)
        self.n_outputs = check_int_option("n_outputs", n_outputs, 2, 1024)
        self.stay = check_float_option("stay", stay, 0.0, 1.0)
        self.matrix_seed = check_int_option("matrix_seed", matrix_seed, 0)
        s = self.n_states
        self.transition = np.full((s, s), (1 - self.stay) / (s - 1))
        np.fill_diagonal(self.transition, self.stay)
        self.emission = np.random.default_rng(self.matrix_seed).dirichlet(
            np.ones(self.n_outputs), size=s)
        self.initial = np.full(s, 1.0 / s)
        self.vocab_size = max(self.n_states, self.n_outputs)

    def options(self):
        return {"n_states": self.n_states, "n_outputs": self.n_outputs, "stay": self.stay,
                "matrix_seed": self.matrix_seed}

    def sequence_length(self, length: int) -> int:
        return length

    def sample_hmm(self, n: int, length: int, rng: np.random.Generator):
        """``states``, ``emissions``: (n, length) int arrays drawn from the HMM."""
        states = np.empty((n, length), dtype=np.int64)
        emissions = np.empty((n, length), dtype=np.int64)
        cum_t = np.cumsum(self.transition, axis=1)
        cum_e = np.cumsum(self.emission, axis=1)
        state = rng.choice(self.n_states, size=n, p=self.initial)
        for t in range(length):
            if t:
                state = (rng.random((n, 1)) > cum_t[state]).sum(axis=1)
            state = np.minimum(state, self.n_states - 1)
            states[:, t] = state
            out = (rng.random((n, 1)) > cum_e[state]).sum(axis=1)
            emissions[:, t] = np.minimum(out, self.n_outputs - 1)
        return states, emissions

    def filter(self, emissions: np.ndarray) -> np.ndarray:
        """Forward algorithm: p(state_t | emissions_1..t), shape (n, T, n_states)."""
        n, steps = emissions.shape
        out = np.empty((n, steps, self.n_states))
        belief = np.broadcast_to(self.initial, (n, self.n_states))
        for t in range(steps):
            prior = belief if t == 0 else belief @ self.transition
            post = prior * self.emission[:, emissions[:, t]].T
            belief = post / post.sum(axis=1, keepdims=True)
            out[:, t] = belief
        return out

    def _generate(self, n: int, length: int, rng: np.random.Generator) -> TaskBatch:
        states, emissions = self.sample_hmm(n, length, rng)
        bayes = self.filter(emissions).argmax(axis=2)
        return make_batch(emissions, states, np.ones_like(states, dtype=bool), self.vocab_size,
                          bayes=bayes)
