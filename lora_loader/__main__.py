"""``python -m lora_loader``: the ``lora-loader`` command (see `lora_loader.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
