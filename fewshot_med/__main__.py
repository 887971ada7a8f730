"""``python -m fewshot_med``: the ``fewshot-med`` command (also what ``torchrun -m fewshot_med`` runs)."""

from fewshot_med.cli import main

main()
