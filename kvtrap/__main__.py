import sys

from kvtrap.cli import main

sys.exit(main())
