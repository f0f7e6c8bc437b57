"""Run the tiny config and write each rank's data proportions after every batch (for multi-rank tests).

    composer -n 2 tests/scripts/record_proportions.py OUT_DIR CONFIG key=value ...
"""
import json
import sys
from pathlib import Path

from composer.core import Callback
from composer.utils import dist

from drprune.train import build_trainer, load_config


class Record(Callback):
    def __init__(self) -> None:
        self.rows: list[list[float]] = []

    def batch_end(self, state, logger) -> None:
        self.rows.append(list(state.train_dataloader.dataset.proportion))


def main() -> None:
    out, config, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    trainer = build_trainer(load_config(config, overrides))
    record = Record()
    trainer.state.callbacks.append(record)
    trainer.fit()
    (out / f"proportions-rank{dist.get_global_rank()}.json").write_text(json.dumps(record.rows))


if __name__ == "__main__":
    main()
