"""Example: Sparse variational Gaussian process on scikit-learn's diabetes data.

Run from the repository root (docs page: docs/examples/sparse_gp.md)::

    python examples/03_sparse_gp.py [--quick] [--out docs/examples/figures]

Prints the gradient-variance ratios of the analytic and adaptive estimators against the sampled
one (with bootstrap 90% intervals, at initialization and at a fitted optimum) and, where there is
a reference posterior, ArviZ summaries per estimator; saves the ELBO-trace, variance and forest
figures.
"""

from numpyro_gkl.report import example_main

if __name__ == "__main__":
    example_main(["sparse_gp"])
