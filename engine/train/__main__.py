"""``python -m engine.train``: the fine-tuning command (see engine.train)."""

from engine.train.command import main

main()
