import sys

from bloodcell.app.cli import main  # the entry point of `python -m bloodcell`

sys.exit(main())
