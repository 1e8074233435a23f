import sys

from amvl.cli import main

sys.exit(main())
