"""``python -m ecg_cli``: the ``ecg-audio`` command without the installed console script."""

from ecg_cli.main import main

raise SystemExit(main())
