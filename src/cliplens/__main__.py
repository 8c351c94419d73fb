import sys

from cliplens.cli import main

sys.exit(main())
