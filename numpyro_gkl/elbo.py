"""``TraceAnalytic_ELBO``: a drop-in for ``Trace_ELBO`` that uses closed forms wherever exact.

Per particle the ELBO is a sum of per-site terms. ``Trace_ELBO`` estimates every term by one draw:
log p(z) at each model site, −log q(z) at each guide site. With ``kl="analytic"`` (default) each
term that has an exact expectation is replaced by it, and every other term stays a draw, so the
estimator stays unbiased:

- site-wise Gaussian guide site and Gaussian model site (any pair that ``kl_divergence`` knows,
  NumPyro's or ours): log p(z) − log q(z) → −KL(q‖p), provided the mean-field condition holds for
  the site (no latent parent of the model site descends from it in the guide); otherwise the draw
  is kept and a warning names the site once. The model's and the guide's scales weigh their own
  sides, as in ``Trace_ELBO``: with sp ≠ sq the term is −sp·KL − (sp − sq)·H(q);
- joint Gaussian auto guide q(u) (``AutoMultivariateNormal``, ``AutoLowRankMultivariateNormal``,
  ``AutoDiagonalNormal``): −log q(u) → H(q) = ½ log|2πeΣ|, and for each model site that is a root
  of the model (no latent parents), has real support and a Gaussian prior, log p(z) →
  E_q[log p(z)] = −H(qᵢ) − KL(qᵢ‖p) from the guide's marginal qᵢ at that site;
- everything else (likelihood, constrained sites and their log-Jacobians, priors that depend on
  other latents, non-Gaussian guides): the draw of ``Trace_ELBO``.

``kl="sampled"`` computes exactly ``Trace_ELBO``'s estimator, so an example compares the two with
one argument changed.

``kl="adaptive"`` returns the gradient g + Σₛ cₛ dₛ, where g is the analytic estimate's gradient
and dₛ the gradient of site s's difference (draw − closed form), which has mean zero; the
coefficients cₛ minimize the summed gradient variance and never depend on the draws they weight,
so the estimator stays exactly unbiased and is never much worse than the better of
``"analytic"`` (c = 0) and ``"sampled"`` (c = 1). Two ways to fit them
(``numpyro_gkl.control_variate``): with a guide wrapped by ``with_adaptive_state`` (recommended),
on running moments of earlier steps, any ``num_particles``: per step the analytic estimate's
gradient and S backward passes through the sites' prior and guide terms (not the likelihood);
without it, per particle on the other particles of the same step (leave one out,
``num_particles ≥ 3``, N per-particle gradients). Its loss value is the analytic estimate's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import random
from jax.flatten_util import ravel_pytree
from numpyro.distributions import biject_to, constraints
from numpyro.distributions.kl import kl_divergence
from numpyro.distributions.util import scale_and_mask
from numpyro.handlers import replay, seed, substitute, trace
from numpyro.infer import ELBO
from numpyro.infer.autoguide import (
    AutoContinuous,
    AutoDiagonalNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from numpyro.infer.inspect import get_dependencies
from numpyro.util import check_model_guide_match

from numpyro_gkl.adaptive_state import (
    STATE_SITE,
    moments,
    state_sites,
    stepped,
    unwrap,
    updated,
)
from numpyro_gkl.control_variate import (
    MIN_PARTICLES,
    combine,
    loo_coefficients,
    running_coefficients,
)
from numpyro_gkl.gaussian import Diagonal, LowRank, as_gaussian, entropy
from numpyro_gkl.kl import cross_entropy
from numpyro_gkl.marginals import site_marginal

KLMode = Literal["analytic", "sampled", "adaptive"]
Site = dict[str, Any]


def _log_prob_sum(site: Site) -> jax.Array:
    """Σ log p(value) of a trace site, with its scale and mask (as ``Trace_ELBO`` sums it)."""
    if site["intermediates"]:
        log_prob = site["fn"].log_prob(site["value"], site["intermediates"])
    else:
        log_prob = site["fn"].log_prob(site["value"])
    return jnp.sum(scale_and_mask(log_prob, site["scale"]))


def _scaled_sum(x: jax.Array, site: Site) -> jax.Array:
    return jnp.sum(scale_and_mask(x, site["scale"]))


def _same_scale(a: Any, b: Any) -> bool:
    """Whether two sites' scales are known, before tracing, to be equal (``None`` is 1); a
    traced scale is never known to be."""
    a, b = (1.0 if x is None else x for x in (a, b))
    if a is b:
        return True
    try:
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    except jax.errors.TracerArrayConversionError:
        return False


def _unmasked_entropy(fn: Any) -> jax.Array | None:
    """H(q) of each element of a guide site's batch (shape ``fn.batch_shape``), or ``None`` if
    the distribution is masked or has no closed-form entropy."""
    g = as_gaussian(fn)
    if g is not None:
        return None if g.mask is not None else entropy(g)
    try:
        return jnp.broadcast_to(fn.entropy(), fn.batch_shape)
    except NotImplementedError:  # MaskedDistribution among others
        return None


def _is_real(support: constraints.Constraint) -> bool:
    """Whether the support is ℝⁿ, so that the auto guide's transform is the identity."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def _constrain_fn(transforms: dict[str, Any]) -> Callable[[dict], dict]:
    """u ↦ θ = T(u) for the param sites of ``transforms``."""
    return lambda u: {k: transforms[k](v) for k, v in u.items()}


