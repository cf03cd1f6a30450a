"""`python -m graphrl ...`: the `graphrl` command."""
import sys

from .cli.main import main

sys.exit(main())
