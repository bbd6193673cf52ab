"""`python -m gptcli` runs the command-line interface."""

from gptcli.cli.app import main

if __name__ == "__main__":  # not when a worker process (data/tokenized/encoders.py) imports this module again
    main()
