"""drprune: structured pruning of pretrained LLMs with learned masks and robust data mixtures."""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="drprune",
    version="0.1.0",
    description="Prune a pretrained LLM into a smaller one with learned masks, robust data mixtures and one compaction path.",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["drprune", "drprune.*"]),
    package_data={"drprune": ["py.typed"]},
    install_requires=requirements,
    extras_require={
        "gpu": ["flash-attn>=2.5"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "tensorboard==2.21.0"],
        "loggers": ["tensorboard==2.21.0"],  # wandb / mlflow loggers: pip install wandb / mlflow
        "demo": ["gguf>=0.10", "accelerate>=1.0"],
        "eval": ["lm-eval==0.4.13", "accelerate>=1.0"],  # `drprune eval --tasks` (its HF model class needs accelerate)
    },
    entry_points={"console_scripts": ["drprune=drprune.cli:main"]},
)
