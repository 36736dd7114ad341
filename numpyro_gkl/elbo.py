"""``TraceAnalytic_ELBO``: a drop-in for ``Trace_ELBO`` that uses closed forms wherever exact.

Per particle the ELBO is a sum of per-site terms. ``Trace_ELBO`` estimates every term by one draw:
log p(z) at each model site, −log q(z) at each guide site. With ``kl="analytic"`` (default) each
term that has an exact expectation is replaced by it, and every other term stays a draw, so the
estimator stays unbiased:

- site-wise Gaussian guide site and Gaussian model site (any pair that ``kl_divergence`` knows,
  NumPyro's or ours): log p(z) − log q(z) → −KL(q‖p), provided the mean-field condition holds for
  the site (no latent parent of the model site descends from it in the guide); otherwise the draw
  is kept and a warning names the site once;
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
coefficients cₛ of each particle are fitted on the other particles of the step to minimize the
summed gradient variance (``numpyro_gkl.control_variate``), so the estimator stays exactly
unbiased and is never much worse than the better of ``"analytic"`` (c = 0) and ``"sampled"``
(c = 1). It needs ``num_particles ≥ 3``; its loss value is the analytic estimate's.
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
from numpyro.infer.autoguide import AutoContinuous, AutoDiagonalNormal, AutoMultivariateNormal
from numpyro.infer.inspect import get_dependencies
from numpyro.util import check_model_guide_match

from numpyro_gkl.control_variate import MIN_PARTICLES, combine, loo_coefficients
from numpyro_gkl.gaussian import Diagonal, as_gaussian, entropy
from numpyro_gkl.kl import gaussian_kl
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


def _is_real(support: constraints.Constraint) -> bool:
    """Whether the support is ℝⁿ, so that the auto guide's transform is the identity."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def _parents(deps: dict[str, dict[str, Any]], name: str) -> set[str]:
    return set(deps.get(name, {})) - {name}


