"""`python -m gptcli` runs the command-line interface."""

from gptcli.cli import main

main()
