"""``python -m numpyro_gkl`` runs the command line (see ``numpyro_gkl.cli``)."""

from numpyro_gkl.cli import main

main()