class TraceAnalytic_ELBO(ELBO):
    """ELBO with closed-form expectations wherever they are exact; see the module docstring.

    :param num_particles: particles (draws) per estimate, averaged.
    :param vectorize_particles: ``jax.vmap`` over particles (``True``), ``jax.lax.map`` (``False``)
        or a callable, as in NumPyro.
    :param sum_sites: sum the per-site terms (``True``) or return them as a dict keyed by site.
    :param kl: ``"analytic"`` (closed forms where exact), ``"sampled"`` (``Trace_ELBO``) or
        ``"adaptive"`` (a control variate between the two, fitted per step; needs
        ``num_particles ≥ 3`` and ``sum_sites=True``).
    """

    def __init__(
        self,
        num_particles: int = 1,
        vectorize_particles: bool | Callable = True,
        sum_sites: bool = True,
        kl: KLMode = "analytic",
    ) -> None:
        if kl not in ("analytic", "sampled", "adaptive"):
            raise ValueError(f"kl must be 'analytic', 'sampled' or 'adaptive', got {kl!r}")
        if kl == "adaptive" and (num_particles < MIN_PARTICLES or not sum_sites):
            raise ValueError(
                f"kl='adaptive' fits each particle's coefficients on the others: it needs "
                f"num_particles >= {MIN_PARTICLES} and sum_sites=True, got "
                f"num_particles={num_particles}, sum_sites={sum_sites}"
            )
        self.sum_sites = sum_sites
        self.kl = kl
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
        """−KL(q‖p) for a site-wise pair, or ``None`` where it would not be exact."""
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
        return -_scaled_sum(kl, guide_site)

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
        with jax.ensure_compile_time_eval():
            flat = guide._unpack_latent(jnp.arange(joint.dim, dtype=jnp.float32))
        for name, idx in flat.items():
            site = model_trace.get(name)
            if site is None or site["is_observed"] or _parents(model_deps, name):
                continue
            prior = as_gaussian(site["fn"])
            if prior is None or not _is_real(site["fn"].support):
                continue
            shape = tuple(prior.batch_shape) + tuple(prior.event_shape)
            index = np.asarray(idx, dtype=np.int64)
            if index.shape != shape:
                continue
            q_i = site_marginal(joint, index, prior)
            terms[name] = -_scaled_sum(entropy(q_i) + gaussian_kl(q_i, prior), site)
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
        if self.kl == "adaptive":
            loss = self._adaptive_loss(rng_key, param_map, model, guide, args, kwargs)
            return {"loss": loss, "mutable_state": None}

        def single_particle_elbo(key: jax.Array):
            model_trace, guide_trace, mutable = self._traces(
                key, param_map, model, guide, args, kwargs
            )
            sampled, closed = self._site_terms(model, guide, model_trace, guide_trace, args, kwargs)
            terms = sampled if self.kl == "sampled" else {**sampled, **closed}
            elbo = sum(terms.values(), start=jnp.array(0.0)) if self.sum_sites else terms
            if mutable:
                if self.num_particles == 1:
                    return elbo, mutable
                warnings.warn(
                    "mutable state is currently ignored when num_particles > 1.", stacklevel=2
                )
            return elbo, None

        if self.num_particles == 1:
            elbo, mutable_state = single_particle_elbo(rng_key)
            return {"loss": jax.tree.map(jnp.negative, elbo), "mutable_state": mutable_state}
        keys = random.split(rng_key, self.num_particles)
        elbos, mutable_state = self.vectorize_particles_fn(single_particle_elbo, keys)
        return {"loss": jax.tree.map(lambda x: -jnp.mean(x), elbos), "mutable_state": mutable_state}

    def _param_transforms(
        self,
        key: jax.Array,
        param_map: dict[str, jax.Array],
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
    ) -> dict[str, Any]:
        """``biject_to(constraint)`` of every real-valued param site, as SVI unconstrains them."""
        model_trace, guide_trace, _ = self._traces(key, param_map, model, guide, args, kwargs)
        transforms = {}
        for site in (*model_trace.values(), *guide_trace.values()):
            name = site["name"]
            real = name in param_map and jnp.issubdtype(
                jnp.result_type(param_map[name]), jnp.inexact
            )
            if site["type"] == "param" and real:
                transforms[name] = biject_to(site["kwargs"].get("constraint", constraints.real))
        return transforms

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
        transforms = self._param_transforms(rng_key, param_map, model, guide, args, kwargs)
        return self._particle_gradients(rng_key, param_map, transforms, model, guide, args, kwargs)

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
        free = {k: t.inv(param_map[k]) for k, t in transforms.items()}
        fixed = {k: v for k, v in param_map.items() if k not in transforms}
        names: list[str] = []
        exact_entropy = isinstance(guide, AutoMultivariateNormal | AutoDiagonalNormal)
        entropy_site = f"_{guide.prefix}_latent" if exact_entropy else None

        def terms(key: jax.Array, u: dict) -> tuple[jax.Array, jax.Array]:
            params = {**fixed, **{k: transforms[k](v) for k, v in u.items()}}
            model_trace, guide_trace, _ = self._traces(key, params, model, guide, args, kwargs)
            sampled, closed = self._site_terms(model, guide, model_trace, guide_trace, args, kwargs)
            analytic = sum({**sampled, **closed}.values(), start=jnp.array(0.0))
            names[:] = [n for n in closed if n != entropy_site]
            diffs = [sampled[n] - closed[n] for n in names]
            return analytic, jnp.stack(diffs) if diffs else jnp.zeros((0,))

        def one(key: jax.Array):
            (value, diffs), pullback = jax.vjp(lambda u: terms(key, u), free)
            (g,) = pullback((jnp.ones_like(value), jnp.zeros_like(diffs)))
            eye = jnp.eye(diffs.shape[0], dtype=diffs.dtype)
            (d,) = jax.vmap(lambda ct: pullback((jnp.zeros_like(value), ct)))(eye)
            return value, g, d

        keys = random.split(rng_key, self.num_particles)
        value, g, d = self.vectorize_particles_fn(one, keys)
        return value, g, d, tuple(names)

    def _adaptive_loss(
        self,
        rng_key: jax.Array,
        param_map: dict[str, jax.Array],
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
    ) -> jax.Array:
        """−ELBO whose value is the analytic estimate and whose gradient is the adaptive one.

        The per-particle gradients are computed at ``stop_gradient(param_map)`` with respect to
        the unconstrained parameters u = T⁻¹(θ); the returned scalar is
        ``value + Σ ⟨ḡ, u − stop_gradient(u)⟩``, whose gradient with respect to SVI's
        unconstrained parameters is exactly ḡ, so SVI's differentiation costs nothing more.
        """
        frozen = jax.lax.stop_gradient(param_map)
        transforms = self._param_transforms(rng_key, frozen, model, guide, args, kwargs)
        value, g, d, names = self._particle_gradients(
            rng_key, frozen, transforms, model, guide, args, kwargs
        )
        g_flat = jax.vmap(lambda t: ravel_pytree(t)[0])(g)
        _, unravel = ravel_pytree(jax.tree.map(lambda x: x[0], g))
        if names:
            d_flat = jax.vmap(jax.vmap(lambda t: ravel_pytree(t)[0]))(d)
            h = combine(g_flat, d_flat, loo_coefficients(g_flat, d_flat))
        else:
            h = g_flat
        grad = unravel(jnp.mean(h, 0))
        surrogate = jnp.array(0.0)
        for k, t in transforms.items():
            u = t.inv(param_map[k])
            surrogate = surrogate + jnp.vdot(grad[k], u - jax.lax.stop_gradient(u))
        return -(jnp.mean(value) + surrogate)

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
