"""Example: eight schools, centered and non-centered, with AutoNormal and AutoMultivariateNormal.

Run from the repository root (docs page: docs/examples/eight_schools.md)::

    python examples/05_eight_schools.py [--quick] [--out docs/examples/figures]

Prints the gradient-variance ratios of the analytic and adaptive estimators against the sampled
one (bootstrap 90% intervals, at initialization and at a fitted optimum) and ArviZ summaries of μ
and τ per estimator (seeds as chains) and for NUTS; saves the ELBO-trace, variance and forest
figures.
"""

from numpyro_gkl.report import example_main

if __name__ == "__main__":
    example_main(
        [
            f"eight_schools_{param}_{guide}"
            for param in ("noncentered", "centered")
            for guide in ("AutoNormal", "AutoMultivariateNormal")
        ]
    )
