"""``python -m onnxprune`` runs the CLI."""

from onnxprune.cli.main import main

main()
