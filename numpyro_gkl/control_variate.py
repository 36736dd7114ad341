r"""Control-variate coefficients for ``TraceAnalytic_ELBO(kl="adaptive")``: leave one out, running.

For particle i let gᵢ ∈ ℝᴾ be the gradient of the analytic-KL ELBO estimate and dᵢ,ₛ ∈ ℝᴾ the
gradient of site s's difference (sampled term − closed-form term), s = 1…S. Each dₛ has mean zero
(both terms have the same expectation at every parameter value), so

    hᵢ = gᵢ + Σₛ cₛ dᵢ,ₛ

is unbiased for every c that does not depend on particle i's draw. c = 0 is the analytic
estimator, c = 1 the sampled one (``Trace_ELBO``). The c minimizing the summed variance
Σ_params Var(h) solves M c = −b with M = E[Eᵀ E]ₛₜ = E[dₛ · dₜ] and bₛ = Cov(dₛ, g). For particle i
both are estimated from the other particles only (leave one out), centred on their mean:

    M₋ᵢ = Σ_{j≠i} Eⱼ Eⱼᵀ,   b₋ᵢ = (n/(n−1)) Σ_{j≠i} Eⱼ (gⱼ − ḡ₋ᵢ),   c₋ᵢ = −(M₋ᵢ + λI)⁻¹ b₋ᵢ,

n = N − 1 the other particles. M needs no centring (E[d] = 0 is known); b is centred on the
others' mean, and n/(n − 1) undoes the shrinkage that centring on n draws causes (without it c
is pulled towards 0 by (n − 1)/n, a third at N = 4). A ridge λ = 10⁻⁶ tr(M₋ᵢ)/S only matters when
a difference is (numerically) zero. Each cₛ is then multiplied by max(0, 1 − V̂ar(bₛ)/bₛ²), with
V̂ar(bₛ) from the spread of the others' shares of bₛ: with three other particles an unshrunk c
costs about 6% extra variance where the closed form is clearly better (eight schools at the
optimum); shrunk, it does not (``benchmarks/gradient_variance.py``). Everything is a function of
the other particles, so cᵢ is independent of particle i and the average of the hᵢ is exactly
unbiased. Cost: O(N² S P) for the moments and O(N S³) for the solves, N particles, negligible
next to the N gradients.

**Running moments** (``running_coefficients``, with the state of
``numpyro_gkl.with_adaptive_state``). With the particle averages ḡ and d̄ₛ of one step,
b̂ₛ = d̄ₛ · ḡ and M̂ₛₜ = d̄ₛ · d̄ₜ are unbiased for bₛ = Σ_params Cov(d̄ₛ, ḡ) and Mₛₜ = E[d̄ₛ · d̄ₜ]
without any centring, because E[d̄ₛ] = 0 (E[d̄ₛ · ḡ] = Σ Cov + E[d̄ₛ] · E[ḡ]); averaging over N
particles divides both by N, so c = −M⁻¹b is the same. The moments are refreshed on every
step; the coefficients of step t are fitted on λ-weighted sums of b̂ and M̂ over the steps
τ before t, weights wτ = λ^(t−1−τ):

    b̄ = Σ wτ b̂τ / Σ wτ,   M̄ = Σ wτ M̂τ / Σ wτ,   c = −(M̄ + λ_r I)⁻¹ b̄ · max(0, 1 − V̂ar(b̄ₛ)/b̄ₛ²),

with V̂ar(b̄ₛ) = (Σ wτ b̂²ₛ,τ / Σ wτ − b̄ₛ²) / (n_eff − 1), n_eff = (Σ wτ)² / Σ wτ² (before two
steps c = 0, the analytic estimator). c depends on earlier steps' draws only, which
are independent of step t's, so E[cₛ d̄ₛ] = E[cₛ] E[d̄ₛ] = 0 given the past: the estimator is exactly
unbiased, for any N ≥ 1. Cost: O(S³), nothing per particle.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array

# Leave-one-out with centring needs two other particles.
MIN_PARTICLES = 3
_RIDGE = 1e-6


def _solve_ridged(m: Array, b: Array) -> Array:
    """(M + λI)⁻¹ b for symmetric positive semi-definite M (… × S × S), λ = 10⁻⁶ tr(M)/S.

    Gauss–Jordan elimination unrolled over the S pivots (no pivoting is needed for a symmetric
    positive definite matrix): S is the number of sites, small, and the elementwise steps fuse
    into a few XLA kernels where a LAPACK call would cost more than the arithmetic. Cost: O(S³).
    """
    s = m.shape[-1]
    ridge = _RIDGE * jnp.trace(m, axis1=-2, axis2=-1) / s + jnp.finfo(m.dtype).tiny
    a = jnp.concatenate([m + ridge[..., None, None] * jnp.eye(s, dtype=m.dtype), b[..., None]], -1)
    for k in range(s):
        row = a[..., k : k + 1, :] / a[..., k : k + 1, k : k + 1]
        a = a - a[..., :, k : k + 1] * row
        a = a.at[..., k : k + 1, :].set(row)
    return a[..., -1]


def loo_coefficients(g: Array, e: Array) -> Array:
    """Per-particle coefficients c₋ᵢ (N × S) from gradients ``g`` (N × P) and ``e`` (N × S × P)."""
    n = g.shape[0]
    if n < MIN_PARTICLES:
        raise ValueError(f"leave-one-out coefficients need at least {MIN_PARTICLES} particles")
    m_each = jnp.einsum("nsp,ntp->nst", e, e)
    eg_each = jnp.einsum("nsp,np->ns", e, g)
    m_loo = jnp.sum(m_each, 0) - m_each
    # Σ_{j≠i} Eⱼ(gⱼ − ḡ₋ᵢ) = Σ_{j≠i} Eⱼgⱼ − (Σ_{j≠i} Eⱼ) ḡ₋ᵢ
    e_loo = jnp.sum(e, 0) - e
    g_loo_mean = (jnp.sum(g, 0) - g) / (n - 1)
    b_loo = (jnp.sum(eg_each, 0) - eg_each) - jnp.einsum("nsp,np->ns", e_loo, g_loo_mean)
    b_loo = b_loo * (n - 1) / (n - 2)
    # Shrink each coefficient towards 0 by the noise of its b: r[i, j] = Eⱼ(gⱼ − ḡ₋ᵢ) is particle
    # j's share of b₋ᵢ (masked out for j = i), b = k Σⱼ rⱼ over the n − 1 others with
    # k = (n−1)/(n−2), so Var(b) = k²(n−1) Var(r) ≈ k³ Σⱼ (rⱼ − r̄)².
    others = (1.0 - jnp.eye(n, dtype=g.dtype))[..., None]
    r = (eg_each[None] - jnp.einsum("jsp,ip->ijs", e, g_loo_mean)) * others
    r_mean = jnp.sum(r, 1, keepdims=True) / (n - 1)
    var_b = ((n - 1) / (n - 2)) ** 3 * jnp.sum(jnp.square(r - r_mean) * others, 1)
    b_sq = jnp.maximum(jnp.square(b_loo), jnp.finfo(g.dtype).tiny)
    return -_solve_ridged(m_loo, b_loo) * jnp.maximum(0.0, 1.0 - var_b / b_sq)


def running_coefficients(weight: Array, weight_sq: Array, b: Array, b_sq: Array, m: Array) -> Array:
    """Coefficients (S,) from λ-weighted sums over earlier steps (see the module docstring).

    ``weight`` = Σ wτ, ``weight_sq`` = Σ wτ², ``b`` and ``b_sq`` (S,) the weighted sums of b̂ and
    b̂², ``m`` (S × S) that of M̂. Zero before two steps. Cost: O(S³).
    """
    seen = weight > 0
    safe_weight = jnp.where(seen, weight, 1.0)
    b_mean = jnp.where(seen, b / safe_weight, 0.0)
    m_mean = jnp.where(seen, m / safe_weight, 0.0)
    n_eff = jnp.where(weight_sq > 0, weight**2 / jnp.where(weight_sq > 0, weight_sq, 1.0), 0.0)
    spread = jnp.maximum(b_sq / safe_weight - jnp.square(b_mean), 0.0)
    enough = n_eff > 1.0 + 1e-6
    var_mean = spread / jnp.where(enough, n_eff - 1.0, 1.0)
    b_sq_mean = jnp.maximum(jnp.square(b_mean), jnp.finfo(b.dtype).tiny)
    shrink = jnp.where(enough, jnp.maximum(0.0, 1.0 - var_mean / b_sq_mean), 0.0)
    return jnp.where(shrink > 0, -_solve_ridged(m_mean, b_mean) * shrink, 0.0)


def fitted_coefficients(g: Array, e: Array) -> Array:
    """The coefficients (S,) fitted on all N particles at once (the in-sample oracle)."""
    m = jnp.einsum("nsp,ntp->st", e, e)
    b = jnp.einsum("nsp,np->s", e, g - jnp.mean(g, 0))
    return -_solve_ridged(m, b)


def combine(g: Array, e: Array, c: Array) -> Array:
    """hᵢ = gᵢ + Σₛ cᵢ,ₛ dᵢ,ₛ for per-particle (N × S) or shared (S,) coefficients. O(N S P)."""
    c = jnp.broadcast_to(c, e.shape[:2])
    return g + jnp.einsum("ns,nsp->np", c, e)