def _movable(transform: Any, value: jax.Array) -> np.ndarray | None:
    """The coordinates of a constrained param θ = T(u) that its unconstrained u moves: 1 where a
    row of T's Jacobian is nonzero, 0 elsewhere (the upper triangle of a Cholesky factor);
    ``None`` if u moves every coordinate.

    Found once per trace from one Jacobian-vector product at a random point (a nonzero row
    gives 0 there with probability 0), so it costs nothing at run time.
    """
    with jax.ensure_compile_time_eval():
        shape = transform.inverse_shape(jnp.shape(value))
        u, tangent = random.normal(random.PRNGKey(0), (2, *shape))
        _, moved = jax.jvp(transform, (u,), (tangent,))
        mask = np.asarray(moved != 0, dtype=jnp.result_type(value))
    return None if mask.all() else mask


def _difference(
    name: str, sampled: dict, closed: dict, model_trace: dict, guide_trace: dict, joint: bool
) -> jax.Array:
    """Site ``name``'s difference: a zero-mean term whose gradient is that of draw − closed form.

    For a site-wise guide site that draws z = m + Lε from a ``Normal`` or a full-rank
    ``MultivariateNormal`` (its own, unmasked), log q(z(ε)) = log N(ε; 0, I) − log|L| has
    exactly the pathwise gradient of −H(q) for every ε, so the difference is taken as
    log p(z) + H(q) − closed form = log p(z) − E_q[log p(z)]: the same gradient as the draw's
    log p(z) − log q(z) − closed form, draw by draw, without a pass through log q(z) (for a
    full-rank q a triangular solve and its derivative). A joint auto guide's site terms are
    already of that form. Otherwise (a low-rank q, whose K + r noise dimensions break the
    identity, a masked or non-Gaussian one): draw − closed form.
    """
    site = guide_trace[name]
    q = None if joint or site["is_observed"] else as_gaussian(site["fn"])
    if q is None or q.mask is not None or isinstance(q, LowRank):
        return sampled[name] - closed[name]
    return _log_prob_sum(model_trace[name]) + _scaled_sum(entropy(q), site) - closed[name]


def _latent_index(guide: AutoContinuous, dim: int) -> dict[str, np.ndarray]:
    """Per site of a joint auto guide, the indices into its latent u (dimension ``dim``) that the
    site's value is cut from, shaped like the site's unconstrained value. At trace time."""
    with jax.ensure_compile_time_eval():
        flat = guide._unpack_latent(jnp.arange(dim, dtype=jnp.float32))
    return {name: np.asarray(idx, dtype=np.int64) for name, idx in flat.items()}


def _parents(deps: dict[str, dict[str, Any]], name: str) -> set[str]:
    return set(deps.get(name, {})) - {name}


