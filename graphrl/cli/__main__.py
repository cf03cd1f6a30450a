"""`python -m graphrl.cli ...`: the `graphrl` command."""
import sys

from .main import main

sys.exit(main())
