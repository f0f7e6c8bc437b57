"""`drprune demo`: the whole pipeline end to end on a small real model and corpus, on a CPU."""
