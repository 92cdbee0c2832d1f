import sys

from lmgrd.cli import main

sys.exit(main())
