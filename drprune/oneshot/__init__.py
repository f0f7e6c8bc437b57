"""One-shot pruners: score structure on a little calibration data, emit hard masks, no training.

`layers` (angular distance / cosine block removal), `width` (taylor / l1 / l2 / activation / random
importance to a target shape or ratio), `vocab` (frequency-based vocabulary pruning). Layer and
width pruning share the compaction path of every other pruner; `drprune oneshot ...` is the CLI.
"""
