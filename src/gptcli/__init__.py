"""gptcli: train, finetune and sample GPT models from the command line."""

__version__ = "0.1.0"
