"""``python -m hft_lightning {fit,validate,test} [--config FILE]``."""

from hft_lightning.cli import main

if __name__ == "__main__":
    main()
