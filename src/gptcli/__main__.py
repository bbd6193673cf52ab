"""`python -m gptcli` runs the command-line interface."""

from gptcli.cli.app import main

main()
