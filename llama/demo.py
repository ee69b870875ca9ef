"""python -m llama.demo: fetch and convert the bundled demo model, SmolLM2-135M-Instruct
(llama.checkpoint.demo), and print where it is."""

from .checkpoint.demo import DEMO_NAME, demo_dir, ensure_demo
from .cli import run

__all__ = ["DEMO_NAME", "demo_dir", "ensure_demo", "main"]


def main(force: bool = False) -> None:
    """Fetch and convert the demo model; print its directory.

    Args:
        force: convert again even if the demo checkpoint exists.
    """
    path = ensure_demo(force=force)
    print(f"demo model ready: {path}")


if __name__ == "__main__":
    run(main)
