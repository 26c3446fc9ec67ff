"""``python -m qkdissect`` (also what ``torchrun -m qkdissect`` runs)."""

from qkdissect.cli import main

main()
