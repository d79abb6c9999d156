"""Lorenz-driven Poisson spike trains (the LangevinFlow / LFADS synthetic benchmark).

A Lorenz system (sigma 10, rho 28, beta 8/3) is integrated with RK4 (step ``dt``) from a random
point on the attractor (after a burn-in); every ``bin_steps`` integration steps make one time
bin. The standardised latent x (3,) drives ``n_neurons`` log-linear neurons,
``rate = exp(W x + b)`` (spikes per bin; ``W`` ~ N(0, weight_scale^2 / 3), ``b`` = log of
``base_rate``, fixed per ``neuron_seed``), and the counts are Poisson(rate).

``lorenz_spike_trains(n_trials, n_bins, seed=..., split=...)`` returns a :class:`SpikeTrains`
with ``spikes`` (n, T, N) int, ``rates`` (n, T, N), ``latents`` (n, T, 3, standardised),
``states`` (n, T, 3, raw Lorenz coordinates) and the readout ``weights``/``bias``. Deterministic
in (seed, split); train and test splits are independent draws. Not a token task: used directly
by latent-dynamics models (co-bps against the per-neuron mean-rate null model).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sequence_task import check_float_option, check_int_option, task_rng

SIGMA, RHO, BETA = 10.0, 28.0, 8.0 / 3.0
#: mean and std of the attractor's coordinates (long-run), used to standardise the latents
_MEAN = np.array([0.0, 0.0, 23.5])
_STD = np.array([7.9, 9.0, 8.6])


def lorenz_field(state: np.ndarray) -> np.ndarray:
    x, y, z = state[..., 0], state[..., 1], state[..., 2]
    return np.stack([SIGMA * (y - x), x * (RHO - z) - y, x * y - BETA * z], axis=-1)


def rk4_step(state: np.ndarray, dt: float) -> np.ndarray:
    k1 = lorenz_field(state)
    k2 = lorenz_field(state + 0.5 * dt * k1)
    k3 = lorenz_field(state + 0.5 * dt * k2)
    k4 = lorenz_field(state + dt * k3)
    return state + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)


@dataclass
class SpikeTrains:
    spikes: np.ndarray
    rates: np.ndarray
    latents: np.ndarray
    states: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    bin_seconds: float


def lorenz_spike_trains(n_trials: int, n_bins: int = 50, n_neurons: int = 30, *, seed: int = 0,
                        split: str = "train", dt: float = 0.01, bin_steps: int = 1,
                        base_rate: float = 0.3, weight_scale: float = 1.0, burn_in: int = 500,
                        neuron_seed: int = 0) -> SpikeTrains:
    n_trials = check_int_option("n_trials", n_trials, 1)
    n_bins = check_int_option("n_bins", n_bins, 1)
    n_neurons = check_int_option("n_neurons", n_neurons, 1)
    bin_steps = check_int_option("bin_steps", bin_steps, 1)
    burn_in = check_int_option("burn_in", burn_in, 0)
    dt = check_float_option("dt", dt, 1e-6, 0.05)
    base_rate = check_float_option("base_rate", base_rate, 1e-6, 1e6)
    rng = task_rng(f"lorenz_spikes(neurons={n_neurons},dt={dt},bin={bin_steps})", seed, split,
                   n_bins)
    state = np.array([1.0, 1.0, 25.0]) + rng.normal(0, 5.0, size=(n_trials, 3))
    for _ in range(burn_in):
        state = rk4_step(state, dt)
    states = np.empty((n_trials, n_bins, 3))
    for t in range(n_bins):
        for _ in range(bin_steps):
            state = rk4_step(state, dt)
        states[:, t] = state
    latents = (states - _MEAN) / _STD
    neuron_rng = np.random.default_rng(neuron_seed)
    weights = neuron_rng.normal(0, weight_scale / np.sqrt(3), size=(3, n_neurons))
    bias = np.full(n_neurons, np.log(base_rate))
    rates = np.exp(latents @ weights + bias)
    spikes = rng.poisson(rates)
    return SpikeTrains(spikes, rates, latents, states, weights, bias, dt * bin_steps)
