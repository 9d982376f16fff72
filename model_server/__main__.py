"""``python -m model_server`` is ``joulegate-model-server``."""

from model_server.cli import main

raise SystemExit(main())