class TraceAnalytic_ELBO(ELBO):
    """ELBO with closed-form expectations wherever they are exact; see the module docstring.

    :param num_particles: particles (draws) per estimate, averaged.
    :param vectorize_particles: ``jax.vmap`` over particles (``True``), ``jax.lax.map`` (``False``)
        or a callable, as in NumPyro.
    :param sum_sites: sum the per-site terms (``True``) or return them as a dict keyed by site.
    :param kl: ``"analytic"`` (closed forms where exact), ``"sampled"`` (``Trace_ELBO``) or
        ``"adaptive"`` (a control variate between the two; needs ``sum_sites=True``, and
        ``num_particles ≥ 3`` unless the guide is wrapped by ``with_adaptive_state``).
    :param moment_decay: λ of the running moments of ``kl="adaptive"`` with
        ``with_adaptive_state``: step t − τ weighs λ^τ (an effective window of 1/(1 − λ)
        steps).
    """

    def __init__(
        self,
        num_particles: int = 1,
        vectorize_particles: bool | Callable = True,
        sum_sites: bool = True,
        kl: KLMode = "analytic",
        moment_decay: float = 0.98,
    ) -> None:
        if kl not in ("analytic", "sampled", "adaptive"):
            raise ValueError(f"kl must be 'analytic', 'sampled' or 'adaptive', got {kl!r}")
        if kl == "adaptive" and not sum_sites:
            raise ValueError("kl='adaptive' returns one gradient estimate: it needs sum_sites=True")
        if not 0.0 <= moment_decay < 1.0:
            raise ValueError(f"moment_decay must be in [0, 1), got {moment_decay}")
        self.sum_sites = sum_sites
        self.kl = kl
        self.moment_decay = moment_decay
        self._warned: set[str] = set()
        self._dependencies: dict[tuple[int, int], tuple[dict, dict] | None] = {}
        super().__init__(num_particles=num_particles, vectorize_particles=vectorize_particles)

    # -- structure, found once per (model, guide) at trace time ------------------------------

    def _warn_once(self, name: str, message: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(message, stacklevel=4)

    def _structure(self, model: Callable, guide: Callable, args: tuple, kwargs: dict):
        """Prior dependencies of the model and of the guide, or ``None`` if they can't be found."""
        guide = unwrap(guide)
        key = (id(model), id(guide))
        if key not in self._dependencies:
            try:
                model_deps = get_dependencies(model, args, kwargs)["prior_dependencies"]
                guide_deps = get_dependencies(guide, args, kwargs)["prior_dependencies"]
                self._dependencies[key] = (model_deps, guide_deps)
            except Exception as err:  # provenance tracing cannot see through every program
                self._warn_once(
                    "<structure>",
                    f"TraceAnalytic_ELBO could not infer the model's dependency structure "
                    f"({type(err).__name__}: {err}); every site is sampled.",
                )
                self._dependencies[key] = None
        return self._dependencies[key]

    # -- the per-site terms ------------------------------------------------------------------

    def _sitewise_kl(
        self, name: str, model_site: Site, guide_site: Site, model_deps: dict, guide_deps: dict
    ) -> jax.Array | None:
        """The expectation of the site's term sp·log p(z) − sq·log q(z) for a site-wise pair
        (sp, sq: the model's and the guide's scale, as ``Trace_ELBO`` weighs them), or ``None``
        where it would not be exact.

        With R = KL(q‖p) per element of the pair's batch (NumPyro's masked semantics: −H(q) where
        only q is present), Σ −sp·R when sp = sq is known before tracing and q's batch is the
        pair's; otherwise Σ −sp·R − Σ sp·H(q) over the pair's batch + Σ sq·H(q) over q's own,
        which needs an unmasked q with an entropy (``None`` if not: the draw is kept). Upstream
        ``TraceMeanField_ELBO`` weighs −R by sq alone, which differs from ``Trace_ELBO`` when
        only one side is scaled (``handlers.scale`` on the model, KL annealing) or when a model
        plate is replayed from a guide plate of another size (scale N/M on the model side).
        """
        try:
            kl = kl_divergence(guide_site["fn"], model_site["fn"])
        except NotImplementedError:
            return None
        descendants = {j for j, d in guide_deps.items() if name in d and j != name}
        violated = _parents(model_deps, name) & descendants
        if violated:
            self._warn_once(
                name,
                f"TraceAnalytic_ELBO: site {name!r} has model parents {sorted(violated)} that "
                "depend on it in the guide (mean-field condition violated); its KL term is "
                "sampled.",
            )
            return None
        term = -_scaled_sum(kl, model_site)
        q = guide_site["fn"]
        if _same_scale(model_site["scale"], guide_site["scale"]) and jnp.shape(kl) == q.batch_shape:
            return term
        h = _unmasked_entropy(q)
        if h is None:
            return None
        h_pair = jnp.broadcast_to(h, jnp.shape(kl))
        return term - _scaled_sum(h_pair, model_site) + _scaled_sum(h, guide_site)

    def _joint_terms(
        self, guide: AutoContinuous, guide_trace: dict, model_trace: dict, model_deps: dict
    ) -> dict[str, jax.Array]:
        """Closed-form terms of a joint Gaussian auto guide: H(q), and E_q[log p] of root sites."""
        latent_name = f"_{guide.prefix}_latent"
        latent_site = guide_trace.get(latent_name)
        joint = None if latent_site is None else as_gaussian(latent_site["fn"])
        if isinstance(joint, Diagonal) and not joint.event_shape and joint.mask is None:
            # AutoDiagonalNormal samples u as a batch of scalars: the same Gaussian over a vector.
            joint = replace(joint, batch_shape=(), event_shape=joint.batch_shape)
        if joint is None or len(joint.event_shape) != 1 or joint.batch_shape:
            return {}
        terms = {latent_name: _scaled_sum(entropy(joint), latent_site)}
        for name, index in _latent_index(guide, joint.dim).items():
            site = model_trace.get(name)
            if site is None or site["is_observed"] or _parents(model_deps, name):
                continue
            prior = as_gaussian(site["fn"])
            if prior is None or not _is_real(site["fn"].support):
                continue
            shape = tuple(prior.batch_shape) + tuple(prior.event_shape)
            if index.shape != shape:
                continue
            q_i = site_marginal(joint, index, prior)
            terms[name] = -_scaled_sum(cross_entropy(q_i, prior), site)
        return terms

    # -- the estimator -----------------------------------------------------------------------

    def _traces(
        self,
        key: jax.Array,
        param_map: dict[str, jax.Array],
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
    ) -> tuple[dict, dict, dict]:
        """Guide and model traces of one particle, and the values of their mutable sites."""
        params = param_map.copy()
        model_seed, guide_seed = random.split(key)
        guide_trace = trace(substitute(seed(guide, guide_seed), data=param_map)).get_trace(
            *args, **kwargs
        )
        mutable = {n: s["value"] for n, s in guide_trace.items() if s["type"] == "mutable"}
        params.update(mutable)
        model_trace = trace(
            substitute(replay(seed(model, model_seed), guide_trace), data=params)
        ).get_trace(*args, **kwargs)
        mutable.update({n: s["value"] for n, s in model_trace.items() if s["type"] == "mutable"})
        check_model_guide_match(model_trace, guide_trace)
        return model_trace, guide_trace, mutable

    def loss_with_mutable_state(
        self,
        rng_key: jax.Array,
        param_map: dict[str, jax.Array],
        model: Callable,
        guide: Callable,
        *args: Any,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """−ELBO and the values of the mutable sites for the next step.

        With one particle (and not ``kl="adaptive"``) the mutable sites' values are those the
        model and guide leave, as in ``Trace_ELBO``. Otherwise a particle's values cannot stand
        for the step: each mutable site keeps its incoming value (a warning says so once), except
        the state of ``with_adaptive_state``, which ``kl="adaptive"`` updates. The state's
        structure never changes, so ``SVI.run``'s scan works.
        """
        if self.kl == "adaptive":
            loss, mutable_state = self._adaptive_loss(
                rng_key, param_map, model, guide, args, kwargs
            )
            return {"loss": loss, "mutable_state": mutable_state}

        def single_particle_elbo(key: jax.Array):
            model_trace, guide_trace, mutable = self._traces(
                key, param_map, model, guide, args, kwargs
            )
            sampled, closed = self._site_terms(model, guide, model_trace, guide_trace, args, kwargs)
            terms = sampled if self.kl == "sampled" else {**sampled, **closed}
            elbo = sum(terms.values(), start=jnp.array(0.0)) if self.sum_sites else terms
            return elbo, mutable

        if self.num_particles == 1:
            elbo, mutable_state = single_particle_elbo(rng_key)
            return {
                "loss": jax.tree.map(jnp.negative, elbo),
                "mutable_state": mutable_state or None,
            }
        keys = random.split(rng_key, self.num_particles)
        elbos, mutable = self.vectorize_particles_fn(single_particle_elbo, keys)
        first = jax.tree.map(lambda x: x[0], mutable)
        return {
            "loss": jax.tree.map(lambda x: -jnp.mean(x), elbos),
            "mutable_state": self._carried(param_map, first),
        }

    def _carried(self, param_map: dict, mutable: dict) -> dict | None:
        """Each mutable site's incoming value (``param_map``'s, else ``mutable``'s); warns once."""
        others = sorted(set(mutable) - {STATE_SITE})
        if others:
            self._warn_once(
                "<mutable>",
                f"TraceAnalytic_ELBO(num_particles={self.num_particles}, kl={self.kl!r}) does not "
                f"update the mutable sites {others}: they keep their incoming values.",
            )
        carried = {n: param_map.get(n, v) for n, v in mutable.items()}
        return carried or None

    def _inspect(
        self,
        key: jax.Array,
        param_map: dict[str, jax.Array],
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
    ) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        """``biject_to(constraint)`` of every real-valued param site (as SVI unconstrains them),
        the values of the mutable sites, and the guide's latent sites in ``state_sites`` order."""
        model_trace, guide_trace, mutable = self._traces(key, param_map, model, guide, args, kwargs)
        transforms = {}
        for site in (*model_trace.values(), *guide_trace.values()):
            name = site["name"]
            if site["type"] != "param" or name not in param_map:
                continue
            if jnp.issubdtype(jnp.result_type(param_map[name]), jnp.inexact):
                transforms[name] = biject_to(site["kwargs"].get("constraint", constraints.real))
        return transforms, mutable, state_sites(guide_trace)

    def warmed_adaptive_state(
        self,
        rng_key: jax.Array,
        param_map: dict[str, jax.Array],
        model: Callable,
        guide: Callable,
        *args: Any,
        num_steps: int = 100,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The state of ``with_adaptive_state`` after ``num_steps`` steps at fixed ``param_map``.

        Starts from the zero state and refreshes it with ``num_steps`` independent steps' draws
        (keys split from ``rng_key``) without moving the parameters: the running moments of
        ``kl="adaptive"`` at one point, e.g. to measure its gradient variance there with the
        state frozen. ``guide`` must be wrapped by ``with_adaptive_state``. Cost: ``num_steps``
        adaptive gradient evaluations (one ``lax.scan``).
        """
        if self.kl != "adaptive":
            raise ValueError(f"warmed_adaptive_state needs kl='adaptive', got kl={self.kl!r}")
        keys = random.split(rng_key, num_steps + 1)
        _, mutable, _ = self._inspect(keys[0], param_map, model, guide, args, kwargs)
        if STATE_SITE not in mutable:
            raise ValueError(
                "warmed_adaptive_state needs a guide wrapped by with_adaptive_state(guide)"
            )

        def step(state: jax.Array, key: jax.Array) -> tuple[jax.Array, None]:
            params = {**param_map, STATE_SITE: state}
            _, mutable = self._adaptive_loss(key, params, model, guide, args, kwargs)
            return mutable[STATE_SITE], None

        state, _ = jax.lax.scan(step, mutable[STATE_SITE], keys[1:])
        return state

    def particle_gradients(
        self,
        rng_key: jax.Array,
        param_map: dict[str, jax.Array],
        model: Callable,
        guide: Callable,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[jax.Array, dict, dict, tuple[str, ...]]:
        """Per-particle gradients of the analytic estimate and of each closed form's difference.

        For each of the ``num_particles`` particles (the same draws as ``loss``): the analytic
        ELBO estimate aᵢ, its gradient gᵢ with respect to the unconstrained parameters (what
        SVI's optimizer sees: each param site mapped by ``biject_to`` of its constraint), and for
        each site s with a closed-form term the gradient dᵢ,ₛ of (draw − closed form) of that
        site, which has mean zero. Returns ``(a, g, d, names)``: ``a`` of shape (N,), ``g`` a dict
        keyed by param name with a leading axis N, ``d`` the same with leading axes (N, S),
        ``names`` the S site names. The entropy term of ``AutoMultivariateNormal`` and
        ``AutoDiagonalNormal`` is not among them: its draw −log q(u), u = m + Lε, has exactly the
        pathwise gradient of H(q). Cost: N forward passes of the ELBO and N·(S + 1) backward
        passes (one vector-Jacobian product per particle, pulled back S + 1 times; the S
        difference pullbacks carry zero cotangent through the likelihood).
        """
        transforms, _, _ = self._inspect(rng_key, param_map, model, guide, args, kwargs)
        return self._particle_gradients(rng_key, param_map, transforms, model, guide, args, kwargs)

    def _terms_fn(
        self,
        param_map: dict[str, jax.Array],
        transforms: dict[str, Any],
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
    ) -> tuple[Callable, list[str]]:
        """``(terms, names)``: ``terms(key, theta) = (analytic, diffs)`` of one particle, with the
        param sites of ``transforms`` set to ``theta`` (constrained values): the analytic ELBO
        estimate and the differences of the S sites ``names`` (``_difference``: with the gradient
        of draw − closed form; filled when ``terms`` is first traced), a dict keyed by site. The
        entropy term of ``AutoMultivariateNormal`` and ``AutoDiagonalNormal`` is left out: its
        draw −log q(u), u = m + Lε, has exactly the pathwise gradient of H(q).
        """
        fixed = {k: v for k, v in param_map.items() if k not in transforms}
        names: list[str] = []
        inner = unwrap(guide)
        exact_entropy = isinstance(inner, AutoMultivariateNormal | AutoDiagonalNormal)
        entropy_site = f"_{inner.prefix}_latent" if exact_entropy else None
        joint = isinstance(inner, AutoContinuous)

        def terms(key: jax.Array, theta: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
            params = {**fixed, **theta}
            model_trace, guide_trace, _ = self._traces(key, params, model, guide, args, kwargs)
            sampled, closed = self._site_terms(model, guide, model_trace, guide_trace, args, kwargs)
            analytic = sum({**sampled, **closed}.values(), start=jnp.array(0.0))
            names[:] = [n for n in closed if n != entropy_site]
            diffs = {
                n: _difference(n, sampled, closed, model_trace, guide_trace, joint) for n in names
            }
            return analytic, diffs

        return terms, names

    def _particle_gradients(
        self,
        rng_key: jax.Array,
        param_map: dict[str, jax.Array],
        transforms: dict[str, Any],
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
    ) -> tuple[jax.Array, dict, dict, tuple[str, ...]]:
        """``particle_gradients`` with the param sites' transforms already found."""
        terms, names = self._terms_fn(param_map, transforms, model, guide, args, kwargs)
        free = {k: t.inv(param_map[k]) for k, t in transforms.items()}

        def one(key: jax.Array):
            constrain = _constrain_fn(transforms)

            def stacked(u: dict) -> tuple[jax.Array, jax.Array]:
                analytic, diffs = terms(key, constrain(u))
                return analytic, jnp.stack([diffs[n] for n in names]) if names else jnp.zeros(0)

            (value, diffs), pullback = jax.vjp(stacked, free)
            (g,) = pullback((jnp.ones_like(value), jnp.zeros_like(diffs)))
            eye = jnp.eye(diffs.shape[0], dtype=diffs.dtype)
            (d,) = jax.vmap(lambda ct: pullback((jnp.zeros_like(value), ct)))(eye)
            return value, g, d

        keys = random.split(rng_key, self.num_particles)
        value, g, d = self.vectorize_particles_fn(one, keys)
        return value, g, d, tuple(names)

    def _running_gradient(
        self,
        rng_key: jax.Array,
        param_map: dict[str, jax.Array],
        transforms: dict[str, Any],
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        state: jax.Array,
        order: list[str],
    ) -> tuple[jax.Array, dict, jax.Array]:
        """Analytic ELBO estimate, the adaptive gradient ĝ = ḡ + Σₛ cₛ d̄ₛ, and the next state.

        ḡ is the gradient of the particle-averaged analytic estimate, d̄ₛ that of site s's
        particle-averaged difference (draw − closed form) alone, whose backward pass runs
        through that site's prior and guide terms only (its forward pass is the same
        computation as the analytic one's, which XLA shares). c comes from the incoming state
        (earlier steps only); the state is then updated with this step's b̂ = d̄ ḡ and
        M̂ = d̄ d̄ᵀ, on every step. Gradients are with respect to the constrained values θ of the
        param sites; SVI maps ĝ to its unconstrained parameters u itself, as it does
        ``Trace_ELBO``'s. The moments sum over the coordinates of θ that u moves (``_movable``):
        no transform is applied or inverted, which on CPU can cost more than the rest of a
        small model's step. Where the d̄ₛ have disjoint supports (``_site_blocks``) they come
        from one backward pass (``_block_moments``). Cost: the analytic estimate's gradient,
        S backward passes (or one) of the sites' prior and guide terms, and O(S P + S³) for P
        parameters.
        """
        terms, names = self._terms_fn(param_map, transforms, model, guide, args, kwargs)
        theta = {k: param_map[k] for k in transforms}
        keys = random.split(rng_key, self.num_particles)
        analytic = self._particle_mean(lambda key, th: terms(key, th)[0], keys)
        value, g = jax.value_and_grad(analytic)(theta)  # also finds the sites ``names``
        if not names:
            return value, g, stepped(state)
        sites = list(names)
        c = running_coefficients(*moments(state, order, sites))
        structure = self._structure(model, guide, args, kwargs)
        blocks = None if structure is None else self._site_blocks(guide, theta, sites, structure[0])
        if blocks is not None:
            grad, b_hat, m_hat = self._block_moments(terms, keys, theta, transforms, g, c, blocks)
            return value, grad, updated(state, order, sites, b_hat, m_hat, self.moment_decay)
        d = [
            jax.grad(self._particle_mean(lambda key, th, n=n: terms(key, th)[1][n], keys))(theta)
            for n in sites
        ]
        grad = {k: g[k] + sum(c[i] * d[i][k] for i in range(len(sites))) for k in g}
        gram = 0.0  # of (d̄₁, …, d̄_S, ḡ) on the coordinates u moves: one product per param
        for k, t in transforms.items():
            rows = jnp.stack([v[k].ravel() for v in (*d, g)])
            mask = _movable(t, theta[k])
            rows = rows if mask is None else rows * mask.ravel()
            gram = gram + rows @ rows.T
        b_hat, m_hat = gram[:-1, -1], gram[:-1, :-1]
        return value, grad, updated(state, order, sites, b_hat, m_hat, self.moment_decay)

    def _site_blocks(
        self, guide: Callable, theta: dict, sites: list[str], model_deps: dict
    ) -> dict[str, np.ndarray] | None:
        """Where the site gradients d̄ₛ have disjoint supports: for each param, the position in
        ``sites`` of the site that owns each of its leading rows (shape (n,), n = 1 for a whole
        param; −1: no site). ``None`` where that is not known, and each site needs its own
        backward pass.

        - ``AutoMultivariateNormal`` and ``AutoDiagonalNormal`` draw uᵢ = mᵢ + Lᵢε (Lᵢ the i-th
          row of the factor, or the i-th scale), and site s's difference
          log p(u[idxₛ]) − E_q[log p] reads only the rows idxₛ of every guide param.
        - ``AutoNormal`` draws each site from its own ``{site}_{prefix}_loc`` and ``_scale``;
          where no site in ``sites`` has a latent parent in the model, site s's difference reads
          only those two.

        Either way every param with a gradient must be the guide's (a param of the model, e.g. a
        prior's scale, can be read by several sites).
        """
        inner = unwrap(guide)
        if isinstance(inner, AutoMultivariateNormal | AutoDiagonalNormal):
            loc = theta.get(f"{inner.prefix}_loc")
            ours = {f"{inner.prefix}_{name}" for name in ("loc", "scale_tril", "scale")}
            if loc is None or set(theta) - ours:
                return None
            k = loc.shape[0]
            if any(jnp.shape(v)[:1] != (k,) for v in theta.values()):
                return None
            index = _latent_index(inner, k)
            rows = np.full(k, -1)
            for i, name in enumerate(sites):
                rows[index[name].ravel()] = i
            return dict.fromkeys(theta, rows)
        if isinstance(inner, AutoNormal) and not any(_parents(model_deps, n) for n in sites):
            suffixes = (f"_{inner.prefix}_loc", f"_{inner.prefix}_scale")
            if not all(name.endswith(suffixes) for name in theta):
                return None
            owner = {f"{n}{suffix}": i for i, n in enumerate(sites) for suffix in suffixes}
            return {name: np.array([owner.get(name, -1)]) for name in theta}
        return None

    def _block_moments(
        self,
        terms: Callable,
        keys: jax.Array,
        theta: dict,
        transforms: dict[str, Any],
        g: dict,
        c: jax.Array,
        blocks: dict[str, np.ndarray],
    ) -> tuple[dict, jax.Array, jax.Array]:
        """ĝ, b̂ and M̂ from one backward pass where the site gradients have disjoint supports
        (``_site_blocks``): d̄ = ∇ Σₛ differences and d̄ₛ its part owned by site s, so
        ĝ = ḡ + c_owner ⊙ d̄, b̂ₛ = Σ over site s's part of d̄ ⊙ ḡ and M̂ = diag(Σ d̄²)
        (M̂ₛₜ = 0 for s ≠ t), on the coordinates u moves. Cost: one backward pass of the sites'
        prior and guide terms and O(P) elementwise."""
        total = jax.grad(self._particle_mean(lambda key, th: sum(terms(key, th)[1].values()), keys))
        d = total(theta)
        grad, b_hat, m_diag = {}, 0.0, 0.0
        for k, t in transforms.items():
            owner = blocks[k]
            onehot = np.asarray(owner[:, None] == np.arange(c.shape[0]), dtype=c.dtype)  # n × S
            scale = onehot @ c
            shape = (owner.size,) + (1,) * (jnp.ndim(g[k]) - 1) if owner.size > 1 else ()
            grad[k] = g[k] + scale.reshape(shape) * d[k]
            mask = _movable(t, theta[k])
            dk = d[k] if mask is None else d[k] * mask
            b_hat = b_hat + jnp.sum((dk * g[k]).reshape(owner.size, -1), 1) @ onehot
            m_diag = m_diag + jnp.sum((dk * d[k]).reshape(owner.size, -1), 1) @ onehot
        return grad, b_hat, jnp.diag(m_diag)

    def _particle_mean(self, f: Callable, keys: jax.Array) -> Callable:
        """θ ↦ the average over the particles ``keys`` of ``f(key, θ)`` (a pytree of arrays)."""

        def mean(theta: dict) -> Any:
            out = self.vectorize_particles_fn(lambda key: f(key, theta), keys)
            return jax.tree.map(lambda x: jnp.mean(x, 0), out)

        return mean

    def _loo_gradient(
        self,
        rng_key: jax.Array,
        param_map: dict[str, jax.Array],
        transforms: dict[str, Any],
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
    ) -> tuple[jax.Array, dict]:
        """Analytic ELBO estimate and the adaptive gradient with leave-one-out coefficients."""
        value, g, d, names = self._particle_gradients(
            rng_key, param_map, transforms, model, guide, args, kwargs
        )
        g_flat = jax.vmap(lambda t: ravel_pytree(t)[0])(g)
        _, unravel = ravel_pytree(jax.tree.map(lambda x: x[0], g))
        if names:
            d_flat = jax.vmap(jax.vmap(lambda t: ravel_pytree(t)[0]))(d)
            h = combine(g_flat, d_flat, loo_coefficients(g_flat, d_flat))
        else:
            h = g_flat
        return jnp.mean(value), unravel(jnp.mean(h, 0))

    def _adaptive_loss(
        self,
        rng_key: jax.Array,
        param_map: dict[str, jax.Array],
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
    ) -> tuple[jax.Array, dict | None]:
        """−ELBO whose value is the analytic estimate and whose gradient is the adaptive one.

        The gradients are computed at ``stop_gradient(param_map)`` with respect to the
        unconstrained parameters u = T⁻¹(θ); the returned scalar is
        ``value + Σ ⟨ĝ, u − stop_gradient(u)⟩``, whose gradient with respect to SVI's
        unconstrained parameters is exactly ĝ, so SVI's differentiation costs nothing more.
        Running moments if the guide declares the state of ``with_adaptive_state``, leave one
        out otherwise. Also returns the mutable sites' values for the next step.
        """
        frozen = jax.lax.stop_gradient(param_map)
        transforms, mutable, order = self._inspect(rng_key, frozen, model, guide, args, kwargs)
        carried = self._carried(frozen, mutable)
        if STATE_SITE in mutable:
            value, grad, carried[STATE_SITE] = self._running_gradient(
                rng_key,
                frozen,
                transforms,
                model,
                guide,
                args,
                kwargs,
                carried[STATE_SITE],
                order,
            )
        elif self.num_particles >= MIN_PARTICLES:
            value, grad = self._loo_gradient(
                rng_key, frozen, transforms, model, guide, args, kwargs
            )
        else:
            raise ValueError(
                f"kl='adaptive' with num_particles={self.num_particles}: wrap the guide, "
                f"SVI(model, with_adaptive_state(guide), ...), to fit the coefficients on earlier "
                f"steps (any num_particles), or use num_particles >= {MIN_PARTICLES} to fit each "
                "particle's on the others"
            )
        surrogate = jnp.array(0.0)
        for k, t in transforms.items():
            # running: grad is w.r.t. θ, and SVI's own pullback through θ = T(u) maps it to u
            x = param_map[k] if STATE_SITE in mutable else t.inv(param_map[k])
            surrogate = surrogate + jnp.vdot(grad[k], x - jax.lax.stop_gradient(x))
        return -(value + surrogate), carried

    def _site_terms(
        self,
        model: Callable,
        guide: Callable,
        model_trace: dict,
        guide_trace: dict,
        args: tuple,
        kwargs: dict,
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """The per-site ELBO terms of one particle as draws, and the closed forms that replace some.

        Returns ``(sampled, closed)``: ``sampled`` holds every site's draw (model log-density minus
        guide log-density, ``Trace_ELBO``'s terms); ``closed`` maps the sites whose term has an
        exact expectation here to that expectation (the analytic estimate is
        ``{**sampled, **closed}``).
        """
        guide = unwrap(guide)
        sampled = {
            name: _log_prob_sum(site)
            for name, site in model_trace.items()
            if site["type"] == "sample"
        }
        for name, site in guide_trace.items():
            if site["type"] == "sample":
                sampled[name] = sampled.get(name, jnp.array(0.0)) - _log_prob_sum(site)
        if self.kl == "sampled":
            return sampled, {}
        structure = self._structure(model, guide, args, kwargs)
        if structure is None:
            return sampled, {}
        model_deps, guide_deps = structure
        closed = {}
        if isinstance(guide, AutoContinuous):
            for name, value in self._joint_terms(
                guide, guide_trace, model_trace, model_deps
            ).items():
                if name in model_trace:  # E_q[log p] replaces the model's draw; keep the guide's
                    closed[name] = value - _log_prob_sum(guide_trace[name])
                else:
                    closed[name] = value
            return sampled, closed
        for name, site in model_trace.items():
            if site["type"] != "sample" or site["is_observed"] or name not in guide_trace:
                continue
            value = self._sitewise_kl(name, site, guide_trace[name], model_deps, guide_deps)
            if value is not None:
                closed[name] = value
        return sampled, closed
